//! The one error type of the HTTP edge: stable `{code, detail}` bodies for client errors, a bare
//! `internal` for everything else (the cause is logged, never shown).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::outcome::Failure;

use crate::ledger::LedgerError;
use crate::receipt::ReceiptError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Extra fields merged into the body (a refusal's amounts, say).
    pub extra: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { status, code, detail: detail.into(), extra: None }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", "missing, malformed or unknown bearer token")
    }

    pub fn with_extra(mut self, extra: Value) -> ApiError {
        self.extra = Some(extra);
        self
    }

    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

/// The one way a failure of the core or a flow becomes an HTTP answer: its kind's status
/// (`status::of`), its code, detail and extra fields unchanged.
impl From<Failure> for ApiError {
    fn from(failure: Failure) -> ApiError {
        ApiError {
            status: super::status::of(failure.kind),
            code: failure.code,
            detail: failure.detail,
            extra: failure.extra,
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> ApiError {
        Failure::from(err).into()
    }
}

impl From<ReceiptError> for ApiError {
    fn from(err: ReceiptError) -> ApiError {
        Failure::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "detail": self.detail });
        if let (Some(Value::Object(extra)), Value::Object(map)) = (self.extra, &mut body) {
            map.extend(extra);
        }
        (self.status, Json(body)).into_response()
    }
}
