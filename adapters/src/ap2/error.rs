//! The one error type of the AP2 adapter. Every case has a stable snake_case `code()`.
//!
//! Messages never contain a token, a key or a whole payload: a refused JWT is described by what
//! was wrong with it, not by echoing it.

use crate::money::AmountError;

/// Why an AP2 message was refused or an AP2 exchange failed. `code()` is stable and part of the API.
#[derive(Debug, thiserror::Error)]
pub enum Ap2Error {
    /// A JWT is not three base64url parts with JSON object header and payload.
    #[error("malformed JWT: {0}")]
    MalformedJwt(String),
    /// The JWT's `alg` is not ES256 (this includes `none`).
    #[error("JWT algorithm {0:?} is not allowed; only ES256 is accepted")]
    AlgNotAllowed(String),
    /// No trusted key verifies the signature: a wrong key, or an edited header or payload.
    #[error("JWT signature does not verify with any trusted key")]
    BadSignature,
    /// An ES256 signature whose `s` is in the upper half of the group order. ECDSA lets anyone
    /// turn a valid signature `(r, s)` into a second valid one, `(r, n - s)`, without the key;
    /// only the low-S form is accepted, so that one signed message has one signature.
    #[error("JWT signature is not in canonical low-S form")]
    NonCanonicalSignature,
    /// The JWT names (by `kid`) a key that is not trusted, or no key is trusted at all.
    #[error("JWT issuer is not trusted: {0}")]
    UntrustedIssuer(String),
    /// `exp` (or a checkout's `expires_at`) is at or before `now`.
    #[error("expired at {expired_at}, now is {now}")]
    Expired { expired_at: i64, now: i64 },
    /// `nbf` is after `now`.
    #[error("not valid before {not_before}, now is {now}")]
    NotYetValid { not_before: i64, now: i64 },
    /// An SD-JWT's structure or disclosures are invalid.
    #[error("malformed SD-JWT: {0}")]
    MalformedSdJwt(String),
    /// `_sd_alg` names a hash other than sha-256.
    #[error("unsupported _sd_alg {0:?}; only sha-256 is supported")]
    UnsupportedSdAlg(String),
    /// A hash binding (`sd_hash`, `checkout_hash`, `transaction_id`, a cart hash) does not match.
    #[error("binding mismatch: {0}")]
    BindingMismatch(String),
    /// The key-binding JWT's `aud` or `nonce` is not the expected one.
    #[error("key-binding JWT {0} does not match the expected value")]
    KeyBindingMismatch(&'static str),
    /// The mandate's `vct` is not the one expected here.
    #[error("mandate type {found:?} where {expected:?} was expected")]
    WrongMandateType { expected: &'static str, found: String },
    /// A mandate does not follow its schema.
    #[error("invalid mandate: {0}")]
    InvalidMandate(String),
    /// A constraint type this implementation does not know; the spec says it fails evaluation.
    #[error("unknown constraint type {0:?}")]
    UnknownConstraint(String),
    /// The open mandate's `cnf` key is not the agent's key.
    #[error("the open mandate's cnf key is not this agent's key")]
    CnfMismatch,
    /// The open Payment Mandate's `payment.reference` does not name the open Checkout Mandate.
    #[error("payment.reference does not match the open checkout mandate")]
    ReferenceMismatch,
    /// The merchant's checkout does not follow the UCP Checkout schema or lacks what AP2 needs.
    #[error("invalid checkout: {0}")]
    InvalidCheckout(String),
    /// The checkout is in a state that cannot be paid (completed, canceled).
    #[error("checkout status {0:?} cannot be paid")]
    CheckoutNotPayable(String),
    /// A currency is not the one required (USD, or the mandate's constraint currency).
    #[error("currency {found:?} where {expected:?} is required")]
    CurrencyMismatch { expected: String, found: String },
    /// An amount is not representable as micro-USD.
    #[error("invalid amount ({code}): {0}", code = .0.code())]
    InvalidAmount(#[from] AmountError),
    /// The payee is not in the open Payment Mandate's `payment.allowed_payees` (or preset `payee`).
    #[error("payee {0:?} is not allowed by the payment mandate")]
    PayeeNotAllowed(String),
    /// The merchant is not in the open Checkout Mandate's `checkout.allowed_merchants`.
    #[error("merchant {0:?} is not allowed by the checkout mandate")]
    MerchantNotAllowed(String),
    /// The total is outside `payment.amount_range`.
    #[error("amount {amount} micros is outside the allowed range {min}..={max} micros")]
    AmountOutOfRange { amount: u64, min: u64, max: u64 },
    /// The total differs from the open mandate's pre-set `payment_amount`.
    #[error("amount {amount} micros differs from the mandate's pre-set amount {preset} micros")]
    AmountMismatch { amount: u64, preset: u64 },
    /// The total plus what this mandate already paid exceeds `payment.budget`.
    #[error("amount {amount} micros plus {spent} already spent exceeds the budget of {max} micros")]
    BudgetExceeded { amount: u64, spent: u64, max: u64 },
    /// The checkout's line items do not satisfy `checkout.line_items`.
    #[error("line items do not satisfy the checkout mandate: {0}")]
    LineItemsNotAllowed(String),
    /// No payment instrument is allowed (or none was chosen and none is pre-set).
    #[error("payment instrument not allowed: {0}")]
    InstrumentNotAllowed(String),
    /// The PISP is not in `payment.allowed_pisps` (or none was given).
    #[error("PISP not allowed: {0}")]
    PispNotAllowed(String),
    /// `payment.agent_recurrence` forbids another payment now.
    #[error("agent recurrence exceeded: {0}")]
    RecurrenceExceeded(String),
    /// `now` is outside `payment.execution_date`.
    #[error("now ({now}) is outside the mandate's execution window")]
    OutsideExecutionWindow { now: i64 },
    /// A key could not be read, written or used.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Signing failed (should not happen with a valid key).
    #[error("signing failed")]
    SigningFailed,
    /// A receipt does not follow its schema.
    #[error("invalid receipt: {0}")]
    ReceiptInvalid(String),
    /// A valid receipt whose status is `Error`.
    #[error("receipt reports error {error:?}: {description}")]
    ReceiptError { error: String, description: String },
    /// A receipt's `reference` is not the hash of the closed mandate it answers.
    #[error("receipt reference does not match the closed mandate")]
    ReceiptReferenceMismatch,
    /// A provider could not be reached (connection, timeout).
    #[error("provider unreachable: {0}")]
    ProviderUnreachable(String),
    /// A provider answered with an HTTP error and no receipt.
    #[error("provider answered HTTP {status}: {detail}")]
    ProviderError { status: u16, detail: String },
    /// A provider's answer is not the documented JSON.
    #[error("provider answer is not understood: {0}")]
    ProviderBadResponse(String),
    /// A v0.1 cart or payment request is invalid.
    #[error("invalid v0.1 cart: {0}")]
    InvalidCart(String),
    /// A configuration value (a base URL) is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl Ap2Error {
    /// The stable, snake_case error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            Ap2Error::MalformedJwt(_) => "ap2_malformed_jwt",
            Ap2Error::AlgNotAllowed(_) => "ap2_alg_not_allowed",
            Ap2Error::BadSignature => "ap2_bad_signature",
            Ap2Error::NonCanonicalSignature => "ap2_signature_not_canonical",
            Ap2Error::UntrustedIssuer(_) => "ap2_untrusted_issuer",
            Ap2Error::Expired { .. } => "ap2_expired",
            Ap2Error::NotYetValid { .. } => "ap2_not_yet_valid",
            Ap2Error::MalformedSdJwt(_) => "ap2_malformed_sd_jwt",
            Ap2Error::UnsupportedSdAlg(_) => "ap2_unsupported_sd_alg",
            Ap2Error::BindingMismatch(_) => "ap2_binding_mismatch",
            Ap2Error::KeyBindingMismatch(_) => "ap2_key_binding_mismatch",
            Ap2Error::WrongMandateType { .. } => "ap2_wrong_mandate_type",
            Ap2Error::InvalidMandate(_) => "ap2_invalid_mandate",
            Ap2Error::UnknownConstraint(_) => "ap2_unknown_constraint",
            Ap2Error::CnfMismatch => "ap2_cnf_mismatch",
            Ap2Error::ReferenceMismatch => "ap2_reference_mismatch",
            Ap2Error::InvalidCheckout(_) => "ap2_invalid_checkout",
            Ap2Error::CheckoutNotPayable(_) => "ap2_checkout_not_payable",
            Ap2Error::CurrencyMismatch { .. } => "ap2_currency_mismatch",
            Ap2Error::InvalidAmount(_) => "ap2_invalid_amount",
            Ap2Error::PayeeNotAllowed(_) => "ap2_payee_not_allowed",
            Ap2Error::MerchantNotAllowed(_) => "ap2_merchant_not_allowed",
            Ap2Error::AmountOutOfRange { .. } => "ap2_amount_out_of_range",
            Ap2Error::AmountMismatch { .. } => "ap2_amount_mismatch",
            Ap2Error::BudgetExceeded { .. } => "ap2_budget_exceeded",
            Ap2Error::LineItemsNotAllowed(_) => "ap2_line_items_not_allowed",
            Ap2Error::InstrumentNotAllowed(_) => "ap2_instrument_not_allowed",
            Ap2Error::PispNotAllowed(_) => "ap2_pisp_not_allowed",
            Ap2Error::RecurrenceExceeded(_) => "ap2_recurrence_exceeded",
            Ap2Error::OutsideExecutionWindow { .. } => "ap2_outside_execution_window",
            Ap2Error::InvalidKey(_) => "ap2_invalid_key",
            Ap2Error::SigningFailed => "ap2_signing_failed",
            Ap2Error::ReceiptInvalid(_) => "ap2_receipt_invalid",
            Ap2Error::ReceiptError { .. } => "ap2_receipt_error",
            Ap2Error::ReceiptReferenceMismatch => "ap2_receipt_reference_mismatch",
            Ap2Error::ProviderUnreachable(_) => "ap2_provider_unreachable",
            Ap2Error::ProviderError { .. } => "ap2_provider_error",
            Ap2Error::ProviderBadResponse(_) => "ap2_provider_bad_response",
            Ap2Error::InvalidCart(_) => "ap2_invalid_cart",
            Ap2Error::InvalidConfig(_) => "ap2_invalid_config",
        }
    }
}
