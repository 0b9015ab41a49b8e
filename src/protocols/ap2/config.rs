//! The AP2 configuration file (`SPENDCAP_AP2_CONFIG`, JSON): who is trusted to sign what, and
//! where the Credential Provider, the merchants and the v0.1 processor are.
//!
//! ```json
//! {
//!   "trusted_issuers": [ <public JWK>, ... ],
//!   "credential_provider": { "base_url": "https://cp.example", "audience": "cp.example",
//!                            "receipt_keys": [ <public JWK> ] },
//!   "processor_keys": [ <public JWK> ],
//!   "merchants": [ { "id": "merchant_1", "base_url": "https://shop.example",
//!                    "keys": [ <public JWK> ], "audience": "merchant_1" } ],
//!   "payment_instrument": { "id": "card_4242", "type": "card", "description": "Visa ending 4242" },
//!   "v01": { "processor_url": "https://mpp.example", "processor_keys": [ <public JWK> ],
//!            "audience": "mpp.example", "method_name": "CARD" }
//! }
//! ```
//!
//! Keys are public JWKs (EC P-256); a JWK with a private part (`d`) is refused. Unknown fields are
//! refused, so a misspelt option fails start-up instead of being ignored.

use adapters::ap2::types::PaymentInstrument;
use adapters::ap2::Jwk;
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ap2File {
    /// Keys of the users' credential issuers and agent providers (trusted surfaces) that sign
    /// open mandates.
    pub trusted_issuers: Vec<Jwk>,
    pub credential_provider: CredentialProviderEntry,
    /// Keys of the Merchant Payment Processors that sign Payment Receipts.
    #[serde(default)]
    pub processor_keys: Vec<Jwk>,
    pub merchants: Vec<MerchantEntry>,
    /// The owner's payment instrument at the Credential Provider, used when a payment names
    /// none and the open mandate neither pre-sets nor allows exactly one.
    #[serde(default)]
    pub payment_instrument: Option<PaymentInstrument>,
    /// AP2 v0.1 (CartMandate / PaymentMandate); absent: the v0.1 endpoint is off.
    #[serde(default)]
    pub v01: Option<V01Entry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialProviderEntry {
    pub base_url: String,
    /// `aud` of the closed Payment Mandates [default: the base URL's host].
    #[serde(default)]
    pub audience: Option<String>,
    /// Keys that sign the Payment Receipts the Credential Provider sends when it refuses.
    #[serde(default)]
    pub receipt_keys: Vec<Jwk>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantEntry {
    /// The merchant's id, as its checkouts name it (`merchant.id`).
    pub id: String,
    pub base_url: String,
    /// Keys that sign this merchant's checkouts, checkout receipts and v0.1 carts. Only these
    /// verify its checkouts: merchants cannot vouch for each other.
    pub keys: Vec<Jwk>,
    /// `aud` of the closed Checkout Mandates [default: the merchant id].
    #[serde(default)]
    pub audience: Option<String>,
    /// The merchant's name as its v0.1 carts state it (`merchant_name`) [default: none].
    #[serde(default)]
    pub v01_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V01Entry {
    /// The v0.1 payment processor (merchant payment processor or merchant agent) that takes the
    /// PaymentMandate and answers with a signed Payment Receipt.
    pub processor_url: String,
    /// Keys that sign its Payment Receipts [default: the top-level `processor_keys`].
    #[serde(default)]
    pub processor_keys: Vec<Jwk>,
    /// `aud` of `user_authorization` [default: the processor URL's host].
    #[serde(default)]
    pub audience: Option<String>,
    /// The payment method to answer the cart with (`supported_methods`) [default: `CARD`].
    #[serde(default)]
    pub method_name: Option<String>,
}
