//! Admin routes for agents: create, list, show, change cap, revoke, rotate token.

use std::collections::BTreeMap;

use adapters::Micros;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiJson, Principal, SharedState};
use crate::identity::{AgentId, AgentToken, TreeId};
use crate::ledger::standing::standings_in;
use crate::ledger::{AgentRecord, AgentRef, AgentSetup, AgentState, Caller, LedgerError, NewAgent, Standing};

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/agents", post(create_agent).get(list_agents))
        .route("/v1/agents/{agent}", get(show_agent))
        .route("/v1/agents/{agent}/cap", put(set_cap))
        .route("/v1/agents/{agent}/revoke", post(revoke))
        .route("/v1/agents/{agent}/rotate-token", post(rotate_token))
        .route("/v1/agents/{agent}/archive", post(archive))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// Unique, 1 to 64 characters of `[a-z0-9_.-]`.
    pub handle: String,
    /// The hard cap, in micro-USD (1 USD = 1,000,000).
    #[schema(value_type = u64)]
    pub cap_micros: serde_json::Number,
    /// The parent agent (id or handle): the new agent joins its budget tree and every hold is
    /// charged to both.
    #[serde(default)]
    pub parent: Option<String>,
    /// Absolute expiry (ms since the epoch); holds after it are refused with `agent_expired`.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Time to live in seconds from now (instead of `expires_at_ms`).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Spending controls (see `PUT /v1/agents/{agent}/controls`); absent: the default
    /// runaway-loop breaker and alerts at 50, 80 and 100 %.
    #[serde(default)]
    pub controls: Option<super::controls::ControlsBody>,
    /// Create a sub-agent for this task of its parent: its holds spend what remains of the
    /// parent's per-task budget for it.
    #[serde(default)]
    pub task: Option<String>,
}

/// An agent as the admin sees it. `state` and the `revoked`, `suspended` and `expires_at_ms`
/// fields are effective: they count the agent's ancestors, as a hold does (a sub-agent of a
/// revoked agent is `revoked`, with `revoked_via` naming the ancestor); see
/// `ledger::standing`.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct AgentView {
    pub id: String,
    pub handle: String,
    pub parent: Option<String>,
    pub tree: String,
    pub depth: u32,
    pub cap_micros: u64,
    pub spent_micros: u64,
    pub held_micros: u64,
    /// The agent's own cap - spent - held.
    pub remaining_micros: u64,
    /// Whether the agent can pay now: `active`, `revoked`, `suspended` or `expired` (the hold's
    /// order of precedence), counting every ancestor.
    pub state: AgentState,
    /// The ancestor whose state `state` is, when it is not the agent's own.
    #[serde(default)]
    pub state_via: Option<AgentRef>,
    /// The revocation reason of the agent or its nearest revoked ancestor.
    pub revoked: Option<String>,
    pub revoked_at_ms: Option<u64>,
    /// The ancestor `revoked` comes from (`null`: the agent's own, or not revoked).
    #[serde(default)]
    pub revoked_via: Option<AgentRef>,
    /// The earliest expiry of the agent and its ancestors.
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub expires_via: Option<AgentRef>,
    pub created_at_ms: u64,
    pub labels: BTreeMap<String, String>,
    /// Why the agent (or its nearest suspended ancestor) is suspended (`velocity`, `repeat`);
    /// `POST …/reinstate` on that agent lifts it.
    #[serde(default)]
    pub suspended: Option<String>,
    #[serde(default)]
    pub suspended_at_ms: Option<u64>,
    #[serde(default)]
    pub suspended_via: Option<AgentRef>,
    /// The parent's task this sub-agent works on.
    #[serde(default)]
    pub task_of: Option<String>,
    /// When it was archived: revoked for good, its handle free for a new agent, history kept.
    #[serde(default)]
    pub archived_at_ms: Option<u64>,
}

impl AgentView {
    /// The view of `r` with its effective `standing` (from `Standing::of` over its lineage).
    pub fn new(r: &AgentRecord, standing: &Standing) -> AgentView {
        AgentView {
            id: r.id.to_string(),
            handle: r.handle.clone(),
            parent: r.parent.as_ref().map(AgentId::to_string),
            tree: r.id.tree().to_string(),
            depth: r.depth,
            cap_micros: r.cap.get(),
            spent_micros: r.spent.get(),
            held_micros: r.held.get(),
            remaining_micros: r.cap.get().saturating_sub(r.spent.get() + r.held.get()),
            state: standing.state,
            state_via: standing.via.clone(),
            revoked: standing.revoked.as_ref().map(|x| x.reason.clone()),
            revoked_at_ms: standing.revoked.as_ref().and_then(|x| x.at_ms),
            revoked_via: standing.revoked.as_ref().and_then(|x| x.via.clone()),
            expires_at_ms: standing.expires.as_ref().map(|x| x.at_ms),
            expires_via: standing.expires.as_ref().and_then(|x| x.via.clone()),
            created_at_ms: r.created_at_ms,
            labels: r.labels.clone(),
            suspended: standing.suspended.as_ref().map(|x| x.reason.clone()),
            suspended_at_ms: standing.suspended.as_ref().and_then(|x| x.at_ms),
            suspended_via: standing.suspended.as_ref().and_then(|x| x.via.clone()),
            task_of: r.task_of.clone(),
            archived_at_ms: r.archived_at_ms,
        }
    }

    /// Reads the agent and its ancestors and builds its view.
    pub async fn load(state: &SharedState, id: &AgentId) -> Result<AgentView, ApiError> {
        let (lineage, standing) = state.ledger.standing(state.clock.now_ms(), id).await?;
        Ok(AgentView::new(&lineage[0], &standing))
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedAgent {
    pub agent: AgentView,
    /// The agent's bearer token. Shown only here; spendcap keeps only its SHA-256.
    pub token: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCapRequest {
    #[schema(value_type = u64)]
    pub cap_micros: serde_json::Number,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A reason code, 1 to 64 characters of `[A-Za-z0-9_.-]`, e.g. `runaway_loop`.
    pub reason: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub agent_id: String,
    pub reason: String,
    pub revoked_at_ms: u64,
    /// True when the agent was already revoked (nothing changed).
    pub already_revoked: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Archived {
    pub agent_id: String,
    /// The handle it had; free for a new agent now.
    pub handle: String,
    pub archived_at_ms: u64,
    /// True when the agent was already archived (nothing changed).
    pub already_archived: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RotatedToken {
    pub agent_id: String,
    pub token: String,
}

fn valid_handle(handle: &str) -> bool {
    (1..=64).contains(&handle.len())
        && handle.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Prefixes of ids and tokens: a handle that starts with one could be taken for an id (an admin
/// action naming it would hit another agent), so none does.
const ID_PREFIXES: [&str; 3] = ["ag_", "hd_", "sct_"];

/// Whether a new agent may take this handle: the handle syntax, and nothing an id could be.
pub(crate) fn new_handle_allowed(handle: &str) -> bool {
    valid_handle(handle)
        && !ID_PREFIXES.iter().any(|prefix| handle.starts_with(prefix))
        && handle.parse::<AgentId>().is_err()
        && handle.parse::<crate::identity::TreeId>().is_err()
}

/// Finds an agent by id (`ag_…`) or handle.
pub async fn resolve(state: &SharedState, text: &str) -> Result<AgentId, ApiError> {
    if let Ok(id) = text.parse::<AgentId>() {
        return Ok(id);
    }
    if !valid_handle(text) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_agent", "no such agent"));
    }
    Ok(state.ledger.agent_by_handle(text).await?)
}

pub(crate) fn cap_from(number: &serde_json::Number) -> Result<Micros, ApiError> {
    Micros::from_json_number(number)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string()))
}

#[utoipa::path(post, path = "/v1/agents", request_body = CreateAgentRequest,
    responses((status = 201, body = CreatedAgent), (status = 409, description = "handle taken")),
    security(("admin" = [])))]
pub async fn create_agent(
    who: Principal,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateAgentRequest>,
) -> Result<(StatusCode, Json<CreatedAgent>), ApiError> {
    if !new_handle_allowed(&req.handle) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_handle",
            "handle must be 1 to 64 characters of [a-z0-9_.-], and cannot look like an id \
             (no ag_, hd_ or sct_ prefix, not a tree id)",
        ));
    }
    let cap = cap_from(&req.cap_micros)?;
    let now = state.clock.now_ms();
    let expires_at_ms = match (req.expires_at_ms, req.ttl_secs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_expiry",
                "give expires_at_ms or ttl_secs, not both",
            ))
        }
        (Some(at), None) if at <= now => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_expiry",
                "expires_at_ms is in the past",
            ))
        }
        (Some(at), None) => Some(at),
        (None, Some(0)) => {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_expiry", "ttl_secs must be positive"))
        }
        (None, Some(ttl)) => Some(now.saturating_add(ttl.saturating_mul(1000))),
        (None, None) => None,
    };
    if req.labels.len() > 32 || req.labels.iter().any(|(k, v)| k.len() > 64 || v.len() > 256) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_labels",
            "at most 32 labels, keys up to 64 and values up to 256 bytes",
        ));
    }
    let setup_controls = req.controls.clone().unwrap_or_default().parse()?;
    let task_of = match &req.task {
        Some(_) if req.parent.is_none() => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_task",
                "only a sub-agent (with a parent) can be created for a task",
            ))
        }
        Some(task) => Some(super::label("task", task, 128)?),
        None => None,
    };
    if who.tree.is_some() && req.parent.is_none() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "role_forbidden",
            "a token limited to one budget tree creates agents only under a parent in that tree",
        ));
    }
    let parent = match &req.parent {
        Some(p) => Some(who.resolve(&state, p).await.map_err(|e| {
            if e.code == "unknown_agent" {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_parent", "the parent agent does not exist")
            } else {
                e
            }
        })?),
        None => None,
    };
    let tree = parent.as_ref().map(|p| p.tree().clone()).unwrap_or_else(TreeId::generate);
    let id = AgentId::generate(&tree);
    let token = AgentToken::generate(&id);
    let new = NewAgent {
        id: id.clone(),
        handle: req.handle,
        parent,
        cap,
        expires_at_ms,
        labels: req.labels,
        token_hash: token.hash(),
    };
    let setup =
        AgentSetup { by: who.name.clone(), controls: setup_controls.controls, alerts: setup_controls.alerts, task_of };
    state.ledger.create_agent_with(now, &new, &setup).await?;
    let agent = AgentView::load(&state, &id).await?;
    tracing::info!(agent = %id, handle = %agent.handle, cap = cap.get(), "agent created");
    Ok((StatusCode::CREATED, Json(CreatedAgent { agent, token: token.reveal().to_owned() })))
}

#[utoipa::path(get, path = "/v1/agents", responses((status = 200, body = AgentList)), security(("admin" = [])))]
pub async fn list_agents(who: Principal, State(state): State<SharedState>) -> Result<Json<AgentList>, ApiError> {
    let mut agents = Vec::new();
    for tree in who.trees(&state).await? {
        // Bring balances up to date (release due holds) before showing them.
        state.ledger.expire(state.clock.now_ms(), &tree).await?;
        let records = state.ledger.tree_agents(&tree).await?;
        let standings = standings_in(&records, state.clock.now_ms());
        agents.extend(records.iter().zip(&standings).map(|(record, standing)| AgentView::new(record, standing)));
    }
    Ok(Json(AgentList { agents }))
}

#[utoipa::path(get, path = "/v1/agents/{agent}", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = AgentView), (status = 404, description = "unknown agent")), security(("admin" = [])))]
pub async fn show_agent(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    state.ledger.balance(state.clock.now_ms(), &id, &Caller::Admin).await?;
    Ok(Json(AgentView::load(&state, &id).await?))
}

#[utoipa::path(put, path = "/v1/agents/{agent}/cap", request_body = SetCapRequest, params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = AgentView), (status = 409, description = "cap below spent + held")), security(("admin" = [])))]
pub async fn set_cap(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<SetCapRequest>,
) -> Result<Json<AgentView>, ApiError> {
    let cap = cap_from(&req.cap_micros)?;
    let id = who.resolve(&state, &agent).await?;
    let previous = state.ledger.set_cap_as(state.clock.now_ms(), &id, cap, &who.actor()).await?;
    tracing::info!(agent = %id, previous = previous.get(), cap = cap.get(), "cap changed");
    Ok(Json(AgentView::load(&state, &id).await?))
}

#[utoipa::path(post, path = "/v1/agents/{agent}/revoke", request_body = RevokeRequest, params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = Revoked)), security(("admin" = [])))]
pub async fn revoke(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<Revoked>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let (revoked_at_ms, already) =
        state.ledger.revoke_as(state.clock.now_ms(), &id, &req.reason, &who.actor()).await.map_err(|e| match e {
            LedgerError::InvalidArgument(detail) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_reason", detail)
            }
            other => other.into(),
        })?;
    tracing::warn!(agent = %id, reason = %req.reason, "agent revoked");
    Ok(Json(Revoked { agent_id: id.to_string(), reason: req.reason, revoked_at_ms, already_revoked: already }))
}

#[utoipa::path(post, path = "/v1/agents/{agent}/archive", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = Archived)), security(("admin" = [])))]
pub async fn archive(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<Archived>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let (archived_at_ms, already, handle) = state.ledger.archive_as(state.clock.now_ms(), &id, &who.actor()).await?;
    tracing::info!(agent = %id, %handle, "agent archived");
    Ok(Json(Archived { agent_id: id.to_string(), handle, archived_at_ms, already_archived: already }))
}

#[utoipa::path(post, path = "/v1/agents/{agent}/rotate-token", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = RotatedToken)), security(("admin" = [])))]
pub async fn rotate_token(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<RotatedToken>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let token = AgentToken::generate(&id);
    state.ledger.rotate_token_as(state.clock.now_ms(), &id, &token.hash(), &who.actor()).await?;
    tracing::info!(agent = %id, "agent token rotated");
    Ok(Json(RotatedToken { agent_id: id.to_string(), token: token.reveal().to_owned() }))
}
