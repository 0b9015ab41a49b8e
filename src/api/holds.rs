//! Agent routes: the agent's own budget, and the generic budget authority — hold, settle, void —
//! for any paid call that is not x402, ACP or AP2 (LLM tokens, SaaS APIs).

use std::collections::BTreeMap;

use adapters::{Micros, Protocol};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{agent_scoped, label, AgentAuth, ApiError, ApiJson, SharedState};
use crate::identity::HoldId;
use crate::ledger::{HoldOutcome, HoldRequest, Idempotency, IdempotencyMode, LedgerError, Refusal};
use crate::pay::{self, Settlement};
use crate::receipt::Receipt;

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/me", get(me))
        .route("/v1/holds", post(create_hold).get(super::unknown::list))
        .route("/v1/holds/{hold}/resolve", post(super::unknown::resolve))
        .route("/v1/holds/{hold}/settle", post(settle))
        .route("/v1/holds/{hold}/void", post(void))
}

/// The agent's own view of its budget. `state`, `revoked`, `suspended` and `expires_at_ms` count
/// its ancestors, as a hold does; `available_micros` is 0 unless the agent is `active`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MeView {
    pub agent_id: String,
    pub cap_micros: u64,
    pub spent_micros: u64,
    pub held_micros: u64,
    /// The agent's own cap - spent - held.
    pub remaining_micros: u64,
    /// What the agent can hold now, counting every ancestor's cap and state (0 when it or an
    /// ancestor is revoked, suspended or expired).
    pub available_micros: u64,
    /// `active`, `revoked`, `suspended` or `expired`, counting every ancestor.
    pub state: crate::ledger::AgentState,
    /// The ancestor whose state `state` is, when it is not the agent's own.
    #[serde(default)]
    pub state_via: Option<crate::ledger::AgentRef>,
    /// The revocation reason of the agent or its nearest revoked ancestor.
    pub revoked: Option<String>,
    /// The ancestor `revoked` comes from (`null`: the agent's own, or not revoked).
    #[serde(default)]
    pub revoked_via: Option<crate::ledger::AgentRef>,
    /// The earliest expiry of the agent and its ancestors.
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub expires_via: Option<crate::ledger::AgentRef>,
    /// Why the agent (or its nearest suspended ancestor) is suspended (`velocity`, `repeat`).
    #[serde(default)]
    pub suspended: Option<String>,
    #[serde(default)]
    pub suspended_via: Option<crate::ledger::AgentRef>,
    /// The part of `held_micros` whose outcome is unknown: payments sent without an answer, that
    /// stay counted until they are resolved (`GET /v1/holds?state=unknown`).
    #[serde(default)]
    pub unknown_micros: u64,
    /// How many of the agent's holds have an unknown outcome.
    #[serde(default)]
    pub unknown_holds: u64,
}

#[utoipa::path(get, path = "/v1/me", responses((status = 200, body = MeView), (status = 401, description = "invalid token")), security(("agent" = [])))]
pub async fn me(auth: AgentAuth, State(state): State<SharedState>) -> Result<Json<MeView>, ApiError> {
    let now = state.clock.now_ms();
    // The balance checks the token (and releases due holds) before anything else is read.
    let balance = state.ledger.balance(now, &auth.agent, &auth.caller()).await.map_err(agent_scoped)?;
    let (_, standing) = state.ledger.standing(now, &auth.agent).await.map_err(agent_scoped)?;
    let unknown = super::unknown::unknown_of(&state, &auth.agent).await?;
    Ok(Json(MeView {
        unknown_micros: unknown.iter().map(|h| h.amount.get()).sum(),
        unknown_holds: unknown.len() as u64,
        agent_id: auth.agent.to_string(),
        cap_micros: balance.cap.get(),
        spent_micros: balance.spent.get(),
        held_micros: balance.held.get(),
        remaining_micros: balance.remaining.get(),
        available_micros: if standing.is_active() { balance.available.get() } else { 0 },
        state: standing.state,
        state_via: standing.via.clone(),
        revoked: standing.revoked.as_ref().map(|x| x.reason.clone()),
        revoked_via: standing.revoked.as_ref().and_then(|x| x.via.clone()),
        expires_at_ms: standing.expires.as_ref().map(|x| x.at_ms),
        expires_via: standing.expires.as_ref().and_then(|x| x.via.clone()),
        suspended: standing.suspended.as_ref().map(|x| x.reason.clone()),
        suspended_via: standing.suspended.as_ref().and_then(|x| x.via.clone()),
    }))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldRequestBody {
    /// How much to reserve, in micro-USD.
    #[schema(value_type = u64)]
    pub amount_micros: serde_json::Number,
    /// Who is paid: a host, a vendor, a model provider.
    pub service: String,
    /// The task this spend is attributed to.
    #[serde(default)]
    pub task: String,
    /// How long the hold lives if nobody settles or voids it (default 300 s).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Free-form facts for the log line and the receipt.
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct HoldView {
    pub hold_id: String,
    pub amount_micros: u64,
    pub expires_at_ms: u64,
    /// What the agent can still hold after this one (counting every ancestor).
    pub remaining_micros: u64,
    /// True when this answer is the stored result of an earlier request with the same
    /// idempotency key.
    pub replayed: bool,
}

/// The body of a 402 budget refusal.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RefusalView {
    /// `cap_exceeded`, `agent_revoked`, `agent_expired`, `agent_suspended`, `protocol_denied`,
    /// `service_denied`, `per_payment_limit_exceeded`, `daily_limit_exceeded`,
    /// `weekly_limit_exceeded`, `monthly_limit_exceeded`, `all_time_limit_exceeded`,
    /// `task_cap_exceeded`, `budget_exceeded` or `budget_busy`.
    pub code: String,
    pub detail: String,
    pub requested_micros: u64,
    pub remaining_micros: u64,
    /// The agent (this one or an ancestor) whose limit refused the hold.
    pub limited_by: String,
}

/// The 402 a budget refusal becomes.
pub fn refusal_error(refusal: &Refusal) -> ApiError {
    let detail = match refusal.reason {
        crate::ledger::RefusalReason::CapExceeded => "the payment would take the agent or an ancestor over its cap",
        crate::ledger::RefusalReason::AgentRevoked => "the agent (or an ancestor) is revoked",
        crate::ledger::RefusalReason::AgentExpired => "the agent (or an ancestor) has expired",
        crate::ledger::RefusalReason::BudgetExceeded => "the payment would pass a budget it is charged against",
        crate::ledger::RefusalReason::BudgetBusy => "the budget allows one outstanding payment and has one",
        crate::ledger::RefusalReason::AgentSuspended => {
            "the agent (or an ancestor) is suspended by its runaway-loop breaker; an admin can reinstate it"
        }
        crate::ledger::RefusalReason::ProtocolDenied => "the agent (or an ancestor) may not pay with this protocol",
        crate::ledger::RefusalReason::ServiceDenied => "the agent (or an ancestor) may not pay this service",
        crate::ledger::RefusalReason::PerPaymentLimitExceeded => "the payment is above a per-payment limit",
        crate::ledger::RefusalReason::DailyLimitExceeded => "the payment would pass a daily limit (UTC day)",
        crate::ledger::RefusalReason::WeeklyLimitExceeded => "the payment would pass a weekly limit (ISO week, UTC)",
        crate::ledger::RefusalReason::MonthlyLimitExceeded => "the payment would pass a monthly limit (UTC month)",
        crate::ledger::RefusalReason::AllTimeLimitExceeded => "the payment would pass an all-time limit",
        crate::ledger::RefusalReason::TaskCapExceeded => "the payment would pass the per-task cap of this task",
    };
    ApiError::new(StatusCode::PAYMENT_REQUIRED, refusal.reason.code(), detail).with_extra(serde_json::json!({
        "requested_micros": refusal.requested.get(),
        "remaining_micros": refusal.remaining.get(),
        "limited_by": refusal.limited_by,
    }))
}

/// Reads and checks the `Idempotency-Key` header (1 to 255 visible ASCII characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().ok().filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_owned())).ok_or_else(|| {
        ApiError::bad_request("invalid_idempotency_key", "Idempotency-Key must be 1 to 255 visible ASCII characters")
    })
}

#[utoipa::path(post, path = "/v1/holds", request_body = HoldRequestBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key + same body returns the first result")),
    responses((status = 201, body = HoldView), (status = 402, body = RefusalView, description = "budget refusal"),
              (status = 409, description = "idempotency_in_flight"), (status = 422, description = "invalid amount, idempotency_conflict")),
    security(("agent" = [])))]
pub async fn create_hold(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<HoldRequestBody>,
) -> Result<(StatusCode, Json<HoldView>), ApiError> {
    let amount = Micros::from_json_number(&body.amount_micros)
        .and_then(|m| Micros::positive(m.get()))
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string()))?;
    if body.service.is_empty() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_label", "service must not be empty"));
    }
    let service = label("service", &body.service, 256)?;
    let task = label("task", &body.task, 128)?;
    if body.details.len() > 32 || body.details.iter().any(|(k, v)| k.len() > 64 || v.len() > 512) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_details",
            "at most 32 details, keys up to 64 and values up to 512 bytes",
        ));
    }
    let ttl_ms = match body.ttl_secs {
        None => state.limits.default_hold_ttl.as_millis() as u64,
        Some(ttl) if ttl == 0 || ttl > state.limits.max_hold_ttl.as_secs() => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_ttl",
                format!("ttl_secs must be from 1 to {}", state.limits.max_hold_ttl.as_secs()),
            ))
        }
        Some(ttl) => ttl * 1000,
    };
    // The whole request, normalised (an absent TTL is the default one): the same key with any
    // other request is an `idempotency_conflict`.
    let fingerprint = crate::fingerprint::of(
        "holds.create",
        &serde_json::json!({
            "amount_micros": amount.get(), "service": service, "task": task, "ttl_ms": ttl_ms, "details": body.details,
        }),
    );
    let hold_id = HoldId::generate(auth.agent.tree());
    // Without a key the daemon makes one (named in a `ledger_outcome_unknown` answer).
    let idempotency = Some(match idempotency_key(&headers)? {
        Some(key) => Idempotency { key, fingerprint, mode: IdempotencyMode::Final },
        None => pay::auto_idempotency(&hold_id, &fingerprint),
    });
    let details = if body.details.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&body.details).map_err(ApiError::internal)?
    };
    let now = state.clock.now_ms();
    let request = HoldRequest {
        agent: auth.agent.clone(),
        caller: auth.caller(),
        hold_id,
        amount,
        // A lifetime by the ledger's clock, not an end time by this instance's.
        expires: crate::ledger::HoldExpiry::After(ttl_ms),
        task,
        service,
        protocol: Protocol::Generic,
        idempotency,
        details,
        buckets: Vec::new(),
    };
    match pay::hold_and_remember(&state, now, &request).await.map_err(agent_scoped)? {
        // A replay answers like the first answer: 201, with `replayed: true`.
        HoldOutcome::Granted(grant) => Ok((
            StatusCode::CREATED,
            Json(HoldView {
                hold_id: grant.hold_id.to_string(),
                amount_micros: grant.amount.get(),
                expires_at_ms: grant.expires_at_ms,
                remaining_micros: grant.remaining.get(),
                replayed: grant.replayed,
            }),
        )),
        HoldOutcome::Refused(refusal) => Err(refusal_error(&refusal)),
        HoldOutcome::Finished { .. } => Err(ApiError::internal("a final-mode hold replayed a pending response")),
        HoldOutcome::Approval(wait) => {
            let key = request.idempotency.as_ref().map(|i| i.key.as_str());
            let key = key.map(str::to_owned).unwrap_or_else(|| format!("auto-{}", request.hold_id));
            Err(crate::outcome::Failure::approval(&wait, Some(&key)).into())
        }
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// What the call really cost, at most the held amount; the rest is released.
    #[schema(value_type = u64)]
    pub amount_micros: serde_json::Number,
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Settled {
    pub hold_id: String,
    pub amount_micros: u64,
    pub released_micros: u64,
    pub replayed: bool,
    pub receipt: Receipt,
}

fn hold_id(agent: &AgentAuth, text: &str) -> Result<HoldId, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "unknown_hold", "no such hold");
    let hold: HoldId = text.parse().map_err(|_| not_found())?;
    // A hold of another tree cannot be this agent's; say so without asking the ledger.
    if hold.tree() != agent.agent.tree() {
        return Err(not_found());
    }
    Ok(hold)
}

#[utoipa::path(post, path = "/v1/holds/{hold}/settle", request_body = SettleRequest, params(("hold" = String, Path, description = "hold id")),
    responses((status = 200, body = Settled), (status = 409, description = "hold already ended"), (status = 422, description = "amount exceeds hold")),
    security(("agent" = [])))]
pub async fn settle(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(hold): Path<String>,
    ApiJson(body): ApiJson<SettleRequest>,
) -> Result<Json<Settled>, ApiError> {
    let amount = Micros::from_json_number(&body.amount_micros)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string()))?;
    let hold = hold_id(&auth, &hold)?;
    if body.details.len() > 32 || body.details.iter().any(|(k, v)| k.len() > 64 || v.len() > 512) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_details",
            "at most 32 details, keys up to 64 and values up to 512 bytes",
        ));
    }
    let details = if body.details.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&body.details).map_err(ApiError::internal)?
    };
    let Settlement { outcome, receipt } =
        pay::settle_with_receipt(&state, &auth, Some(Protocol::Generic), &hold, amount, &details).await?;
    Ok(Json(Settled {
        hold_id: hold.to_string(),
        amount_micros: outcome.amount.get(),
        released_micros: outcome.released.get(),
        replayed: outcome.replayed,
        receipt,
    }))
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct VoidRequest {
    /// A reason code for the log, e.g. `call_failed`.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Voided {
    pub hold_id: String,
    pub released_micros: u64,
    pub replayed: bool,
}

#[utoipa::path(post, path = "/v1/holds/{hold}/void", request_body = VoidRequest, params(("hold" = String, Path, description = "hold id")),
    responses((status = 200, body = Voided), (status = 409, description = "hold already ended")), security(("agent" = [])))]
pub async fn void(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(hold): Path<String>,
    ApiJson(body): ApiJson<VoidRequest>,
) -> Result<Json<Voided>, ApiError> {
    let hold = hold_id(&auth, &hold)?;
    let reason = label("reason", body.reason.as_deref().unwrap_or("voided_by_agent"), 64)?;
    let result = state
        .ledger
        .void_as(Protocol::Generic, state.clock.now_ms(), &auth.agent, &auth.caller(), &hold, &reason)
        .await;
    state.metrics.void(&result);
    let (released, replayed) = result.map_err(|e| match e {
        LedgerError::UnknownHold => ApiError::new(StatusCode::NOT_FOUND, "unknown_hold", "no such hold"),
        other => agent_scoped(other),
    })?;
    Ok(Json(Voided { hold_id: hold.to_string(), released_micros: released.get(), replayed }))
}
