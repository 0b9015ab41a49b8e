//! Holds whose outcome is unknown: a payment was sent and no answer says whether money moved.
//! They stay counted against every cap and never expire (see `spendcap_mark_unknown`), so they
//! must be visible and resolvable: `GET /v1/holds?state=unknown` lists them (an admin sees every
//! tree, an agent its own), and an admin resolves one with `POST /v1/holds/{hold}/resolve`,
//! settling what was charged (with its signed receipt) or voiding it, with a reason that the
//! log line keeps.

use adapters::Micros;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::reports::AdminOrAgent;
use super::{agent_scoped, ApiError, ApiJson, Principal, SharedState};
use crate::identity::{AgentId, HoldId};
use crate::ledger::{Caller, HoldInfo, LedgerError};
use crate::receipt::Receipt;

/// At most this many bytes of an admin's reason.
const REASON_BYTES: usize = 512;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `unknown` (the default) or `open`.
    #[serde(default)]
    pub state: Option<String>,
    /// Only this agent's holds (id or handle; admin token only).
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct HoldStateView {
    pub hold_id: String,
    pub agent_id: String,
    /// `unknown` or `open`.
    pub state: String,
    pub amount_micros: u64,
    pub protocol: String,
    pub service: String,
    pub task: String,
    /// Why the outcome is unknown (empty for an open hold).
    pub reason: String,
    /// When the hold was marked unknown (ms since the epoch).
    pub since_ms: Option<u64>,
    /// When an open hold is released if nobody ends it (an unknown hold never expires).
    pub expires_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct HoldList {
    pub holds: Vec<HoldStateView>,
    /// The sum of the listed holds' amounts.
    pub total_micros: u64,
}

fn view(hold: &HoldInfo) -> HoldStateView {
    HoldStateView {
        hold_id: hold.hold_id.to_string(),
        agent_id: hold.agent.to_string(),
        state: hold.state.clone(),
        amount_micros: hold.amount.get(),
        protocol: hold.protocol.clone(),
        service: hold.service.clone(),
        task: hold.task.clone(),
        reason: hold.unknown_reason.clone(),
        since_ms: hold.unknown_since_ms,
        expires_at_ms: (hold.state == "open").then_some(hold.expires_at_ms),
    }
}

/// Which index to list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    Unknown,
    Open,
}

async fn holds_of_tree(
    state: &SharedState,
    tree: &crate::identity::TreeId,
    listed: Listed,
) -> Result<Vec<HoldInfo>, ApiError> {
    Ok(match listed {
        Listed::Unknown => state.ledger.unknown_holds(tree).await?,
        Listed::Open => state.ledger.open_holds(tree).await?,
    })
}

/// The agent's own holds whose outcome is unknown (for `/v1/me`).
pub async fn unknown_of(state: &SharedState, agent: &AgentId) -> Result<Vec<HoldInfo>, ApiError> {
    let holds = state.ledger.unknown_holds(agent.tree()).await?;
    Ok(holds.into_iter().filter(|h| &h.agent == agent).collect())
}

/// Lists holds whose outcome is unknown (or open ones, `state=open`): with the admin token,
/// those of every tree (or of one agent, `agent=`); with an agent token, the agent's own.
#[utoipa::path(get, path = "/v1/holds", params(ListQuery),
    responses((status = 200, body = HoldList), (status = 400, description = "invalid_state"),
              (status = 403, description = "agent_scope: an agent token may not name another agent")),
    security(("admin" = []), ("agent" = [])))]
pub async fn list(
    who: AdminOrAgent,
    State(state): State<SharedState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<HoldList>, ApiError> {
    let listed = match query.state.as_deref() {
        None | Some("unknown") => Listed::Unknown,
        Some("open") => Listed::Open,
        Some(_) => return Err(ApiError::bad_request("invalid_state", "state is unknown or open")),
    };
    let mut holds = Vec::new();
    match who {
        AdminOrAgent::Admin(who) => {
            let only = match &query.agent {
                Some(text) => Some(who.resolve(&state, text).await?),
                None => None,
            };
            let trees = match &only {
                Some(agent) => vec![agent.tree().clone()],
                None => who.trees(&state).await?,
            };
            for tree in trees {
                let found = holds_of_tree(&state, &tree, listed).await?;
                holds.extend(found.into_iter().filter(|h| only.as_ref().is_none_or(|a| &h.agent == a)));
            }
        }
        AdminOrAgent::Agent(agent, caller) => {
            // The token is checked by the ledger, inside its own step.
            state.ledger.balance(state.clock.now_ms(), &agent, &caller).await.map_err(agent_scoped)?;
            if query.agent.as_deref().is_some_and(|a| a != agent.as_str()) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "agent_scope",
                    "an agent token lists only its own holds",
                ));
            }
            let found = holds_of_tree(&state, agent.tree(), listed).await?;
            holds.extend(found.into_iter().filter(|h| h.agent == agent));
        }
    }
    let views: Vec<HoldStateView> = holds.iter().map(view).collect();
    let total_micros = views.iter().map(|h| h.amount_micros).sum();
    Ok(Json(HoldList { holds: views, total_micros }))
}

/// How an admin resolves a hold whose outcome is unknown.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Money moved: settle `amount_micros` (at most the hold), with a signed receipt.
    Settled,
    /// No money moved: release the hold.
    Voided,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    pub outcome: Resolution,
    /// For `settled`: what was actually charged, at most the held amount.
    #[serde(default)]
    #[schema(value_type = Option<u64>)]
    pub amount_micros: Option<serde_json::Number>,
    /// Why (1 to 512 bytes): what the admin checked. Logged with the decision.
    pub reason: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Resolved {
    pub hold_id: String,
    pub agent_id: String,
    pub outcome: Resolution,
    pub amount_micros: u64,
    pub released_micros: u64,
    /// True when the hold had already been resolved this same way.
    pub replayed: bool,
    /// The signed receipt of a settled resolution.
    pub receipt: Option<Receipt>,
}

fn unprocessable(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

/// Resolves a hold whose outcome is unknown (admin): `settled` with the amount charged (the
/// rest is released; a signed receipt is issued) or `voided`. The log line names the admin as
/// the decider and keeps the reason.
#[utoipa::path(post, path = "/v1/holds/{hold}/resolve", request_body = ResolveRequest,
    params(("hold" = String, Path, description = "hold id")),
    responses((status = 200, body = Resolved), (status = 404, description = "unknown_hold: not a hold id"),
              (status = 409, description = "hold_not_unknown: the hold is not awaiting a resolution"),
              (status = 422, description = "invalid_reason, amount_required, amount_exceeds_hold, invalid amount")),
    security(("admin" = [])))]
pub async fn resolve(
    who: Principal,
    State(state): State<SharedState>,
    Path(hold): Path<String>,
    ApiJson(body): ApiJson<ResolveRequest>,
) -> Result<Json<Resolved>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "unknown_hold", "no such hold");
    let hold: HoldId = hold.parse().map_err(|_| not_found())?;
    if !who.sees(hold.tree()) {
        return Err(not_found());
    }
    let reason = body.reason.trim();
    if reason.is_empty() || reason.len() > REASON_BYTES || reason.chars().any(char::is_control) {
        return Err(unprocessable("invalid_reason", "reason must be 1 to 512 bytes without control characters"));
    }
    let amount = match (body.outcome, &body.amount_micros) {
        (Resolution::Settled, None) => {
            return Err(unprocessable("amount_required", "a settled resolution says the amount charged"))
        }
        (Resolution::Settled, Some(number)) => {
            Some(Micros::from_json_number(number).map_err(|e| unprocessable(e.code(), e.to_string()))?)
        }
        (Resolution::Voided, Some(_)) => {
            return Err(unprocessable("amount_not_allowed", "a voided resolution moves no money"))
        }
        (Resolution::Voided, None) => None,
    };
    let info = state.ledger.unknown_holds(hold.tree()).await?.into_iter().find(|h| h.hold_id == hold);
    let Some(info) = info else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "hold_not_unknown",
            "the hold's outcome is not unknown (it is open, already resolved or does not exist)",
        ));
    };
    let detail = serde_json::json!({ "resolved_by": who.name, "outcome": body.outcome, "reason": reason }).to_string();
    // The resolution's log entry names who decided it (`by`).
    let caller = Caller::Principal(who.name.clone());
    let now = state.clock.now_ms();
    let (amount_micros, released, replayed, receipt) = match amount {
        Some(amount) => {
            let settled = crate::pay::settle_for(&state, &info.agent, &caller, None, &hold, amount, &detail)
                .await
                .map_err(|e| {
                    if e.code == LedgerError::AmountExceedsHold.code() {
                        unprocessable(e.code, e.detail)
                    } else {
                        e.into()
                    }
                })?;
            (
                settled.outcome.amount.get(),
                settled.outcome.released.get(),
                settled.outcome.replayed,
                Some(settled.receipt),
            )
        }
        None => {
            let result = state.ledger.void_detailed(now, &info.agent, &caller, &hold, "admin_resolved", &detail).await;
            state.metrics.void(&result);
            let (released, replayed) = result?;
            (0, released.get(), replayed, None)
        }
    };
    tracing::warn!(hold = %hold, agent = %info.agent, outcome = ?body.outcome, amount = amount_micros,
        reason = %reason, "an admin resolved a hold whose outcome was unknown");
    Ok(Json(Resolved {
        hold_id: hold.to_string(),
        agent_id: info.agent.to_string(),
        outcome: body.outcome,
        amount_micros,
        released_micros: released,
        replayed,
        receipt,
    }))
}
