//! Task outcomes (agents or their orchestrator say how a task ended) and the cost report.

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{agent_scoped, bearer, label, ApiError, ApiJson, SharedState};
use crate::identity::{AgentId, AgentToken};
use crate::ledger::{Caller, TaskOutcome};
use crate::log::LogFilter;
use crate::report::Report;

pub fn router() -> Router<SharedState> {
    Router::new().route("/v1/tasks/{task}/outcome", post(record_outcome)).route("/v1/reports", get(reports))
}

/// An admin-side principal (allowed this route by its role), or an agent by its own token.
pub enum AdminOrAgent {
    Admin(super::Principal),
    Agent(AgentId, Caller),
}

impl FromRequestParts<SharedState> for AdminOrAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<AdminOrAgent, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        if state.admin.verify(token) || token.starts_with(crate::operators::OperatorToken::PREFIX) {
            return Ok(AdminOrAgent::Admin(super::Principal::from_request_parts(parts, state).await?));
        }
        let token: AgentToken = token.parse().map_err(|_| ApiError::unauthorized())?;
        Ok(AdminOrAgent::Agent(token.agent().clone(), Caller::Agent(token.hash())))
    }
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutcomeRequest {
    /// `success`, `failed` or `abandoned`.
    pub outcome: TaskOutcome,
    /// What kind of task it was, e.g. `research`, `enrichment`, `booking`.
    pub task_type: String,
    /// The agent whose task it is (id or handle): required with the admin token; with an agent
    /// token it may only name that agent.
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct OutcomeView {
    pub agent: String,
    pub task: String,
    pub task_type: String,
    pub outcome: TaskOutcome,
}

/// Marks a task finished: one `outcome` log entry (no balance changes). A later outcome of the
/// same task supersedes an earlier one in the reports.
#[utoipa::path(post, path = "/v1/tasks/{task}/outcome", request_body = OutcomeRequest,
    params(("task" = String, Path, description = "the task label the agent's holds carried")),
    responses((status = 200, body = OutcomeView), (status = 422, description = "invalid_label, agent_required")),
    security(("admin" = []), ("agent" = [])))]
pub async fn record_outcome(
    who: AdminOrAgent,
    State(state): State<SharedState>,
    Path(task): Path<String>,
    ApiJson(body): ApiJson<OutcomeRequest>,
) -> Result<Json<OutcomeView>, ApiError> {
    let task = label("task", &task, 128)?;
    let task_type = label("task_type", &body.task_type, 64)?;
    if task.is_empty() || task_type.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_label",
            "task and task_type are required",
        ));
    }
    let (agent, caller) = match who {
        AdminOrAgent::Admin(who) => {
            let named = body.agent.as_deref().ok_or_else(|| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "agent_required", "name the agent whose task it is")
            })?;
            (who.resolve(&state, named).await?, Caller::Principal(who.name.clone()))
        }
        AdminOrAgent::Agent(agent, caller) => {
            if let Some(named) = body.agent.as_deref() {
                if named != agent.as_str() {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "not_own_task",
                        "an agent token can record outcomes of its own tasks only",
                    ));
                }
            }
            // The token first (an unknown one is 401, as everywhere), then revocation.
            state.ledger.balance(state.clock.now_ms(), &agent, &caller).await.map_err(agent_scoped)?;
            crate::api::refuse_if_revoked(&state, &agent).await?;
            (agent, caller)
        }
    };
    state
        .ledger
        .task_outcome(state.clock.now_ms(), &agent, &caller, &task, &task_type, body.outcome)
        .await
        .map_err(agent_scoped)?;
    state.metrics.outcome(body.outcome.code());
    Ok(Json(OutcomeView { agent: agent.to_string(), task, task_type, outcome: body.outcome }))
}

#[derive(Deserialize, Clone, Copy, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    #[default]
    Json,
    Csv,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    #[serde(default)]
    pub format: ReportFormat,
    /// Only this agent (id or handle).
    pub agent: Option<String>,
    /// Entries at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Entries before this time.
    pub until_ms: Option<u64>,
}

/// Cost per task type (success, failure, spread, suggested cap next to the cap in force), spend
/// by agent, service and protocol, refusals by reason, for any time range.
#[utoipa::path(get, path = "/v1/reports", params(ReportQuery),
    responses((status = 200, description = "JSON, or CSV with format=csv", content((Report = "application/json"), (String = "text/csv")))), security(("admin" = [])))]
pub async fn reports(
    who: super::Principal,
    State(state): State<SharedState>,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let mut filter = LogFilter {
        since_ms: query.since_ms,
        until_ms: query.until_ms,
        tree: who.tree.clone(),
        ..LogFilter::default()
    };
    if let Some(agent) = query.agent.as_deref() {
        filter.agent = Some(who.resolve(&state, agent).await?.to_string());
    }
    let report = crate::report::report(&state.ledger, filter).await?;
    Ok(match query.format {
        ReportFormat::Json => Json(report).into_response(),
        ReportFormat::Csv => {
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], crate::report::csv(&report)).into_response()
        }
    })
}
