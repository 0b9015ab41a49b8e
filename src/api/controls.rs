//! Admin routes for spending controls: per-task caps, budget periods, allow/deny lists, the
//! runaway-loop breaker and alert thresholds (`/controls`), expiry, reinstatement after a
//! suspension, and per-period spend.

use std::collections::BTreeMap;

use adapters::Micros;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::agents::AgentView;
use super::{ApiError, ApiJson, Principal, SharedState};
use crate::ledger::controls::{validate_alerts, ControlsError, DEFAULT_ALERTS};
use crate::ledger::{AgentControls, Controls, Period};

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/agents/{agent}/controls", put(set_controls).get(show_controls))
        .route("/v1/agents/{agent}/expiry", put(set_expiry))
        .route("/v1/agents/{agent}/reinstate", post(reinstate))
        .route("/v1/agents/{agent}/periods", get(periods))
}

/// Distinguishes a field that is absent (`None`) from one that is `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, Serialize, ToSchema, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListBody {
    /// When non-empty, only these may be paid.
    #[serde(default)]
    pub allow: Vec<String>,
    /// These may never be paid.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The runaway-loop breaker: each rule is off when absent.
#[derive(Deserialize, Serialize, ToSchema, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct BreakerBody {
    /// One hold more than this within `window_secs` suspends the agent (`velocity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub max_holds: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub window_secs: Option<serde_json::Number>,
    /// Holding more than this within `spend_window_secs` suspends the agent (`velocity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub max_spend_micros: Option<serde_json::Number>,
    /// At most `window_secs` (the hold rule bounds what the spend rule remembers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub spend_window_secs: Option<serde_json::Number>,
    /// More identical payments (same service and amount) in a row than this suspends (`repeat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub max_repeats: Option<serde_json::Number>,
}

/// An agent's spending controls. `PUT` replaces them all: absent limits and lists are off; an
/// absent `breaker` is the default one (600 holds a minute, 100 identical payments in a row),
/// `null` turns it off; absent `alerts` are 50, 80 and 100 %, `null` or `[]` none.
#[derive(Deserialize, Serialize, ToSchema, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ControlsBody {
    /// Most spent + held per task label (micro-USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub task_cap_micros: Option<serde_json::Number>,
    /// Limits by period: `per_payment`, `daily`, `weekly`, `monthly`, `all_time` (UTC calendar).
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, u64>)]
    pub limits: BTreeMap<String, serde_json::Number>,
    /// Services: hosts (`*.example.com` for subdomains), x402 `payTo` addresses, ACP merchants,
    /// AP2 payees (matched case-insensitively against the service and the payee details).
    #[serde(default)]
    pub services: ListBody,
    /// Protocols: `x402`, `acp`, `ap2`, `generic`.
    #[serde(default)]
    pub protocols: ListBody,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<BreakerBody>)]
    pub breaker: Option<Option<BreakerBody>>,
    /// Alert thresholds, ascending percents of each limit (cap, period limits, task caps).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<u8>>)]
    pub alerts: Option<Option<Vec<serde_json::Number>>>,
    /// Payments a person approves first (held meanwhile, nothing sent); absent or `null`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalBody>,
}

/// An approval rule: a payment above `above_micros`, to a service the agent never settled with
/// (`new_service`), to one of `services` or over one of `protocols` waits for a person's
/// decision, up to `ttl_secs` (default 900).
#[derive(Deserialize, Serialize, ToSchema, Default, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub above_micros: Option<serde_json::Number>,
    #[serde(default)]
    pub new_service: bool,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub protocols: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub ttl_secs: Option<serde_json::Number>,
}

/// An approval rule as stored.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct ApprovalView {
    pub above_micros: Option<u64>,
    pub new_service: bool,
    pub services: Vec<String>,
    pub protocols: Vec<String>,
    pub ttl_secs: u64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct BreakerView {
    pub max_holds: Option<u32>,
    pub window_secs: Option<u64>,
    pub max_spend_micros: Option<u64>,
    pub spend_window_secs: Option<u64>,
    pub max_repeats: Option<u32>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct ListView {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct ControlsView {
    pub agent_id: String,
    pub task_cap_micros: Option<u64>,
    pub limits: BTreeMap<String, u64>,
    pub services: ListView,
    pub protocols: ListView,
    /// `null` when the breaker is off.
    pub breaker: Option<BreakerView>,
    pub alerts: Vec<u8>,
    /// `null` when no payment needs approval.
    #[serde(default)]
    pub approval: Option<ApprovalView>,
}

fn invalid(err: ControlsError) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, err.code(), err.to_string())
}

fn limit(name: &str, number: &serde_json::Number) -> Result<u64, ApiError> {
    Micros::from_json_number(number)
        .map(Micros::get)
        .map_err(|e| invalid(ControlsError::InvalidLimit(format!("{name}: {e}"))))
}

fn count(name: &str, number: &serde_json::Number, max: u64, window: bool) -> Result<u64, ApiError> {
    match number.as_u64().filter(|n| (1..=max).contains(n)) {
        Some(n) => Ok(n),
        None if window => Err(invalid(ControlsError::InvalidWindow(format!(
            "{name} must be a whole number of seconds from 1 to {max}"
        )))),
        None => Err(invalid(ControlsError::InvalidBreaker(format!("{name} must be an integer from 1 to {max}")))),
    }
}

impl ControlsBody {
    /// The controls this body describes, checked: every refusal has a stable code.
    pub fn parse(&self) -> Result<AgentControls, ApiError> {
        let mut controls = Controls {
            task_cap: self.task_cap_micros.as_ref().map(|n| limit("task_cap_micros", n)).transpose()?,
            ..Controls::default()
        };
        for (name, value) in &self.limits {
            let period = Period::parse(name).ok_or_else(|| invalid(ControlsError::UnknownPeriod(name.clone())))?;
            controls.set_limit(period, Some(limit(name, value)?));
        }
        let lower = |list: &[String]| list.iter().map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>();
        controls.services_allow = lower(&self.services.allow);
        controls.services_deny = lower(&self.services.deny);
        controls.protocols_allow = lower(&self.protocols.allow);
        controls.protocols_deny = lower(&self.protocols.deny);
        let max_window_secs = crate::ledger::controls::MAX_WINDOW_MS / 1000;
        match &self.breaker {
            None => {
                let defaults = Controls::default_breaker();
                controls.max_holds = defaults.max_holds;
                controls.window_ms = defaults.window_ms;
                controls.max_repeats = defaults.max_repeats;
            }
            Some(None) => {}
            Some(Some(b)) => {
                let max_holds = crate::ledger::controls::MAX_BREAKER_HOLDS as u64;
                controls.max_holds = b
                    .max_holds
                    .as_ref()
                    .map(|n| count("max_holds", n, max_holds, false))
                    .transpose()?
                    .map(|n| n as u32);
                controls.window_ms = b
                    .window_secs
                    .as_ref()
                    .map(|n| count("window_secs", n, max_window_secs, true))
                    .transpose()?
                    .map(|s| s * 1000);
                controls.max_spend = b.max_spend_micros.as_ref().map(|n| limit("max_spend_micros", n)).transpose()?;
                controls.spend_window_ms = b
                    .spend_window_secs
                    .as_ref()
                    .map(|n| count("spend_window_secs", n, max_window_secs, true))
                    .transpose()?
                    .map(|s| s * 1000);
                let max_repeats = crate::ledger::controls::MAX_REPEATS as u64;
                controls.max_repeats = b
                    .max_repeats
                    .as_ref()
                    .map(|n| count("max_repeats", n, max_repeats, false))
                    .transpose()?
                    .map(|n| n as u32);
            }
        }
        if let Some(a) = &self.approval {
            let above = a
                .above_micros
                .as_ref()
                .map(|n| {
                    Micros::from_json_number(n)
                        .map(Micros::get)
                        .map_err(|e| invalid(ControlsError::InvalidApproval(format!("approval.above_micros: {e}"))))
                })
                .transpose()?;
            let max_ttl = crate::ledger::controls::MAX_APPROVAL_TTL_MS / 1000;
            let ttl_secs = match &a.ttl_secs {
                None => crate::ledger::controls::DEFAULT_APPROVAL_TTL_MS / 1000,
                Some(n) => n.as_u64().filter(|s| (1..=max_ttl).contains(s)).ok_or_else(|| {
                    invalid(ControlsError::InvalidApproval(format!(
                        "approval.ttl_secs must be a whole number of seconds from 1 to {max_ttl}"
                    )))
                })?,
            };
            controls.approval = Some(crate::ledger::controls::ApprovalRule {
                above,
                new_service: a.new_service,
                services: lower(&a.services),
                protocols: lower(&a.protocols),
                ttl_ms: ttl_secs * 1000,
            });
        }
        controls.validate().map_err(invalid)?;
        let alerts = match &self.alerts {
            None => DEFAULT_ALERTS.to_vec(),
            Some(None) => Vec::new(),
            Some(Some(list)) => list
                .iter()
                .map(|n| n.as_u64().filter(|p| (1..=100).contains(p)).map(|p| p as u8))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    invalid(ControlsError::InvalidThreshold("alert thresholds are percents from 1 to 100".into()))
                })?,
        };
        validate_alerts(&alerts).map_err(invalid)?;
        Ok(AgentControls { controls, alerts })
    }
}

impl ControlsView {
    pub fn new(agent_id: String, stored: &AgentControls) -> ControlsView {
        let c = &stored.controls;
        let breaker = (c.max_holds.is_some() || c.max_repeats.is_some()).then(|| BreakerView {
            max_holds: c.max_holds,
            window_secs: c.window_ms.map(|w| w / 1000),
            max_spend_micros: c.max_spend,
            spend_window_secs: c.spend_window_ms.map(|w| w / 1000),
            max_repeats: c.max_repeats,
        });
        ControlsView {
            agent_id,
            task_cap_micros: c.task_cap,
            limits: Period::ALL.into_iter().filter_map(|p| c.limit(p).map(|l| (p.as_str().to_owned(), l))).collect(),
            services: ListView { allow: c.services_allow.clone(), deny: c.services_deny.clone() },
            protocols: ListView { allow: c.protocols_allow.clone(), deny: c.protocols_deny.clone() },
            breaker,
            alerts: stored.alerts.clone(),
            approval: c.approval.as_ref().map(|a| ApprovalView {
                above_micros: a.above,
                new_service: a.new_service,
                services: a.services.clone(),
                protocols: a.protocols.clone(),
                ttl_secs: a.ttl_ms / 1000,
            }),
        }
    }
}

#[utoipa::path(put, path = "/v1/agents/{agent}/controls", request_body = ControlsBody,
    params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = ControlsView),
              (status = 422, description = "invalid_limit, unknown_period, inverted_limits, invalid_window, invalid_breaker, invalid_list, unknown_protocol, invalid_threshold, invalid_approval; nothing changed")),
    security(("admin" = [])))]
pub async fn set_controls(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    body: Result<ApiJson<ControlsBody>, ApiError>,
) -> Result<Json<ControlsView>, ApiError> {
    let ApiJson(body) = body.map_err(|e| {
        if e.code == "invalid_body" {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_controls", e.detail)
        } else {
            e
        }
    })?;
    let controls = body.parse()?;
    let id = who.resolve(&state, &agent).await?;
    let actor = who.actor();
    let expected = if actor.tighten_only {
        // Tighten only: judged against the controls read now, and written only if they are
        // still those (compare-and-set in the ledger; a change meanwhile is 409 changed_meanwhile).
        let current = state.ledger.controls(&id).await?.controls;
        if !controls.controls.no_looser_than(&current) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "role_forbidden",
                "this token may only tighten controls: every limit kept and no higher, allow-lists \
                 no wider, deny-lists kept, the breaker no looser",
            ));
        }
        Some(current)
    } else {
        None
    };
    state.ledger.set_controls_as(state.clock.now_ms(), &id, &controls, expected.as_ref(), &actor).await?;
    tracing::info!(agent = %id, controls = %controls.controls.to_wire(), "controls changed");
    Ok(Json(ControlsView::new(id.to_string(), &state.ledger.controls(&id).await?)))
}

#[utoipa::path(get, path = "/v1/agents/{agent}/controls", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = ControlsView)), security(("admin" = [])))]
pub async fn show_controls(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<ControlsView>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    Ok(Json(ControlsView::new(id.to_string(), &state.ledger.controls(&id).await?)))
}

/// Exactly one of `expires_at_ms`, `ttl_secs` or `never: true`.
#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ExpiryRequest {
    /// Absolute expiry (ms since the epoch), in the future.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// Expire this many seconds from now.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Remove the expiry.
    #[serde(default)]
    pub never: bool,
}

#[utoipa::path(put, path = "/v1/agents/{agent}/expiry", request_body = ExpiryRequest,
    params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = AgentView), (status = 422, description = "invalid_expiry")), security(("admin" = [])))]
pub async fn set_expiry(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<ExpiryRequest>,
) -> Result<Json<AgentView>, ApiError> {
    let now = state.clock.now_ms();
    let bad = |detail: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_expiry", detail);
    let expires_at_ms = match (req.expires_at_ms, req.ttl_secs, req.never) {
        (Some(at), None, false) if at > now => Some(at),
        (Some(_), None, false) => return Err(bad("expires_at_ms is in the past")),
        (None, Some(ttl), false) if ttl > 0 => Some(now.saturating_add(ttl.saturating_mul(1000))),
        (None, Some(_), false) => return Err(bad("ttl_secs must be positive")),
        (None, None, true) => None,
        _ => return Err(bad("give exactly one of expires_at_ms, ttl_secs or never: true")),
    };
    let id = who.resolve(&state, &agent).await?;
    state.ledger.set_expiry_as(now, &id, expires_at_ms, &who.actor()).await?;
    tracing::info!(agent = %id, expires_at_ms, "expiry changed");
    Ok(Json(AgentView::load(&state, &id).await?))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Reinstated {
    pub agent_id: String,
    /// The suspension reason lifted (`velocity`, `repeat`), or `null` if it was not suspended.
    pub was_suspended: Option<String>,
}

#[utoipa::path(post, path = "/v1/agents/{agent}/reinstate", params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = Reinstated)), security(("admin" = [])))]
pub async fn reinstate(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<Reinstated>, ApiError> {
    let id = who.resolve(&state, &agent).await?;
    let was = state.ledger.reinstate_as(state.clock.now_ms(), &id, &who.actor()).await?;
    tracing::warn!(agent = %id, was = ?was, "agent reinstated");
    Ok(Json(Reinstated { agent_id: id.to_string(), was_suspended: was }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PeriodsQuery {
    /// Most periods to return, newest first (default 100).
    pub limit: Option<usize>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PeriodView {
    pub period: Period,
    pub start_ms: u64,
    /// `null` for `all_time`.
    pub end_ms: Option<u64>,
    pub spent_micros: u64,
    pub held_micros: u64,
    /// The limit configured now (`null` if none).
    pub limit_micros: Option<u64>,
    /// Whether this is the period in progress.
    pub current: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PeriodList {
    pub agent_id: String,
    pub periods: Vec<PeriodView>,
}

#[utoipa::path(get, path = "/v1/agents/{agent}/periods", params(("agent" = String, Path, description = "agent id or handle"), PeriodsQuery),
    responses((status = 200, body = PeriodList)), security(("admin" = [])))]
pub async fn periods(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    query: Result<Query<PeriodsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PeriodList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let id = who.resolve(&state, &agent).await?;
    let now = state.clock.now_ms();
    // Bring held figures up to date (release due holds) first.
    state.ledger.expire(now, id.tree()).await?;
    let controls = state.ledger.controls(&id).await?.controls;
    let periods = state
        .ledger
        .periods(&id, query.limit.unwrap_or(100).min(10_000))
        .await?
        .into_iter()
        .map(|p| PeriodView {
            period: p.period,
            start_ms: p.start_ms,
            end_ms: p.end_ms,
            spent_micros: p.spent.get(),
            held_micros: p.held.get(),
            limit_micros: controls.limit(p.period),
            current: p.period.start_ms(now) == p.start_ms,
        })
        .collect();
    Ok(Json(PeriodList { agent_id: id.to_string(), periods }))
}
