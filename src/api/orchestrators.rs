//! Orchestrators (issue 18): an agent funds sub-agents under itself (`/v1/me/agents`), and
//! short-lived task-scoped tokens (`/v1/me/tokens`, the admin's `/v1/agents/{agent}/tokens`).
//!
//! A sub-agent is decided by the ledger in one step (`spendcap_create_sub_agent`): its cap fits
//! in what the caller has left to give and its stated controls are no looser than the caller's;
//! a violation is 403 `sub_agent_exceeds_parent` with the `bound` it passed. A task token
//! (`sct_<agent>_t<id>_<secret>`) works wherever the agent's token does, until it expires (by the
//! ledger's clock) or is revoked, or its agent is; the ledger checks it inside every agent call,
//! and every hold made with it is the token's task, whatever task the request names. A task
//! token pays; it manages nothing (403 `task_token_not_allowed` on these routes).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::agents::{
    cap_from, new_handle_allowed, resolve, AgentList, AgentView, CreatedAgent, RevokeRequest, Revoked,
};
use super::operators::Principal;
use super::{agent_scoped, AgentAuth, ApiError, ApiJson, SharedState};
use crate::identity::{AgentId, AgentToken};
use crate::ledger::standing::standings_in;
use crate::ledger::{AgentSetup, AgentState, LedgerError, NewAgent, TaskTokenInfo};

/// The longest a task token lives: 30 days.
pub const MAX_TASK_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/me/agents", post(create_sub_agent).get(list_sub_agents))
        .route("/v1/me/agents/{agent}/revoke", post(revoke_sub_agent))
        .route("/v1/me/tokens", post(create_my_token).get(list_my_tokens))
        .route("/v1/me/tokens/{token}", delete(revoke_my_token))
        .route("/v1/agents/{agent}/tokens", post(create_agent_token).get(list_agent_tokens))
        .route("/v1/agents/{agent}/tokens/{token}", delete(revoke_agent_token))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubAgentRequest {
    /// Unique, 1 to 64 characters of `[a-z0-9_.-]`.
    pub handle: String,
    /// At most what the calling agent has left to give: its available room (over itself and
    /// every ancestor) less what its other live sub-agents can still spend.
    #[schema(value_type = u64)]
    pub cap_micros: serde_json::Number,
    /// Absolute expiry (ms since the epoch); not after the calling agent's.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Time to live in seconds from now (instead of `expires_at_ms`).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Spending controls, no looser than the caller's own (limits at most the caller's, period
    /// limits at most what is left of the caller's this period, allow-lists within the caller's,
    /// deny-lists containing the caller's). What is left out is inherited: every ancestor's
    /// controls apply to the sub-agent anyway.
    #[serde(default)]
    pub controls: Option<super::controls::ControlsBody>,
    /// Create the sub-agent for this task of the caller (it spends the caller's per-task budget).
    #[serde(default)]
    pub task: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskTokenRequest {
    /// The task the token's payments are attributed to (1 to 128 bytes).
    pub task: String,
    /// Lifetime in seconds, 1 to 2592000 (30 days), from the ledger's clock.
    pub ttl_secs: u64,
    /// `POST /v1/me/tokens` only: the agent the token is for (id or handle): the caller (absent)
    /// or one of its descendants.
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedTaskToken {
    pub token_id: String,
    /// The task token: `sct_<agent>_t<token id>_<secret>`. Shown only here; the ledger keeps its
    /// SHA-256.
    pub token: String,
    pub agent_id: String,
    pub task: String,
    pub expires_at_ms: u64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct TaskTokenView {
    pub token_id: String,
    pub agent_id: String,
    pub task: String,
    /// `active`, `expired` or `revoked` (the token, or its agent or an ancestor, revoked).
    pub state: String,
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    /// The agent that made it; `null`: the admin.
    pub created_by: Option<String>,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskTokenList {
    pub tokens: Vec<TaskTokenView>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RevokedTaskToken {
    pub token_id: String,
    /// True when it was revoked before (nothing changed).
    pub already_revoked: bool,
}

fn invalid(code: &'static str, detail: &str) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail.to_owned())
}

/// The routes here manage; a task token only pays.
fn own_token(auth: &AgentAuth) -> Result<(), ApiError> {
    if auth.is_task_token() {
        return Err(LedgerError::TaskTokenNotAllowed.into());
    }
    Ok(())
}

/// An error of a ledger call made for an authenticated agent: a token that does not match is
/// `invalid_token` (401), everything else as the ledger says.
fn scoped(err: LedgerError) -> ApiError {
    agent_scoped(err)
}

#[utoipa::path(post, path = "/v1/me/agents", request_body = CreateSubAgentRequest,
    responses((status = 201, body = CreatedAgent)), security(("agent" = [])))]
pub async fn create_sub_agent(
    auth: AgentAuth,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateSubAgentRequest>,
) -> Result<(StatusCode, Json<CreatedAgent>), ApiError> {
    own_token(&auth)?;
    if !new_handle_allowed(&req.handle) {
        return Err(invalid(
            "invalid_handle",
            "handle must be 1 to 64 characters of [a-z0-9_.-], and cannot look like an id \
             (no ag_, hd_ or sct_ prefix, not a tree id)",
        ));
    }
    let cap = cap_from(&req.cap_micros)?;
    let now = state.clock.now_ms();
    let expires_at_ms = match (req.expires_at_ms, req.ttl_secs) {
        (Some(_), Some(_)) => return Err(invalid("invalid_expiry", "give expires_at_ms or ttl_secs, not both")),
        (Some(at), None) if at <= now => return Err(invalid("invalid_expiry", "expires_at_ms is in the past")),
        (Some(at), None) => Some(at),
        (None, Some(0)) => return Err(invalid("invalid_expiry", "ttl_secs must be positive")),
        (None, Some(ttl)) => Some(now.saturating_add(ttl.saturating_mul(1000))),
        (None, None) => None,
    };
    if req.labels.len() > 32 || req.labels.iter().any(|(k, v)| k.len() > 64 || v.len() > 256) {
        return Err(invalid("invalid_labels", "at most 32 labels, keys up to 64 and values up to 256 bytes"));
    }
    let controls = req.controls.clone().unwrap_or_default().parse()?;
    let task_of = req.task.as_deref().map(|t| super::label("task", t, 128)).transpose()?;
    let id = AgentId::generate(auth.agent.tree());
    let token = AgentToken::generate(&id);
    let new = NewAgent {
        id: id.clone(),
        handle: req.handle,
        parent: Some(auth.agent.clone()),
        cap,
        expires_at_ms,
        labels: req.labels,
        token_hash: token.hash(),
    };
    // The ledger names the parent as `by` (`agent:<id>`) on the `create` entry.
    let setup = AgentSetup { controls: controls.controls, alerts: controls.alerts, task_of, ..AgentSetup::default() };
    state.ledger.create_sub_agent(now, &auth.caller(), &new, &setup).await.map_err(scoped)?;
    let agent = AgentView::load(&state, &id).await?;
    tracing::info!(agent = %id, parent = %auth.agent, cap = cap.get(), "sub-agent created by its parent");
    Ok((StatusCode::CREATED, Json(CreatedAgent { agent, token: token.reveal().to_owned() })))
}

/// The caller's descendants (not itself), from one read of its tree; the caller authenticated
/// (and its task token refused) first.
async fn descendants(state: &SharedState, auth: &AgentAuth) -> Result<Vec<AgentView>, ApiError> {
    own_token(auth)?;
    let now = state.clock.now_ms();
    state.ledger.balance(now, &auth.agent, &auth.caller()).await.map_err(scoped)?;
    let records = state.ledger.tree_agents(auth.agent.tree()).await?;
    let standings = standings_in(&records, now);
    let parents: BTreeMap<&AgentId, Option<&AgentId>> = records.iter().map(|r| (&r.id, r.parent.as_ref())).collect();
    let under = |id: &AgentId| {
        let mut at = parents.get(id).copied().flatten();
        for _ in 0..crate::ledger::MAX_DEPTH {
            match at {
                Some(p) if p == &auth.agent => return true,
                Some(p) => at = parents.get(p).copied().flatten(),
                None => return false,
            }
        }
        false
    };
    Ok(records
        .iter()
        .zip(&standings)
        .filter(|(r, _)| under(&r.id))
        .map(|(r, standing)| AgentView::new(r, standing))
        .collect())
}

#[utoipa::path(get, path = "/v1/me/agents", responses((status = 200, body = AgentList)), security(("agent" = [])))]
pub async fn list_sub_agents(auth: AgentAuth, State(state): State<SharedState>) -> Result<Json<AgentList>, ApiError> {
    Ok(Json(AgentList { agents: descendants(&state, &auth).await? }))
}

#[utoipa::path(post, path = "/v1/me/agents/{agent}/revoke", request_body = RevokeRequest,
    params(("agent" = String, Path, description = "a descendant's id or handle")),
    responses((status = 200, body = Revoked)), security(("agent" = [])))]
pub async fn revoke_sub_agent(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Revoked>, ApiError> {
    own_token(&auth)?;
    let id = resolve(&state, &agent).await?;
    let (revoked_at_ms, already) =
        state.ledger.revoke_by(state.clock.now_ms(), (&auth.agent, &auth.caller()), &id, &req.reason).await.map_err(
            |e| match e {
                LedgerError::InvalidArgument(detail) => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_reason", detail)
                }
                // The target does not exist in the caller's tree: as for any non-descendant.
                LedgerError::UnknownAgent => LedgerError::NotDescendant.into(),
                other => scoped(other),
            },
        )?;
    tracing::warn!(agent = %id, by = %auth.agent, reason = %req.reason, "sub-agent revoked by its ancestor");
    Ok(Json(Revoked { agent_id: id.to_string(), reason: req.reason, revoked_at_ms, already_revoked: already }))
}

fn checked_token_request(req: &CreateTaskTokenRequest) -> Result<(String, u64), ApiError> {
    let task = super::label("task", &req.task, 128)?;
    if task.is_empty() {
        return Err(invalid("invalid_task", "task must not be empty"));
    }
    if !(1..=MAX_TASK_TOKEN_TTL_SECS).contains(&req.ttl_secs) {
        return Err(invalid("invalid_ttl", "ttl_secs must be from 1 to 2592000 (30 days)"));
    }
    Ok((task, req.ttl_secs * 1000))
}

#[utoipa::path(post, path = "/v1/me/tokens", request_body = CreateTaskTokenRequest,
    responses((status = 201, body = CreatedTaskToken)), security(("agent" = [])))]
pub async fn create_my_token(
    auth: AgentAuth,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateTaskTokenRequest>,
) -> Result<(StatusCode, Json<CreatedTaskToken>), ApiError> {
    own_token(&auth)?;
    let (task, ttl_ms) = checked_token_request(&req)?;
    let agent = match &req.agent {
        Some(text) => resolve(&state, text).await?,
        None => auth.agent.clone(),
    };
    let token = AgentToken::generate_task(&agent);
    let expires_at_ms = state
        .ledger
        .create_task_token(state.clock.now_ms(), Some((&auth.agent, &auth.caller())), "", &agent, &token, &task, ttl_ms)
        .await
        .map_err(scoped)?;
    tracing::info!(agent = %agent, by = %auth.agent, %task, "task token created");
    Ok((StatusCode::CREATED, Json(created(&token, &agent, task, expires_at_ms))))
}

fn created(token: &AgentToken, agent: &AgentId, task: String, expires_at_ms: u64) -> CreatedTaskToken {
    CreatedTaskToken {
        token_id: token.task_token_id().unwrap_or_default().to_owned(),
        token: token.reveal().to_owned(),
        agent_id: agent.to_string(),
        task,
        expires_at_ms,
    }
}

/// The views of the task tokens of `agents` (with their standings: a revoked agent's tokens are
/// `revoked`).
async fn token_views(state: &SharedState, agents: &[(AgentId, AgentState)]) -> Result<Vec<TaskTokenView>, ApiError> {
    let now = state.clock.now_ms();
    let mut views = Vec::new();
    for (agent, agent_state) in agents {
        for t in state.ledger.task_tokens(agent).await? {
            views.push(view(&t, *agent_state, now));
        }
    }
    Ok(views)
}

fn view(t: &TaskTokenInfo, agent_state: AgentState, now: u64) -> TaskTokenView {
    let state = if t.revoked_at_ms.is_some() || agent_state == AgentState::Revoked {
        "revoked"
    } else if t.expires_at_ms <= now {
        "expired"
    } else {
        "active"
    };
    TaskTokenView {
        token_id: t.id.clone(),
        agent_id: t.agent.to_string(),
        task: t.task.clone(),
        state: state.to_owned(),
        expires_at_ms: t.expires_at_ms,
        created_at_ms: t.created_at_ms,
        created_by: t.by.clone(),
        revoked_at_ms: t.revoked_at_ms,
    }
}

#[utoipa::path(get, path = "/v1/me/tokens", responses((status = 200, body = TaskTokenList)), security(("agent" = [])))]
pub async fn list_my_tokens(
    auth: AgentAuth,
    State(state): State<SharedState>,
) -> Result<Json<TaskTokenList>, ApiError> {
    let below = descendants(&state, &auth).await?;
    let (_, me) = state.ledger.standing(state.clock.now_ms(), &auth.agent).await?;
    let mut agents = vec![(auth.agent.clone(), me.state)];
    for v in below {
        if let Ok(id) = v.id.parse() {
            agents.push((id, v.state));
        }
    }
    Ok(Json(TaskTokenList { tokens: token_views(&state, &agents).await? }))
}

#[utoipa::path(delete, path = "/v1/me/tokens/{token}",
    params(("token" = String, Path, description = "the task token's id (16 hex)")),
    responses((status = 200, body = RevokedTaskToken)), security(("agent" = [])))]
pub async fn revoke_my_token(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(token): Path<String>,
) -> Result<Json<RevokedTaskToken>, ApiError> {
    own_token(&auth)?;
    let already = state
        .ledger
        .revoke_task_token(
            state.clock.now_ms(),
            Some((&auth.agent, &auth.caller())),
            "",
            auth.agent.tree(),
            &token,
            None,
        )
        .await
        .map_err(scoped)?;
    tracing::info!(token_id = %token, by = %auth.agent, "task token revoked");
    Ok(Json(RevokedTaskToken { token_id: token, already_revoked: already }))
}

#[utoipa::path(post, path = "/v1/agents/{agent}/tokens", request_body = CreateTaskTokenRequest,
    params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 201, body = CreatedTaskToken)), security(("admin" = [])))]
pub async fn create_agent_token(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<CreateTaskTokenRequest>,
) -> Result<(StatusCode, Json<CreatedTaskToken>), ApiError> {
    if req.agent.is_some() {
        return Err(invalid("invalid_body", "the agent is the one in the path"));
    }
    let (task, ttl_ms) = checked_token_request(&req)?;
    let id = who.resolve(&state, &agent).await?;
    let token = AgentToken::generate_task(&id);
    let expires_at_ms =
        state.ledger.create_task_token(state.clock.now_ms(), None, &who.name, &id, &token, &task, ttl_ms).await?;
    tracing::info!(agent = %id, %task, by = %who.name, "task token created by the admin");
    Ok((StatusCode::CREATED, Json(created(&token, &id, task, expires_at_ms))))
}

#[utoipa::path(get, path = "/v1/agents/{agent}/tokens", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = TaskTokenList)), security(("admin" = [])))]
pub async fn list_agent_tokens(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<TaskTokenList>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let (_, standing) = state.ledger.standing(state.clock.now_ms(), &id).await?;
    Ok(Json(TaskTokenList { tokens: token_views(&state, &[(id, standing.state)]).await? }))
}

#[utoipa::path(delete, path = "/v1/agents/{agent}/tokens/{token}",
    params(("agent" = String, Path, description = "agent id or handle"), ("token" = String, Path, description = "the task token's id")),
    responses((status = 200, body = RevokedTaskToken)), security(("admin" = [])))]
pub async fn revoke_agent_token(
    who: Principal,
    State(state): State<SharedState>,
    Path((agent, token)): Path<(String, String)>,
) -> Result<Json<RevokedTaskToken>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let already =
        state.ledger.revoke_task_token(state.clock.now_ms(), None, &who.name, id.tree(), &token, Some(&id)).await?;
    tracing::info!(agent = %id, token_id = %token, by = %who.name, "task token revoked by the admin");
    Ok(Json(RevokedTaskToken { token_id: token, already_revoked: already }))
}
