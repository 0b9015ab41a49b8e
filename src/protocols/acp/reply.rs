//! What the ACP endpoints answer: ACP failures as stable `{code, detail}` errors (with the
//! provider's own code when it sent one), and answers stored so that a duplicate purchase request
//! gets the first one back.

use adapters::acp::{AcpError, Provider, ProviderError};
use serde_json::{json, Value};

pub(crate) use crate::outcome::Reply;
use crate::outcome::{Failure, Kind};

/// A successful answer with `body`.
pub(crate) fn reply_ok(body: &impl serde::Serialize) -> Result<Reply, Failure> {
    Ok(Reply::ok(serde_json::to_value(body).map_err(Failure::internal)?))
}

/// Adds fields to an error's body (the checkout session, the hold, ...).
pub(crate) fn with_fields(error: Failure, fields: Value) -> Failure {
    error.with_fields(fields)
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
pub(crate) fn acp_error(error: &AcpError) -> Failure {
    let kind = match error {
        AcpError::SessionNotReady { .. } | AcpError::TotalChanged { .. } => Kind::Conflict,
        AcpError::NoDelegateHandler { .. } | AcpError::CurrencyNotSupported(_) | AcpError::InvalidInput { .. } => {
            Kind::Invalid
        }
        // The merchant refused what was asked (a bad item, a declined payment): the agent's
        // request cannot succeed as it is. A merchant's server error is a bad gateway.
        AcpError::Merchant(provider) if provider.http_status < 500 => Kind::Invalid,
        AcpError::Timeout(_) => Kind::ProviderTimeout,
        AcpError::Merchant(_)
        | AcpError::Psp(_)
        | AcpError::BadTotal(_)
        | AcpError::SessionMismatch { .. }
        | AcpError::Transport { .. }
        | AcpError::MalformedResponse { .. } => Kind::Provider,
    };
    let api_error = Failure::new(kind, error.code(), describe(error));
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
        let body = Reply::error(&error).body.to_string();
        assert!(!body.contains("4242"), "{body}");
        assert!(body.contains("invalid_card"), "{body}");
        assert!(!describe(&psp_error("card 4242424242424242")).contains("4242"));
    }

    #[test]
    fn stored_answers_replay_with_their_status_and_a_replay_mark() {
        let reply = Reply::error(&with_fields(
            Failure::new(Kind::Conflict, "acp_total_changed", "changed"),
            json!({ "hold_id": "hd_x" }),
        ));
        let replayed = Reply::replay(&reply.stored()).expect("replays");
        assert_eq!(replayed.failure, Some(Kind::Conflict));
        assert_eq!(replayed.body["code"], "acp_total_changed");
        assert_eq!(replayed.body["hold_id"], "hd_x");
        assert_eq!(replayed.body["replayed"], true);
    }
}
