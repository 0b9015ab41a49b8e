//! What the ACP endpoints answer: ACP failures as stable `{code, detail}` errors (with the
//! provider's own code when it sent one), and answers stored so that a duplicate purchase request
//! gets the first one back.

use adapters::acp::{AcpError, Provider, ProviderError};
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::ApiError;

/// One answer to the agent: a status and a JSON body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: &impl Serialize) -> Result<Reply, ApiError> {
        Ok(Reply { status: StatusCode::OK, body: serde_json::to_value(body).map_err(ApiError::internal)? })
    }

    /// The answer an error becomes: the same body `ApiError` sends.
    pub fn error(error: ApiError) -> Reply {
        let mut body = json!({ "code": error.code, "detail": error.detail });
        if let (Some(Value::Object(extra)), Value::Object(map)) = (error.extra, &mut body) {
            map.extend(extra);
        }
        Reply { status: error.status, body }
    }

    /// The form kept in the idempotency record.
    pub fn stored(&self) -> String {
        json!({ "status": self.status.as_u16(), "body": self.body }).to_string()
    }

    /// A stored answer, marked as a replay.
    pub fn replay(stored: &str) -> Result<Reply, ApiError> {
        let value: Value = serde_json::from_str(stored).map_err(ApiError::internal)?;
        let status = value["status"]
            .as_u64()
            .and_then(|status| u16::try_from(status).ok())
            .and_then(|status| StatusCode::from_u16(status).ok())
            .ok_or_else(|| ApiError::internal("a stored ACP answer has no status"))?;
        let mut body = value["body"].clone();
        if let Value::Object(map) = &mut body {
            map.insert("replayed".into(), Value::Bool(true));
        }
        Ok(Reply { status, body })
    }
}

/// Adds fields to an error's body (the checkout session, the hold, ...).
pub(crate) fn with_fields(mut error: ApiError, fields: Value) -> ApiError {
    match (&mut error.extra, fields) {
        (Some(Value::Object(extra)), Value::Object(fields)) => extra.extend(fields),
        (extra, fields) => *extra = Some(fields),
    }
    error
}

/// The agent's view of a provider's error object. The PSP's `message` is left out: the PSP was
/// sent the owner's card, and its free text may describe it.
fn provider_error_view(provider: Provider, error: &ProviderError) -> Value {
    let message = match provider {
        Provider::Merchant => Some(error.message.as_str()),
        Provider::Psp => None,
    };
    json!({
        "provider": provider.as_str(),
        "http_status": error.http_status,
        "type": error.error_type,
        "code": error.code,
        "message": message,
        "param": error.param,
    })
}

/// The HTTP answer for an ACP failure, with the adapter's stable code.
pub(crate) fn acp_error(error: &AcpError) -> ApiError {
    let status = match error {
        AcpError::SessionNotReady { .. } | AcpError::TotalChanged { .. } => StatusCode::CONFLICT,
        AcpError::NoDelegateHandler { .. } | AcpError::CurrencyNotSupported(_) | AcpError::InvalidInput { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        // The merchant refused what was asked (a bad item, a declined payment): the agent's
        // request cannot succeed as it is. A merchant's server error is a bad gateway.
        AcpError::Merchant(provider) if provider.http_status < 500 => StatusCode::UNPROCESSABLE_ENTITY,
        AcpError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        AcpError::Merchant(_)
        | AcpError::Psp(_)
        | AcpError::BadTotal(_)
        | AcpError::SessionMismatch { .. }
        | AcpError::Transport { .. }
        | AcpError::MalformedResponse { .. } => StatusCode::BAD_GATEWAY,
    };
    let api_error = ApiError::new(status, error.code(), describe(error));
    match error {
        AcpError::Merchant(provider) => {
            with_fields(api_error, json!({ "provider_error": provider_error_view(Provider::Merchant, provider) }))
        }
        AcpError::Psp(provider) => {
            with_fields(api_error, json!({ "provider_error": provider_error_view(Provider::Psp, provider) }))
        }
        _ => api_error,
    }
}

/// A description of an ACP failure fit for the agent and the log: the adapter's message, except
/// for the PSP's free text (see [`provider_error_view`]).
pub(crate) fn describe(error: &AcpError) -> String {
    match error {
        AcpError::Merchant(provider) => provider.message.clone(),
        AcpError::Psp(provider) => {
            format!("the PSP refused to delegate the payment (HTTP {}, {})", provider.http_status, provider.code)
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psp_error(message: &str) -> AcpError {
        AcpError::Psp(ProviderError {
            http_status: 400,
            error_type: "invalid_request".into(),
            code: "invalid_card".into(),
            message: message.into(),
            param: Some("payment_method.number".into()),
        })
    }

    #[test]
    fn a_psp_message_never_reaches_the_agent() {
        let error = acp_error(&psp_error("card 4242424242424242 is invalid"));
        let body = Reply::error(error).body.to_string();
        assert!(!body.contains("4242"), "{body}");
        assert!(body.contains("invalid_card"), "{body}");
        assert!(!describe(&psp_error("card 4242424242424242")).contains("4242"));
    }

    #[test]
    fn stored_answers_replay_with_their_status_and_a_replay_mark() {
        let reply = Reply::error(with_fields(
            ApiError::new(StatusCode::CONFLICT, "acp_total_changed", "changed"),
            json!({ "hold_id": "hd_x" }),
        ));
        let replayed = Reply::replay(&reply.stored()).expect("replays");
        assert_eq!(replayed.status, StatusCode::CONFLICT);
        assert_eq!(replayed.body["code"], "acp_total_changed");
        assert_eq!(replayed.body["hold_id"], "hd_x");
        assert_eq!(replayed.body["replayed"], true);
    }
}
