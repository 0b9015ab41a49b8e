//! Everything that can go wrong in an ACP payment, with stable codes.

use std::fmt;

/// Which ACP party an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Merchant,
    Psp,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Merchant => "merchant",
            Provider::Psp => "psp",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider's flat ACP error object, with the HTTP status it came with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderError {
    pub http_status: u16,
    /// `invalid_request`, `processing_error`, `service_unavailable`, ... (the set is extensible).
    pub error_type: String,
    /// The provider's own code, e.g. `payment_declined`, `idempotency_conflict`, `invalid_card`.
    pub code: String,
    pub message: String,
    /// An RFC 9535 JSONPath to the offending field, when the provider names one.
    pub param: Option<String>,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}/{}: {}", self.http_status, self.error_type, self.code, self.message)
    }
}

/// Why an ACP step failed. `code()` is stable and part of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpError {
    #[error(
        "checkout session is {status}, not ready_for_payment{}",
        reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    SessionNotReady { status: String, reason: Option<String> },

    #[error(
        "checkout session offers no {handler} payment handler that takes a delegated payment from PSP {psp:?}",
        handler = super::TOKENIZED_CARD_HANDLER
    )]
    NoDelegateHandler { psp: String },

    #[error("checkout session total is unusable: {0}")]
    BadTotal(String),

    #[error("currency {0:?} is not supported: spendcap pays in usd unless a rate for it is configured")]
    CurrencyNotSupported(String),

    #[error(
        "the merchant completed at {completed_minor} {completed_currency}, \
         but the total read before paying was {read_minor} {read_currency}"
    )]
    TotalChanged { read_minor: u64, read_currency: String, completed_minor: u64, completed_currency: String },

    #[error("the merchant answered for checkout session {got:?}, not {expected:?}")]
    SessionMismatch { expected: String, got: String },

    #[error("merchant refused: {0}")]
    Merchant(ProviderError),

    #[error("PSP refused: {0}")]
    Psp(ProviderError),

    #[error("the {0} did not answer within the configured timeout")]
    Timeout(Provider),

    #[error("could not talk to the {provider}: {reason}")]
    Transport { provider: Provider, reason: String, request_may_have_arrived: bool },

    #[error("malformed {provider} response (HTTP {http_status}): {reason}")]
    MalformedResponse { provider: Provider, http_status: u16, reason: String },

    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
}

impl AcpError {
    /// The stable, snake_case error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            AcpError::SessionNotReady { .. } => "acp_session_not_ready",
            AcpError::NoDelegateHandler { .. } => "acp_no_delegate_handler",
            AcpError::BadTotal(_) => "acp_bad_total",
            AcpError::CurrencyNotSupported(_) => "acp_currency_not_supported",
            AcpError::TotalChanged { .. } => "acp_total_changed",
            AcpError::SessionMismatch { .. } => "acp_session_mismatch",
            AcpError::Merchant(_) => "acp_merchant_error",
            AcpError::Psp(_) => "acp_psp_error",
            AcpError::Timeout(_) => "acp_timeout",
            AcpError::Transport { .. } => "acp_transport_error",
            AcpError::MalformedResponse { .. } => "acp_malformed_response",
            AcpError::InvalidInput { .. } => "acp_invalid_input",
        }
    }

    /// The provider's error object, when the provider answered with one.
    pub fn provider_error(&self) -> Option<&ProviderError> {
        match self {
            AcpError::Merchant(error) | AcpError::Psp(error) => Some(error),
            _ => None,
        }
    }

    /// True when a failed POST may nevertheless have taken effect at the provider: no answer
    /// (timeout, broken connection), an answer that could not be read, a server error, or a
    /// request that was still in flight when the retries ran out.
    ///
    /// After such an error on `complete` (or `delegate_payment`) the caller must not void the
    /// hold: the merchant may have charged. It keeps the hold, which expires on its own, and may
    /// retry with the same idempotency key or retrieve the session to learn the outcome. Every
    /// other error is a definite refusal or was raised before anything was sent.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            AcpError::Timeout(_) | AcpError::MalformedResponse { .. } => true,
            AcpError::Transport { request_may_have_arrived, .. } => *request_may_have_arrived,
            AcpError::Merchant(error) | AcpError::Psp(error) => {
                error.http_status >= 500 || error.code == "idempotency_in_flight"
            }
            // A session mismatch is a wrong answer to a request that did arrive.
            AcpError::SessionMismatch { .. } => true,
            AcpError::SessionNotReady { .. }
            | AcpError::NoDelegateHandler { .. }
            | AcpError::BadTotal(_)
            | AcpError::CurrencyNotSupported(_)
            | AcpError::TotalChanged { .. }
            | AcpError::InvalidInput { .. } => false,
        }
    }
}
