//! Who is calling an admin route, and may they: the `Principal` extractor over the one table of
//! admin routes ([`ROUTES`]: method + path → [`Action`]; the role table is `roles.rs`), and the
//! operator-token routes (`/v1/operators`, `/v1/whoami`).
//!
//! A route missing from [`ROUTES`] is admin-only (an unscoped admin: the bootstrap token or an
//! `admin` operator token without a tree): the safe default for routes added later.

use axum::extract::{FromRequestParts, MatchedPath, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{bearer, ApiError, ApiJson, SharedState};
use crate::identity::{AgentId, AgentToken, TreeId};
use crate::ledger::LedgerError;
use crate::operators::{NewOperator, OperatorToken};
use crate::roles::{self, Action, Actor, Grant, Role};

/// Every admin route and the one action it is. `tests/it/roles.rs` runs every role against every
/// row; the README's roles table is this table (`roles::the_readme_roles_table_is_the_routes_table`).
#[rustfmt::skip]
pub const ROUTES: &[(&str, &str, Action)] = &[
    ("get", "/metrics", Action::ReadFleet),
    ("get", "/v1/whoami", Action::Read),
    ("get", "/v1/dashboard/session", Action::Read),
    ("get", "/v1/events", Action::Read),
    ("get", "/v1/events/recent", Action::Read),
    ("get", "/v1/reports/series", Action::ReadFleet),
    ("get", "/v1/agents", Action::Read),
    ("get", "/v1/agents/{agent}", Action::Read),
    ("get", "/v1/agents/{agent}/controls", Action::Read),
    ("get", "/v1/agents/{agent}/periods", Action::Read),
    ("get", "/v1/holds", Action::Read),
    ("get", "/v1/log", Action::Read),
    ("get", "/v1/spend", Action::Read),
    ("get", "/v1/receipts", Action::Read),
    ("get", "/v1/reports", Action::Read),
    ("get", "/v1/ap2/agents/{agent}/key", Action::Read),
    ("get", "/v1/operators", Action::ReadFleet),
    ("get", "/v1/agents/{agent}/tokens", Action::Read),
    ("get", "/v1/approvals", Action::Read),
    ("get", "/v1/approvals/{id}", Action::Read),
    ("post", "/v1/agents/{agent}/revoke", Action::Revoke),
    ("post", "/v1/agents/{agent}/reinstate", Action::Reinstate),
    ("delete", "/v1/agents/{agent}/tokens/{token}", Action::Revoke),
    ("post", "/v1/approvals/{id}/approve", Action::DecideApproval),
    ("post", "/v1/approvals/{id}/deny", Action::DecideApproval),
    ("post", "/v1/tasks/{task}/outcome", Action::RecordOutcome),
    ("put", "/v1/agents/{agent}/cap", Action::SetCap),
    ("put", "/v1/agents/{agent}/controls", Action::SetControls),
    ("put", "/v1/agents/{agent}/expiry", Action::SetExpiry),
    ("post", "/v1/agents", Action::CreateAgent),
    ("post", "/v1/agents/{agent}/archive", Action::Archive),
    ("post", "/v1/agents/{agent}/rotate-token", Action::RotateToken),
    ("post", "/v1/agents/{agent}/tokens", Action::MintTaskToken),
    ("post", "/v1/holds/{hold}/resolve", Action::ResolveHold),
    ("post", "/v1/ap2/agents/{agent}/mandates", Action::RegisterMandates),
    ("post", "/v1/operators", Action::ManageOperators),
    ("post", "/v1/operators/{name}/revoke", Action::ManageOperators),
];

/// The action of `method path` (a route template), `None` for a route not in [`ROUTES`].
pub fn action_of(method: &str, path: &str) -> Option<Action> {
    ROUTES.iter().find(|(m, p, _)| m.eq_ignore_ascii_case(method) && *p == path).map(|(_, _, a)| *a)
}

/// Actions about every tree at once, or about no tree: refused to a token limited to one tree.
fn global(action: Action) -> bool {
    matches!(action, Action::ReadFleet | Action::ManageOperators)
}

/// Whether `who` may take `action` at all (`None`: a route outside the table, admin-only).
pub fn allowed(who: &roles::Principal, action: Option<Action>) -> bool {
    match action {
        None => who.role == Role::Admin && who.tree.is_none(),
        Some(action) => who.role.grant(action) != Grant::No && !(who.tree.is_some() && global(action)),
    }
}

fn role_forbidden(who: &roles::Principal, action: Option<Action>) -> ApiError {
    let what = action.map_or("use this route", Action::as_str);
    let scope = if who.tree.is_some() { " (a token limited to one budget tree)" } else { "" };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "role_forbidden",
        format!("the {} role{scope} may not {what}; see GET /v1/whoami", who.role),
    )
}

/// The principal a bearer token stands for: the bootstrap admin token, or a live operator token
/// (read from the ledger on every request, so a revocation stops it at once on every instance).
/// An agent token is `403 admin_only`; anything else `401 invalid_token`.
pub async fn authenticate(state: &SharedState, token: &str) -> Result<roles::Principal, ApiError> {
    if state.admin.verify(token) {
        return Ok(roles::Principal::bootstrap());
    }
    if let Ok(presented) = token.parse::<OperatorToken>() {
        let record = state.ledger.operator(presented.id()).await?;
        return record.and_then(|r| r.authenticate(&presented)).ok_or_else(ApiError::unauthorized);
    }
    if token.parse::<AgentToken>().is_ok() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "admin_only", "this endpoint needs the admin token"));
    }
    Err(ApiError::unauthorized())
}

/// An authenticated admin-side caller, allowed this route's action by its role.
#[derive(Clone, Debug)]
pub struct Principal {
    pub who: roles::Principal,
    /// The route's action (`None`: a route outside [`ROUTES`]).
    pub action: Option<Action>,
}

impl std::ops::Deref for Principal {
    type Target = roles::Principal;
    fn deref(&self) -> &roles::Principal {
        &self.who
    }
}

impl Principal {
    /// Authenticates `token` and checks it may take the action of `method path`.
    pub async fn of_token(state: &SharedState, token: &str, method: &str, path: &str) -> Result<Principal, ApiError> {
        let who = authenticate(state, token).await?;
        let action = action_of(method, path);
        if !allowed(&who, action) {
            return Err(role_forbidden(&who, action));
        }
        Ok(Principal { who, action })
    }

    /// The actor of this route's change, for the ledger: `by`, and tighten-only when the role
    /// may only tighten.
    pub fn actor(&self) -> Actor {
        match self.action {
            Some(action) => self.who.actor(action),
            None => Actor { by: self.who.name.clone(), tighten_only: false },
        }
    }

    /// Finds an agent by id or handle, as [`super::agents::resolve`] does; an agent of a tree
    /// this token may not see is `404 unknown_agent`, as if it did not exist.
    pub async fn resolve(&self, state: &SharedState, text: &str) -> Result<AgentId, ApiError> {
        let id = super::agents::resolve(state, text).await?;
        if !self.sees(id.tree()) {
            return Err(LedgerError::UnknownAgent.into());
        }
        Ok(id)
    }

    /// The budget trees this token sees.
    pub async fn trees(&self, state: &SharedState) -> Result<Vec<TreeId>, LedgerError> {
        let mut trees = state.ledger.trees().await?;
        trees.retain(|t| self.sees(t));
        Ok(trees)
    }

    /// What this token may do, for `/v1/whoami` and the dashboard session.
    pub fn actions(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut actions = Vec::new();
        let mut tighten_only = Vec::new();
        for action in Action::ALL {
            if !allowed(&self.who, Some(action)) {
                continue;
            }
            actions.push(action.as_str());
            if self.who.role.grant(action) == Grant::TightenOnly {
                tighten_only.push(action.as_str());
            }
        }
        (actions, tighten_only)
    }
}

impl FromRequestParts<SharedState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Principal, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?.to_owned();
        let path = parts.extensions.get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
        Principal::of_token(state, &token, parts.method.as_str(), &path).await
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/operators", post(create).get(list))
        .route("/v1/operators/{name}/revoke", post(revoke))
        .route("/v1/whoami", get(whoami))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOperatorRequest {
    /// Unique (also after a revocation), 1 to 64 characters of `[a-z0-9_.-]`, not `admin`.
    pub name: String,
    pub role: Role,
    /// Limit the token to one budget tree: any agent of it (id or handle), usually its root.
    #[serde(default)]
    pub tree: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct OperatorView {
    pub name: String,
    pub role: Role,
    /// The budget tree (its id) the token is limited to; `null`: every tree.
    pub tree: Option<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    pub revoked_at_ms: Option<u64>,
}

impl From<&crate::operators::OperatorRecord> for OperatorView {
    fn from(r: &crate::operators::OperatorRecord) -> OperatorView {
        OperatorView {
            name: r.name.clone(),
            role: r.role,
            tree: r.tree.as_ref().map(ToString::to_string),
            created_at_ms: r.created_at_ms,
            created_by: r.created_by.clone(),
            revoked_at_ms: r.revoked_at_ms,
        }
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct CreatedOperator {
    #[serde(flatten)]
    pub operator: OperatorView,
    /// The bearer token (`sco_op_…`), shown only in this answer.
    pub token: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct OperatorList {
    pub operators: Vec<OperatorView>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct RevokedOperator {
    pub name: String,
    pub revoked_at_ms: u64,
    pub already_revoked: bool,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The operator's name; `admin` for the bootstrap admin token.
    pub name: String,
    pub role: Role,
    /// The budget tree the token is limited to; `null`: every tree.
    pub tree: Option<String>,
    /// The actions this token may take (see the README's roles table).
    pub actions: Vec<String>,
    /// Of those, the ones it may take only in the tightening direction (lower a cap, an earlier
    /// expiry, controls no looser than the current ones).
    pub tighten_only: Vec<String>,
}

/// Creates an operator token with a role, optionally limited to one budget tree. The token is in
/// this answer only; the ledger keeps its SHA-256.
#[utoipa::path(post, path = "/v1/operators", operation_id = "create_operator", request_body = CreateOperatorRequest,
    responses((status = 201, body = CreatedOperator)), security(("admin" = [])))]
pub async fn create(
    who: Principal,
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CreateOperatorRequest>,
) -> Result<(StatusCode, Json<CreatedOperator>), ApiError> {
    if !crate::operators::valid_name(&req.name) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "name must be 1 to 64 characters of [a-z0-9_.-], and not `admin`",
        ));
    }
    let tree = match &req.tree {
        Some(agent) => {
            let id = who.resolve(&state, agent).await?;
            // The agent must exist: a token limited to a tree nobody has is a mistake.
            state.ledger.agent(&id).await?;
            Some(id.tree().clone())
        }
        None => None,
    };
    let token = OperatorToken::generate();
    let new = NewOperator { id: token.id().to_owned(), name: req.name, role: req.role, tree, token_hash: token.hash() };
    let now = state.clock.now_ms();
    state.ledger.create_operator(now, &new, &who.name).await?;
    let record = state.ledger.operator(token.id()).await?.ok_or_else(|| ApiError::internal("operator not stored"))?;
    tracing::info!(operator = %record.name, role = %record.role, by = %who.name, "operator token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedOperator { operator: OperatorView::from(&record), token: token.reveal().to_owned() }),
    ))
}

/// Every operator (revoked ones too), never with its token or the token's hash.
#[utoipa::path(get, path = "/v1/operators", operation_id = "list_operators", responses((status = 200, body = OperatorList)), security(("admin" = [])))]
pub async fn list(_: Principal, State(state): State<SharedState>) -> Result<Json<OperatorList>, ApiError> {
    let operators = state.ledger.operators().await?;
    Ok(Json(OperatorList { operators: operators.iter().map(OperatorView::from).collect() }))
}

/// Revokes an operator token: it stops at once, on every instance.
#[utoipa::path(post, path = "/v1/operators/{name}/revoke", operation_id = "revoke_operator", params(("name" = String, Path, description = "the operator's name")),
    responses((status = 200, body = RevokedOperator)), security(("admin" = [])))]
pub async fn revoke(
    who: Principal,
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Json<RevokedOperator>, ApiError> {
    let (revoked_at_ms, already) = state.ledger.revoke_operator(state.clock.now_ms(), &name, &who.name).await?;
    tracing::warn!(operator = %name, by = %who.name, "operator token revoked");
    Ok(Json(RevokedOperator { name, revoked_at_ms, already_revoked: already }))
}

/// The caller's name, role, tree and allowed actions.
#[utoipa::path(get, path = "/v1/whoami", responses((status = 200, body = WhoAmI)), security(("admin" = [])))]
pub async fn whoami(who: Principal) -> Json<WhoAmI> {
    let (actions, tighten_only) = who.actions();
    Json(WhoAmI {
        name: who.name.clone(),
        role: who.role,
        tree: who.tree.as_ref().map(ToString::to_string),
        actions: actions.into_iter().map(str::to_owned).collect(),
        tighten_only: tighten_only.into_iter().map(str::to_owned).collect(),
    })
}
