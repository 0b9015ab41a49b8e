//! Google's Agent Payments Protocol (AP2): v0.2 SD-JWT mandates signed with ES256, and v0.1
//! CartMandate / PaymentMandate.
//!
//! # The v0.2 human-not-present payment, as the daemon runs it
//!
//! The user (or the agent provider's trusted surface) signs an **open** Checkout Mandate and an
//! **open** Payment Mandate naming the agent's public key as `cnf`. The agent's key is an
//! [`AgentKey`] held by the daemon. To pay a merchant's checkout:
//!
//! 1. [`verify_open_mandates`] — signatures by a trusted issuer, `vct`, expiry, `cnf` = the
//!    agent's key, `payment.reference` = hash of the open Checkout Mandate; yields
//!    [`MandateConstraints`] (amount range, budget, allowed payees and merchants, line items, ...).
//! 2. [`verify_checkout_jwt`] — the merchant-signed UCP Checkout: signature, expiry, USD, total.
//! 3. [`authorize_payment`] — the checkout against every constraint; yields the
//!    [`PaymentIntent`](crate::PaymentIntent) to hold.
//! 4. The daemon holds the amount in its ledger.
//! 5. [`close_mandates`] — signs the **closed** Checkout and Payment Mandates (KB-SD-JWTs bound
//!    by `sd_hash` to the open ones, `checkout_hash` = `transaction_id` =
//!    base64url(SHA-256(checkout_jwt))).
//! 6. [`CredentialProviderClient::request_credential`] — Payment Mandates in, payment token out.
//! 7. [`MerchantClient::complete_checkout`] — token and Checkout Mandates in, receipts out;
//!    settle when [`Completion::is_paid`], void otherwise.
//!
//! Time is always the caller's `now` (Unix seconds). A token is expired when `now >= exp`.
//!
//! # HTTP binding
//!
//! AP2 fixes no HTTP binding between the shopping agent and its providers. spendcap uses this one:
//! JSON bodies, `Content-Type: application/json`, paths appended to each provider's configured
//! base URL. Mandate chains are the Delegate SD-JWT compact form
//! `<open SD-JWT>~~<closed KB-SD-JWT>~<disclosures>~`; receipts are compact ES256 JWTs.
//!
//! **Credential Provider** — `POST {base}/ap2/v0.2/payment-credentials`
//!
//! ```json
//! { "payment_mandate": "<open payment mandate>~~<closed payment mandate>~...~",
//!   "checkout_hash": "<base64url SHA-256 of checkout_jwt>",
//!   "open_checkout_hash": "<sd_hash of the open checkout mandate>" }
//! ```
//!
//! Answers: `2xx {"payment_token": "<opaque>"}` issues a token. A refusal is any status with
//! `{"payment_receipt": "<Payment Receipt JWT, status Error, signed by the Credential Provider>"}`;
//! an HTTP error without a receipt may carry `{"error", "error_description"}`.
//!
//! **Merchant** — `POST {base}/ap2/v0.2/checkouts/{checkout id}/complete`
//!
//! ```json
//! { "checkout_mandate": "<open checkout mandate>~~<closed checkout mandate>~...~",
//!   "payment_token": "<from the Credential Provider>",
//!   "checkout_hash": "...", "open_checkout_hash": "..." }
//! ```
//!
//! Answers (any status): `{"checkout_receipt": "<Checkout Receipt JWT signed by the merchant>",
//! "payment_receipt": "<Payment Receipt JWT signed by the Merchant Payment Processor>"}`; the
//! payment receipt may be absent when the merchant refused before paying. An HTTP error without
//! a checkout receipt may carry `{"error", "error_description"}`.
//!
//! A receipt's `reference` must name the closed mandate it answers: base64url(SHA-256) of the
//! closed mandate's JWT (as the reference SDK computes it) or of the closed KB-SD-JWT with its
//! disclosures (as `sd_hash` is computed); both are accepted ([`MandateReference`]).
//!
//! Every mandate sent is recorded, decoded, with the
//! [`ConformanceSink`](crate::conformance::ConformanceSink) under protocol `ap2`, types
//! `open_payment_mandate`, `payment_mandate`, `open_checkout_mandate`, `checkout_mandate`;
//! v0.1 PaymentMandates under `ap2-v0.1` / `PaymentMandate`. Receipts are received, not sent,
//! and are schema-checked on receipt instead.
//!
//! # Errors
//!
//! Every failure is an [`Ap2Error`] with a stable snake_case [`Ap2Error::code`].

mod client;
mod decimal;
mod error;
mod jose;
mod key;
mod mandate;
mod pay;
mod receipt;
mod sd_jwt;
mod time;
pub mod types;
pub mod v01;

#[cfg(test)]
mod tests;

pub use client::{
    read_answer, Completion, CredentialOutcome, CredentialProviderClient, MerchantClient, PaymentCredential,
    ProviderConfig,
};
pub use decimal::JsonDecimal;
pub use error::Ap2Error;
pub use jose::{
    checkout_hash, content_hash, public_jwk, sha256_b64url, thumbprint, verify_jws, verifying_key, JwsHeader,
    VerifiedJws, ES256,
};
pub use key::AgentKey;
pub use mandate::{
    verify_mandate_chain, verify_open_mandates, AmountLimits, Budget, ExecutionWindow, MandateConstraints,
    OpenMandates, Recurrence, VerifiedChain, USD,
};
pub use pay::{
    authorize_payment, close_mandates, random_nonce, verify_checkout_jwt, AuthorizedPayment, CloseParams,
    ClosedMandates, MandateReference, MandateUsage, PaymentChoice, VerifiedCheckout,
};
pub use receipt::{verify_checkout_receipt, verify_payment_receipt};
pub use sd_jwt::{
    delegate_content, join_chain, split_chain, verify_kb_sd_jwt, verify_sd_jwt, Disclosure, KeyBinding, SdJwt,
    VerifiedKeyBinding, VerifiedSdJwt, SD_ALG, TYP_KB_SD_JWT,
};
pub use time::parse_datetime;
pub use types::Jwk;
