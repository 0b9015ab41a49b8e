//! Approval holds over HTTP: an admin lists, reads and decides payments that wait for a person
//! (`/v1/approvals…`); an agent reads (and waits on) its own (`/v1/me/approvals/{id}`). The
//! decision is one ledger call (`spendcap_approval_decide`); a wait polls the ledger's view
//! every 200 ms until the approval is decided or lapses, at most `wait_secs` (≤ 60).

use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::operators::Principal;
use super::{agent_scoped, AgentAuth, ApiError, ApiJson, SharedState};
use crate::identity::HoldId;
use crate::ledger::{Approval, ApprovalState, LedgerError};
use crate::outcome::{Failure, Kind};

/// The longest a read waits for a decision.
pub const MAX_WAIT_SECS: u64 = 60;
const POLL: Duration = Duration::from_millis(200);
/// At most this many bytes of a decision's note.
const NOTE_BYTES: usize = 512;

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/approvals", get(list))
        .route("/v1/approvals/{id}", get(show))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .route("/v1/me/approvals", get(list_own))
        .route("/v1/me/approvals/{id}", get(show_own))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only approvals in this state: `pending`, `approved`, `denied`, `expired` or `canceled`.
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many seconds (at most 60) for a pending approval to be decided.
    #[serde(default)]
    pub wait_secs: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApprovalList {
    pub approvals: Vec<Approval>,
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Why (kept in the log entry, shown to the agent).
    #[serde(default)]
    pub note: String,
}

fn approval_id(id: &str) -> Result<HoldId, ApiError> {
    id.parse().map_err(|_| Failure::new(Kind::NotFound, "approval_not_found", "no such approval").into())
}

fn not_found(err: LedgerError) -> ApiError {
    match err {
        LedgerError::UnknownAgent | LedgerError::UnknownHold => LedgerError::ApprovalNotFound.into(),
        other => other.into(),
    }
}

/// Reads an approval, waiting up to `wait_secs` while it is pending.
async fn read_waiting(state: &SharedState, id: &HoldId, wait_secs: Option<u64>) -> Result<Approval, ApiError> {
    let wait = match wait_secs {
        Some(secs) if secs > MAX_WAIT_SECS => {
            return Err(Failure::malformed("invalid_query", format!("wait_secs is at most {MAX_WAIT_SECS}")).into())
        }
        Some(secs) => Duration::from_secs(secs),
        None => Duration::ZERO,
    };
    let deadline = Instant::now() + wait;
    loop {
        let approval = state.ledger.approval(state.clock.now_ms(), id).await.map_err(not_found)?;
        if approval.state != ApprovalState::Pending || Instant::now() + POLL > deadline {
            return Ok(approval);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every approval of the last week (newest first), optionally in one state.
#[utoipa::path(get, path = "/v1/approvals", params(ListQuery),
    responses((status = 200, body = ApprovalList)), security(("admin" = [])))]
pub async fn list(
    who: Principal,
    State(state): State<SharedState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ApprovalList>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let wanted = wanted_state(&query)?;
    let now = state.clock.now_ms();
    let mut approvals = Vec::new();
    for tree in who.trees(&state).await? {
        approvals.extend(state.ledger.approvals(now, &tree).await?);
    }
    approvals.retain(|a| wanted.is_none_or(|w| a.state == w));
    approvals.sort_by_key(|a| std::cmp::Reverse(a.created_at_ms));
    Ok(Json(ApprovalList { approvals }))
}

fn wanted_state(query: &ListQuery) -> Result<Option<ApprovalState>, ApiError> {
    match query.state.as_deref() {
        None => Ok(None),
        Some(text) => Ok(Some(ApprovalState::parse(text).ok_or_else(|| {
            ApiError::from(Failure::malformed(
                "invalid_state",
                "state is pending, approved, denied, expired or canceled",
            ))
        })?)),
    }
}

/// The calling agent's own approvals of the last week (newest first), optionally in one state:
/// how a process that did not make the payment (a resumed run, say) finds what waits.
#[utoipa::path(get, path = "/v1/me/approvals", params(ListQuery),
    responses((status = 200, body = ApprovalList)), security(("agent" = [])))]
pub async fn list_own(
    auth: AgentAuth,
    State(state): State<SharedState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ApprovalList>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let wanted = wanted_state(&query)?;
    // The token is checked by the ledger (a read of the agent's balance authenticates it).
    state.ledger.balance(state.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(agent_scoped)?;
    let mut approvals = state.ledger.approvals(state.clock.now_ms(), auth.agent.tree()).await?;
    approvals.retain(|a| a.agent == auth.agent.as_str() && wanted.is_none_or(|w| a.state == w));
    approvals.sort_by_key(|a| std::cmp::Reverse(a.created_at_ms));
    Ok(Json(ApprovalList { approvals }))
}

/// One approval; with `wait_secs`, answers when it is decided (or lapses), or when the wait ends.
#[utoipa::path(get, path = "/v1/approvals/{id}", params(("id" = String, Path, description = "approval id"), WaitQuery),
    responses((status = 200, body = Approval)), security(("admin" = [])))]
pub async fn show(
    who: Principal,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Approval>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let id = approval_id(&id)?;
    if !who.sees(id.tree()) {
        return Err(LedgerError::ApprovalNotFound.into());
    }
    Ok(Json(read_waiting(&state, &id, query.wait_secs).await?))
}

/// The calling agent's own approval, as `GET /v1/approvals/{id}`.
#[utoipa::path(get, path = "/v1/me/approvals/{id}", params(("id" = String, Path, description = "approval id"), WaitQuery),
    responses((status = 200, body = Approval)), security(("agent" = [])))]
pub async fn show_own(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<Approval>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    // The token is checked by the ledger (a read of the agent's balance authenticates it).
    state.ledger.balance(state.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(agent_scoped)?;
    let id = approval_id(&id)?;
    if id.tree() != auth.agent.tree() {
        return Err(LedgerError::ApprovalNotFound.into());
    }
    let first = state.ledger.approval(state.clock.now_ms(), &id).await.map_err(not_found)?;
    if first.agent != auth.agent.as_str() {
        return Err(LedgerError::ApprovalNotFound.into());
    }
    Ok(Json(read_waiting(&state, &id, query.wait_secs).await?))
}

async fn decide(
    state: &SharedState,
    who: &Principal,
    id: &str,
    approve: bool,
    body: DecisionBody,
) -> Result<Json<Approval>, ApiError> {
    if body.note.len() > NOTE_BYTES || body.note.chars().any(char::is_control) {
        return Err(Failure::invalid(
            "invalid_note",
            format!("note is at most {NOTE_BYTES} bytes without control characters"),
        )
        .into());
    }
    let id = approval_id(id)?;
    if !who.sees(id.tree()) {
        return Err(LedgerError::ApprovalNotFound.into());
    }
    let now = state.clock.now_ms();
    state.ledger.approval_decide(now, &id, approve, &who.actor().by, &body.note).await.map_err(not_found)?;
    Ok(Json(state.ledger.approval(state.clock.now_ms(), &id).await.map_err(not_found)?))
}

/// Approves a waiting payment: its hold opens for the agent's repeated request (exactly once).
#[utoipa::path(post, path = "/v1/approvals/{id}/approve", request_body = DecisionBody,
    params(("id" = String, Path, description = "approval id")),
    responses((status = 200, body = Approval)), security(("admin" = [])))]
pub async fn approve(
    who: Principal,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Result<ApiJson<DecisionBody>, ApiError>,
) -> Result<Json<Approval>, ApiError> {
    let ApiJson(body) = body?;
    decide(&state, &who, &id, true, body).await
}

/// Denies a waiting payment: its money is released; the agent's repeated request gets
/// `approval_denied`.
#[utoipa::path(post, path = "/v1/approvals/{id}/deny", request_body = DecisionBody,
    params(("id" = String, Path, description = "approval id")),
    responses((status = 200, body = Approval)), security(("admin" = [])))]
pub async fn deny(
    who: Principal,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    body: Result<ApiJson<DecisionBody>, ApiError>,
) -> Result<Json<Approval>, ApiError> {
    let ApiJson(body) = body?;
    decide(&state, &who, &id, false, body).await
}

/// A query string that does not parse (`wait_secs=-1`, say): `400 invalid_query`, as JSON.
fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", rejection.body_text())
}
