//! The one error type of the x402 adapter. Every case has a stable snake_case `code()` that the
//! daemon passes on to agents and writes into refusal log lines.

use crate::money::AmountError;

/// Why an x402 message could not be parsed, chosen, signed or decoded.
///
/// Values quoted from outside input are clipped (see [`clip`]) so that a hostile server cannot
/// blow up a log line. No case ever carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X402Error {
    #[error("{what} is not valid base64")]
    BadBase64 { what: &'static str },
    #[error("{what} is not valid JSON: {detail}")]
    BadJson { what: &'static str, detail: String },
    #[error("unsupported x402 version {found} in {what}")]
    UnsupportedVersion { what: &'static str, found: String },
    #[error("{what} lacks the required field `{field}`")]
    MissingField { what: &'static str, field: String },
    #[error("{what} has a field of the wrong type: {detail}")]
    BadField { what: &'static str, detail: String },
    #[error("amount {amount:?} is not acceptable: {source}")]
    BadAmount { amount: String, source: AmountError },
    #[error("`{field}` is not a 0x-prefixed 20-byte hex address: {value:?}")]
    BadAddress { field: &'static str, value: String },
    #[error("unsupported payment scheme {scheme:?} (only `exact` with EIP-3009 is paid)")]
    UnsupportedScheme { scheme: String },
    #[error("network {network:?} is not allow-listed")]
    UnknownNetwork { network: String },
    #[error("asset {asset} is not allow-listed on network {network:?}")]
    UnknownAsset { network: String, asset: String },
    #[error("EIP-712 domain {field} {found:?} does not match the expected {expected:?} for this asset")]
    DomainMismatch { field: &'static str, expected: String, found: String },
    #[error("price of {amount} micros is over the per-payment maximum of {maximum} micros")]
    OverPaymentMaximum { amount: u64, maximum: u64 },
    #[error("maxTimeoutSeconds must be greater than zero")]
    BadTimeout,
    #[error("no acceptable payment requirement: {}", reasons.join("; "))]
    NoAcceptableRequirement { reasons: Vec<String> },
    #[error("the EVM private key is not 32 bytes of hex, or is not a valid secp256k1 key")]
    BadPrivateKey,
    #[error("nonce is not 0x followed by 64 hex digits: {value:?}")]
    BadNonce { value: String },
    #[error("payment identifier must be 16 to 128 characters of A-Z, a-z, 0-9, `-` and `_`")]
    BadPaymentId,
    #[error("the server requires a payment identifier and none was supplied")]
    PaymentIdRequired,
    #[error("signature is invalid: {detail}")]
    BadSignature { detail: String },
    #[error("signing failed: {detail}")]
    SigningFailed { detail: String },
    #[error("the response carries no {header} header")]
    MissingSettlement { header: &'static str },
    #[error("settlement response is malformed: {detail}")]
    BadSettlement { detail: String },
    #[error("could not encode {what}: {detail}")]
    Encoding { what: &'static str, detail: String },
}

impl X402Error {
    /// The stable, snake_case error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            X402Error::BadBase64 { .. } => "x402_bad_base64",
            X402Error::BadJson { .. } => "x402_bad_json",
            X402Error::UnsupportedVersion { .. } => "x402_unsupported_version",
            X402Error::MissingField { .. } => "x402_missing_field",
            X402Error::BadField { .. } => "x402_bad_field",
            X402Error::BadAmount { .. } => "x402_bad_amount",
            X402Error::BadAddress { .. } => "x402_bad_address",
            X402Error::UnsupportedScheme { .. } => "x402_unsupported_scheme",
            X402Error::UnknownNetwork { .. } => "x402_unknown_network",
            X402Error::UnknownAsset { .. } => "x402_unknown_asset",
            X402Error::DomainMismatch { .. } => "x402_domain_mismatch",
            X402Error::OverPaymentMaximum { .. } => "x402_over_payment_maximum",
            X402Error::BadTimeout => "x402_bad_timeout",
            X402Error::NoAcceptableRequirement { .. } => "x402_no_acceptable_requirement",
            X402Error::BadPrivateKey => "x402_bad_private_key",
            X402Error::BadNonce { .. } => "x402_bad_nonce",
            X402Error::BadPaymentId => "x402_bad_payment_id",
            X402Error::PaymentIdRequired => "x402_payment_id_required",
            X402Error::BadSignature { .. } => "x402_bad_signature",
            X402Error::SigningFailed { .. } => "x402_signing_failed",
            X402Error::MissingSettlement { .. } => "x402_missing_settlement",
            X402Error::BadSettlement { .. } => "x402_bad_settlement",
            X402Error::Encoding { .. } => "x402_encoding_failed",
        }
    }

    /// Classifies a serde error raised while reading a typed message: a missing field gets its own
    /// code (servers most often forget one), any other mismatch is a field of the wrong type.
    pub(crate) fn from_serde(what: &'static str, err: &serde_json::Error) -> X402Error {
        let message = err.to_string();
        // serde's derive reports a missing field as "missing field `name`"; the text is part of
        // serde's public de::Error::missing_field contract and has not changed since 1.0.
        if let Some(rest) = message.strip_prefix("missing field `") {
            if let Some((field, _)) = rest.split_once('`') {
                return X402Error::MissingField { what, field: clip(field) };
            }
        }
        X402Error::BadField { what, detail: clip(&message) }
    }
}

/// At most this many characters of an outside value are quoted in an error.
const CLIP_CHARS: usize = 80;

/// Shortens outside text for error messages, on a character boundary.
pub(crate) fn clip(text: &str) -> String {
    match text.char_indices().nth(CLIP_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
