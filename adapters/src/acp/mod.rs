//! Stripe's Agentic Commerce Protocol (ACP), API-Version `2026-04-17`.
//!
//! The daemon completes a merchant's checkout session for an agent. The steps, and the item of
//! this module each one uses:
//!
//! 1. Read the session: [`MerchantClient::retrieve_session`] (or [`MerchantClient::create_session`]).
//! 2. Check it: [`require_ready`], [`session_total`], [`pick_delegate_handler`]; describe the
//!    payment for the ledger with [`intent`] and hold it.
//! 3. Ask the PSP for a delegated payment token whose allowance is exactly that total:
//!    [`DelegatePaymentRequest::for_session`], then [`PspClient::delegate_payment`].
//! 4. Complete the session with the token: [`CheckoutSessionCompleteRequest::with_delegated_token`],
//!    [`MerchantClient::complete_session`]; then [`verify_unchanged`] and [`completed_order`]
//!    decide between settling and refusing. [`MerchantClient::cancel_session`] gives up.
//!
//! Every POST carries an `Idempotency-Key` the caller derives from the hold and the step, so a
//! retried purchase is idempotent end to end. [`AcpError::outcome_unknown`] tells the caller when a
//! failed POST may still have taken effect at the provider, in which case the hold must not be
//! voided.
//!
//! Amounts on the wire are integer minor units of the session currency; they become [`Micros`]
//! only through a [`CurrencyPolicy`], which knows `usd` and any rate the operator configured.
//!
//! [`Micros`]: crate::Micros

mod card;
mod checks;
mod currency;
mod delegate;
mod error;
mod http;
mod merchant;
mod psp;
mod types;

#[cfg(test)]
mod tests;

pub use card::{CardDetails, CardFunding, CardNumberType};
pub use checks::{
    completed_order, intent, pick_delegate_handler, require_ready, session_total, verify_unchanged, CompletedOrder,
    SessionTotal,
};
pub use currency::CurrencyPolicy;
pub use delegate::{
    rfc3339_utc, Allowance, AllowanceReason, DelegatePaymentRequest, DelegatePaymentResponse, Delegation, RiskAction,
    RiskSignal, RiskSignalType,
};
pub use error::{AcpError, Provider, ProviderError};
pub use http::{next_wait, ApiKey, IdempotencyKey, ProviderConfig, RetryPolicy, MAX_PROVIDER_WAIT};
pub use merchant::MerchantClient;
pub use psp::PspClient;
pub use types::{
    Address, AgentCapabilities, Buyer, CancelReason, CancelSessionRequest, CheckoutSession,
    CheckoutSessionCompleteRequest, CheckoutSessionCreateRequest, Credential, CredentialType, DelegatedToken,
    ErrorObject, FulfillmentDetails, Instrument, InstrumentType, IntentTrace, InterventionSupport, Item, LineItem,
    Link, Message, Order, PaymentCapability, PaymentData, PaymentHandler, ProtocolVersion, SessionCapabilities,
    SessionStatus, Total,
};

/// The ACP version this module speaks, sent as the `API-Version` header on every request.
pub const API_VERSION: &str = "2026-04-17";

/// The folder name under which request bodies are recorded for conformance checking.
pub const CONFORMANCE_PROTOCOL: &str = "acp";

/// The only payment handler whose instrument spendcap produces: a card, paid with a delegated
/// shared payment token (`credential.type = spt`).
pub const TOKENIZED_CARD_HANDLER: &str = "dev.acp.tokenized.card";
