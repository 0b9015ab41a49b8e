//! The HTTP API: admin routes (agents, caps, revocation, log, spend, receipts) and agent routes
//! (own budget, the generic budget authority). One router per resource, merged here.

pub mod agents;
pub mod approvals;
pub mod budget;
pub mod controls;
pub mod dashboard;
pub mod error;
pub mod holds;
pub mod log;
pub mod openapi;
pub mod operators;
pub mod orchestrators;
pub mod reports;
pub mod status;
pub mod unknown;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tower_http::set_header::SetResponseHeaderLayer;

pub use self::error::ApiError;
use crate::identity::{AgentId, AgentToken};
use crate::ledger::LedgerError;

pub use crate::app::{AppState, Limits, SharedState};

pub fn router(state: SharedState) -> Router {
    let limit = state.limits.body_bytes;
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics))
        .merge(agents::router())
        .merge(controls::router())
        .merge(holds::router())
        .merge(budget::router())
        .merge(log::router())
        .merge(reports::router())
        .merge(orchestrators::router())
        .merge(dashboard::router())
        .merge(approvals::router())
        .merge(operators::router())
        .merge(crate::protocols::router())
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone());
    // MCP over streamable HTTP: its tool calls are dispatched to the routes above, in process.
    api.clone()
        .merge(crate::mcp::http::router(state, api))
        // Every answer is about one operator's agents and money: never cached (the dashboard page
        // and token-bearing answers included), never sniffed into another content type.
        .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
}

/// Liveness and ledger reachability: 200 when the ledger answers, 503 when it does not.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ledger reachable: `{status, ledger}`", body = Object), (status = 503, description = "ledger_unavailable, or clock_skew: this instance's clock is too far from the ledger's")))]
async fn healthz(
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.ledger.ping().await?;
    if let Err(offset_ms) = state.clock_guard.check() {
        return Err(LedgerError::ClockSkew { offset_ms, max_ms: state.clock_guard.max_ms() }.into());
    }
    Ok(Json(serde_json::json!({ "status": "ok", "ledger": state.ledger.kind() })))
}

/// Every error is `{code, detail}`, also for a path no route has.
async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
}

/// A route that exists, asked with a method it does not take.
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

/// Prometheus metrics of this instance, in the text exposition format (admin token).
async fn metrics(
    _: Principal,
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let text = state.metrics.render().map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text))
}

pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

pub use self::operators::Principal;

/// An administrator over every tree: the admin token (compared in constant time) or an `admin`
/// operator token without a tree. Routes that know roles take [`Principal`] instead; a route that
/// still takes `Admin` refuses every other token (`role_forbidden`), whatever `operators::ROUTES` says.
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Admin, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if principal.role != crate::roles::Role::Admin || principal.tree.is_some() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "role_forbidden",
                "this route needs an admin token for every tree; see GET /v1/whoami",
            ));
        }
        Ok(Admin)
    }
}

pub use crate::identity::AgentAuth;

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
    crate::outcome::Failure::agent_scoped(err).into()
}

/// [`crate::pay::refuse_if_revoked`], answered over HTTP (403 `agent_revoked`).
pub async fn refuse_if_revoked(state: &AppState, agent: &AgentId) -> Result<(), ApiError> {
    Ok(crate::pay::refuse_if_revoked(&state.core, agent).await?)
}

/// `Json<T>` whose rejections are our stable error codes. A JSON object that names one key twice,
/// at any depth, is refused (422 `duplicate_key`) before anything reads it: serde would keep the
/// last value (`{"limits": {"daily": 1, "daily": 999999}}` would set 999999), and what a reader
/// of the body sees must be what the daemon does.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<ApiJson<T>, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request bodies are limited to {} bytes", state.limits.body_bytes),
                )
            } else {
                ApiError::bad_request("invalid_body", rejection.body_text())
            }
        })?;
        if let Err(err) = serde_json::from_slice::<json_keys::UniqueKeys>(&bytes) {
            if err.classify() == serde_json::error::Category::Data {
                return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "duplicate_key", err.to_string()));
            }
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("malformed_json", e.body_text()),
                JsonRejection::JsonDataError(e) => {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.body_text())
                }
                other => ApiError::bad_request("invalid_body", other.body_text()),
            }),
        }
    }
}

/// `application/json` or any `application/*+json`, as axum's `Json` accepts.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub mod json_keys {
    //! A pass over a JSON document that fails on the first object naming a key twice.

    use std::collections::HashSet;
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    /// Deserializes any JSON value, refusing an object with a duplicate key at any depth. Keys
    /// are compared after unescaping (`"a"` and `"\u0061"` are the same key).
    pub struct UniqueKeys;

    impl<'de> Deserialize<'de> for UniqueKeys {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<UniqueKeys, D::Error> {
            deserializer.deserialize_any(UniqueKeysVisitor)
        }
    }

    struct UniqueKeysVisitor;

    impl<'de> Visitor<'de> for UniqueKeysVisitor {
        type Value = UniqueKeys;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<UniqueKeys>()?;
                if let Some(key) = seen.replace(key) {
                    return Err(A::Error::custom(format_args!("the key {key:?} appears twice in one object")));
                }
            }
            Ok(UniqueKeys)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
            while seq.next_element::<UniqueKeys>()?.is_some() {}
            Ok(UniqueKeys)
        }

        fn visit_bool<E: Error>(self, _: bool) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }

        fn visit_i64<E: Error>(self, _: i64) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }

        fn visit_u64<E: Error>(self, _: u64) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }

        fn visit_f64<E: Error>(self, _: f64) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }

        fn visit_str<E: Error>(self, _: &str) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }

        fn visit_unit<E: Error>(self) -> Result<UniqueKeys, E> {
            Ok(UniqueKeys)
        }
    }
}

/// Checks a label (task, service) from outside: bounded length, no control characters.
pub fn label(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
    Ok(crate::outcome::label(field, value, max)?)
}
