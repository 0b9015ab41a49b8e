//! The HTTP API: admin routes (agents, caps, revocation, log, spend, receipts) and agent routes
//! (own budget, the generic budget authority). One router per resource, merged here.

pub mod agents;
pub mod controls;
pub mod dashboard;
pub mod error;
pub mod holds;
pub mod log;
pub mod openapi;
pub mod reports;
pub mod unknown;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tower_http::set_header::SetResponseHeaderLayer;

pub use self::error::ApiError;
use crate::clock::Clock;
use crate::identity::{AdminToken, AgentId, AgentToken, TokenHash};
use crate::ledger::{Caller, Ledger, LedgerError};
use crate::receipt::ReceiptSigner;

/// Limits and defaults the HTTP layer enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub body_bytes: usize,
    pub default_hold_ttl: Duration,
    pub max_hold_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            body_bytes: 64 * 1024,
            default_hold_ttl: Duration::from_secs(300),
            max_hold_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct AppState {
    pub ledger: Ledger,
    pub protocols: crate::protocols::Protocols,
    pub admin: AdminToken,
    pub signer: ReceiptSigner,
    pub clock: Clock,
    pub limits: Limits,
    /// Where alert webhooks go (`None`: no alerts are sent).
    pub alerts: Option<crate::alerts::AlertConfig>,
    /// This instance's Prometheus counters (`/metrics`).
    pub metrics: crate::metrics::Metrics,
    /// One-time dashboard login codes (`serve --dev` prints one).
    pub login_codes: dashboard::LoginCodes,
    /// Whether this instance's clock agrees with the ledger's (payments and `/healthz` ask).
    pub clock_guard: crate::clock::ClockGuard,
    /// Holds whose grant never reached the agent (the ledger's answer was lost), to be voided.
    pub unacked: crate::unacked::Unacked,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    let limit = state.limits.body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics))
        .merge(agents::router())
        .merge(controls::router())
        .merge(holds::router())
        .merge(log::router())
        .merge(reports::router())
        .merge(dashboard::router())
        .merge(crate::protocols::router())
        .layer(DefaultBodyLimit::max(limit))
        // Every answer is about one operator's agents and money: never cached (the dashboard page
        // and token-bearing answers included), never sniffed into another content type.
        .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .with_state(state)
}

/// Liveness and ledger reachability: 200 when the ledger answers, 503 when it does not.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ledger reachable"), (status = 503, description = "ledger_unavailable, or clock_skew: this instance's clock is too far from the ledger's")))]
async fn healthz(
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.ledger.ping().await?;
    if let Err(offset_ms) = state.clock_guard.check() {
        return Err(LedgerError::ClockSkew { offset_ms, max_ms: state.clock_guard.max_ms() }.into());
    }
    Ok(Json(serde_json::json!({ "status": "ok", "ledger": state.ledger.kind() })))
}

/// Prometheus metrics of this instance, in the text exposition format (admin token).
async fn metrics(
    _: Admin,
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text))
}

pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// An administrator, authenticated by the admin token (compared in constant time).
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Admin, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        if state.admin.verify(token) {
            return Ok(Admin);
        }
        if token.parse::<AgentToken>().is_ok() {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "admin_only", "this endpoint needs the admin token"));
        }
        Err(ApiError::unauthorized())
    }
}

/// An agent, as its bearer token names it. The token itself is checked by the ledger inside the
/// same atomic step as the operation (by its SHA-256), so a rotated token stops at once.
pub struct AgentAuth {
    pub agent: AgentId,
    pub token_hash: TokenHash,
}

impl AgentAuth {
    pub fn caller(&self) -> Caller {
        Caller::Agent(self.token_hash.clone())
    }
}

impl FromRequestParts<SharedState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &SharedState) -> Result<AgentAuth, ApiError> {
        let token: AgentToken = bearer(parts).and_then(|t| t.parse().ok()).ok_or_else(ApiError::unauthorized)?;
        Ok(AgentAuth { agent: token.agent().clone(), token_hash: token.hash() })
    }
}

/// Maps the ledger's answer for an agent-authenticated call: an unknown agent or a token that
/// does not match are the same thing to the caller, an invalid token.
pub fn agent_scoped(err: crate::ledger::LedgerError) -> ApiError {
    match err {
        crate::ledger::LedgerError::UnknownAgent | crate::ledger::LedgerError::Unauthorized => ApiError::unauthorized(),
        other => other.into(),
    }
}

/// `Json<T>` whose rejections are our stable error codes.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<ApiJson<T>, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("malformed_json", e.body_text()),
                JsonRejection::JsonDataError(e) => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.body_text())
                }
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as application/json",
                ),
                other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request bodies are limited to {} bytes", state.limits.body_bytes),
                ),
                other => ApiError::bad_request("invalid_body", other.body_text()),
            }),
        }
    }
}

/// Checks a label (task, service) from outside: bounded length, no control characters.
pub fn label(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_label",
            format!("{field} must be at most {max} bytes without control characters"),
        ));
    }
    Ok(value.to_owned())
}
