//! `GET /v1/me/budget`: an agent's whole budget as it applies now — its balance, what is left of
//! each period limit and, for one task, that task's spend against its per-task cap. What the MCP
//! `get_budget` tool shows.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{agent_scoped, label, AgentAuth, ApiError, SharedState};
use crate::ledger::controls::Period;

pub fn router() -> Router<SharedState> {
    Router::new().route("/v1/me/budget", get(budget))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BudgetQuery {
    /// A task label: add that task's spend and what is left of its per-task cap, if the agent has
    /// one.
    pub task: Option<String>,
}

/// A period limit that applies to the agent now.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PeriodBudget {
    pub period: Period,
    pub start_ms: u64,
    /// `null` for `all_time`.
    pub end_ms: Option<u64>,
    pub limit_micros: u64,
    pub spent_micros: u64,
    pub held_micros: u64,
    /// `limit - spent - held`, at least 0.
    pub remaining_micros: u64,
}

/// One task's spend against the agent's per-task cap.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct TaskBudget {
    pub task: String,
    pub spent_micros: u64,
    pub held_micros: u64,
    pub cap_micros: u64,
    /// `cap - spent - held`, at least 0.
    pub remaining_micros: u64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct BudgetView {
    pub agent_id: String,
    pub cap_micros: u64,
    pub spent_micros: u64,
    pub held_micros: u64,
    /// The agent's own cap - spent - held.
    pub remaining_micros: u64,
    /// What the agent can hold now, counting every ancestor's cap and state (0 when it or an
    /// ancestor is revoked, suspended or expired).
    pub available_micros: u64,
    /// The agent or ancestor whose cap (or state, when not active) bounds `available_micros`.
    pub limited_by: String,
    /// `active`, `revoked`, `suspended` or `expired`, counting every ancestor (as `/v1/me`).
    pub state: crate::ledger::AgentState,
    /// The revocation reason of the agent or its nearest revoked ancestor.
    pub revoked: Option<String>,
    /// Why the agent or its nearest suspended ancestor is suspended.
    pub suspended: Option<String>,
    /// The earliest expiry of the agent and its ancestors.
    pub expires_at_ms: Option<u64>,
    /// The largest single payment allowed, if limited.
    pub per_payment_limit_micros: Option<u64>,
    /// The daily, weekly, monthly and all-time limits the agent has, in their current periods.
    pub periods: Vec<PeriodBudget>,
    /// The task asked about, when the agent has a per-task cap.
    pub task: Option<TaskBudget>,
}

#[utoipa::path(get, path = "/v1/me/budget", params(BudgetQuery),
    responses((status = 200, body = BudgetView), (status = 401, description = "invalid token")), security(("agent" = [])))]
pub async fn budget(
    auth: AgentAuth,
    State(state): State<SharedState>,
    query: Result<Query<BudgetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BudgetView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let task = query.task.map(|task| label("task", &task, 128)).transpose()?;
    let now = state.clock.now_ms();
    // The balance checks the token (and releases due holds) before anything else is read.
    let balance = state.ledger.balance(now, &auth.agent, &auth.caller()).await.map_err(agent_scoped)?;
    let (_, standing) = state.ledger.standing(now, &auth.agent).await.map_err(agent_scoped)?;
    let controls = state.ledger.controls(&auth.agent).await?.controls;
    let mut periods = Vec::new();
    if Period::COUNTED.iter().any(|period| controls.limit(*period).is_some()) {
        let usage = state.ledger.periods(&auth.agent, 64).await?;
        for period in Period::COUNTED {
            let Some(limit) = controls.limit(period) else { continue };
            let start_ms = period.start_ms(now);
            let current = usage.iter().find(|p| p.period == period && p.start_ms == start_ms);
            let (spent, held) = current.map_or((0, 0), |p| (p.spent.get(), p.held.get()));
            periods.push(PeriodBudget {
                period,
                start_ms,
                end_ms: period.end_ms(start_ms),
                limit_micros: limit,
                spent_micros: spent,
                held_micros: held,
                remaining_micros: limit.saturating_sub(spent + held),
            });
        }
    }
    // Task spend is counted only for agents with a per-task cap (agents without controls take
    // the ledger's plain path), so a task is reported only where its cap applies.
    let task = match task.filter(|_| controls.task_cap.is_some()) {
        None => None,
        Some(task) => {
            let (spent, held) =
                state.ledger.task_usage(&auth.agent, &task).await?.map_or((0, 0), |(s, h)| (s.get(), h.get()));
            let cap = controls.task_cap.unwrap_or_default();
            Some(TaskBudget {
                task,
                spent_micros: spent,
                held_micros: held,
                cap_micros: cap,
                remaining_micros: cap.saturating_sub(spent + held),
            })
        }
    };
    Ok(Json(BudgetView {
        agent_id: auth.agent.to_string(),
        cap_micros: balance.cap.get(),
        spent_micros: balance.spent.get(),
        held_micros: balance.held.get(),
        remaining_micros: balance.remaining.get(),
        available_micros: if standing.is_active() { balance.available.get() } else { 0 },
        limited_by: match &standing.via {
            Some(via) if !standing.is_active() => via.id.clone(),
            _ if !standing.is_active() => auth.agent.to_string(),
            _ => balance.limited_by,
        },
        state: standing.state,
        revoked: standing.revoked.as_ref().map(|x| x.reason.clone()),
        suspended: standing.suspended.as_ref().map(|x| x.reason.clone()),
        expires_at_ms: standing.expires.as_ref().map(|x| x.at_ms),
        per_payment_limit_micros: controls.limit(Period::PerPayment),
        periods,
        task,
    }))
}
