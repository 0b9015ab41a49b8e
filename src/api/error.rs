//! The one error type of the HTTP edge: stable `{code, detail}` bodies for client errors, a bare
//! `internal` for everything else (the cause is logged, never shown).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

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

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> ApiError {
        let status = match &err {
            LedgerError::UnknownAgent | LedgerError::UnknownHold | LedgerError::UnknownBucket => StatusCode::NOT_FOUND,
            LedgerError::Unauthorized => return ApiError::unauthorized(),
            LedgerError::UnknownParent | LedgerError::TreeTooDeep | LedgerError::AmountExceedsHold => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            LedgerError::IdempotencyConflict => StatusCode::UNPROCESSABLE_ENTITY,
            LedgerError::AgentExists
            | LedgerError::HandleTaken
            | LedgerError::HoldSettled
            | LedgerError::HoldExpired
            | LedgerError::HoldVoided
            | LedgerError::IdempotencyInFlight
            | LedgerError::HoldProtocolMismatch
            | LedgerError::BucketExists
            | LedgerError::CapBelowCommitted { .. } => StatusCode::CONFLICT,
            LedgerError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            LedgerError::Unavailable(cause) => {
                tracing::error!(error = %cause, "ledger unavailable; refusing (fail closed)");
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ledger_unavailable",
                    "the ledger is unavailable; nothing was paid",
                );
            }
            LedgerError::OutcomeUnknown { cause, retry_key } => {
                tracing::error!(error = %cause, "ledger call outcome unknown");
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ledger_outcome_unknown",
                    "the ledger did not answer in time and the call may have run; retry the same request \
                     (with this idempotency_key for a hold) to learn its outcome",
                );
                return match retry_key {
                    Some(key) => error.with_extra(json!({ "idempotency_key": key })),
                    None => error,
                };
            }
            LedgerError::Corrupt(_) => return ApiError::internal(err),
            LedgerError::ClockSkew { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, err.code(), err.to_string())
    }
}

impl From<ReceiptError> for ApiError {
    fn from(err: ReceiptError) -> ApiError {
        match err {
            ReceiptError::Ledger(ledger) => ledger.into(),
            other => ApiError::internal(other),
        }
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
