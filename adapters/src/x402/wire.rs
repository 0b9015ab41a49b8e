//! x402 wire types, v1 and v2, exactly as they travel (camelCase JSON, base64 in headers).
//!
//! Amounts stay decimal strings here; [`super::choose`] turns the chosen one into [`Micros`].
//! Absent optional fields are omitted, never `null`. Requirement and resource objects keep the
//! fields this crate does not know in `other`, so that echoing a requirement (v2 `accepted`)
//! gives back what the server sent.
//!
//! [`Micros`]: crate::money::Micros

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The `x402Version` field of a message that only exists in protocol version `N`.
///
/// Deserializing refuses every other number, so a v1 type can never silently read a v2 message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Version<const N: u8>;

pub type V1 = Version<1>;
pub type V2 = Version<2>;

impl<const N: u8> Version<N> {
    pub const NUMBER: u8 = N;
}

impl<const N: u8> Serialize for Version<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(N)
    }
}

impl<'de, const N: u8> Deserialize<'de> for Version<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let found = u64::deserialize(deserializer)?;
        if found == u64::from(N) {
            Ok(Version)
        } else {
            Err(serde::de::Error::custom(format!("x402Version {found} where {N} is expected")))
        }
    }
}

/// The protocol version of a whole exchange, for code that handles both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum X402Version {
    V1,
    V2,
}

impl X402Version {
    pub fn number(self) -> u8 {
        match self {
            X402Version::V1 => 1,
            X402Version::V2 => 2,
        }
    }
}

impl fmt::Display for X402Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// A v1 402 response body: `{x402Version: 1, error, accepts}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1 {
    pub x402_version: V1,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub accepts: Vec<PaymentRequirementsV1>,
}

/// One way to pay that a v1 server accepts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirementsV1 {
    pub scheme: String,
    pub network: String,
    /// Decimal string of the asset's atomic units; the `exact` scheme pays exactly this.
    pub max_amount_required: String,
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub asset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
    /// Fields this crate does not know, kept so the requirement can be recorded as it came.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What a v2 server says is behind the paywall.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The decoded v2 `PAYMENT-REQUIRED` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV2 {
    pub x402_version: V2,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub accepts: Vec<PaymentRequirementsV2>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// One way to pay that a v2 server accepts. Echoed verbatim as `accepted` in the payment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirementsV2 {
    pub scheme: String,
    /// CAIP-2 network id, e.g. `eip155:8453`.
    pub network: String,
    /// Decimal string of the asset's atomic units; the `exact` scheme pays exactly this.
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
    /// Fields this crate does not know, kept so that `accepted` echoes the server's requirement.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A parsed 402: the v2 header or the v1 body.
#[derive(Clone, Debug, PartialEq)]
pub enum PaymentRequired {
    V1(PaymentRequiredV1),
    V2(PaymentRequiredV2),
}

impl PaymentRequired {
    pub fn version(&self) -> X402Version {
        match self {
            PaymentRequired::V1(_) => X402Version::V1,
            PaymentRequired::V2(_) => X402Version::V2,
        }
    }

    /// The server's reason, set when it rejects a payment by answering 402 again.
    pub fn error(&self) -> Option<&str> {
        match self {
            PaymentRequired::V1(required) => required.error.as_deref(),
            PaymentRequired::V2(required) => required.error.as_deref(),
        }
    }
}

/// The `exact` scheme's EVM payload: an EIP-3009 authorization and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactEvmPayload {
    /// 65 bytes r‖s‖v (v = 27 or 28), 0x-hex.
    pub signature: String,
    pub authorization: ExactEvmAuthorization,
}

/// EIP-3009 `TransferWithAuthorization` arguments: addresses 0x-hex, numbers decimal strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactEvmAuthorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    /// 0x followed by 64 hex digits (32 bytes).
    pub nonce: String,
}

/// A v1 payment, sent base64-encoded in the `X-PAYMENT` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: V1,
    pub scheme: String,
    pub network: String,
    pub payload: ExactEvmPayload,
}

/// A v2 payment, sent base64-encoded in the `PAYMENT-SIGNATURE` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV2 {
    pub x402_version: V2,
    /// The chosen requirement, as the server sent it.
    pub accepted: PaymentRequirementsV2,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub payload: ExactEvmPayload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// A signed payment of either version. Serializes as the version's own JSON object.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
// A payment lives for one request; a few hundred bytes on the stack cost less than a box.
#[allow(clippy::large_enum_variant)]
pub enum PaymentPayload {
    V1(PaymentPayloadV1),
    V2(PaymentPayloadV2),
    /// v2 in the `upto` scheme: a Permit2 authorization of a maximum.
    UptoV2(super::upto::UptoPaymentPayloadV2),
}

impl PaymentPayload {
    pub fn version(&self) -> X402Version {
        match self {
            PaymentPayload::V1(_) => X402Version::V1,
            PaymentPayload::V2(_) | PaymentPayload::UptoV2(_) => X402Version::V2,
        }
    }

    /// The signed EIP-3009 authorization and its signature (`None` for an `upto` payment).
    pub fn exact(&self) -> Option<&ExactEvmPayload> {
        match self {
            PaymentPayload::V1(payment) => Some(&payment.payload),
            PaymentPayload::V2(payment) => Some(&payment.payload),
            PaymentPayload::UptoV2(_) => None,
        }
    }

    /// The signed Permit2 authorization of an `upto` payment.
    pub fn upto(&self) -> Option<&super::upto::UptoPermit2Payload> {
        match self {
            PaymentPayload::UptoV2(payment) => Some(&payment.payload),
            _ => None,
        }
    }

    /// The 32-byte nonce the payment was signed with, whatever its scheme's spelling.
    pub fn nonce(&self) -> Result<super::sign::Nonce, super::error::X402Error> {
        match self {
            PaymentPayload::UptoV2(payment) => {
                super::upto::nonce_from_decimal(&payment.payload.permit2_authorization.nonce)
            }
            PaymentPayload::V1(payment) => payment.payload.authorization.nonce.parse(),
            PaymentPayload::V2(payment) => payment.payload.authorization.nonce.parse(),
        }
    }

    /// The Unix second after which the signed authorization is dead (`validBefore`, `deadline`).
    pub fn valid_until(&self) -> &str {
        match self {
            PaymentPayload::V1(payment) => &payment.payload.authorization.valid_before,
            PaymentPayload::V2(payment) => &payment.payload.authorization.valid_before,
            PaymentPayload::UptoV2(payment) => &payment.payload.permit2_authorization.deadline,
        }
    }
}

/// What the server (through its facilitator) reports after settling, from the `PAYMENT-RESPONSE`
/// (v2) or `X-PAYMENT-RESPONSE` (v1) header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The transaction hash; `""` when settlement failed.
    pub transaction: String,
    pub network: String,
    /// The settled amount in atomic units, when the server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_types_refuse_other_versions() {
        assert_eq!(serde_json::to_string(&Version::<2>).expect("serializes"), "2");
        assert!(serde_json::from_str::<V2>("2").is_ok());
        assert!(serde_json::from_str::<V2>("1").is_err());
        assert!(serde_json::from_str::<V1>("2").is_err());
        assert!(serde_json::from_str::<V1>("\"1\"").is_err());
        let v1_body = r#"{"x402Version":1,"accepts":[]}"#;
        assert!(serde_json::from_str::<PaymentRequiredV2>(v1_body).is_err());
        assert!(serde_json::from_str::<PaymentRequiredV1>(v1_body).is_ok());
    }

    #[test]
    fn absent_optional_fields_are_omitted_and_unknown_fields_kept() {
        let text = r#"{"scheme":"exact","network":"eip155:8453","amount":"10","asset":"0xa","payTo":"0xb","maxTimeoutSeconds":60,"future":{"x":1}}"#;
        let requirement: PaymentRequirementsV2 = serde_json::from_str(text).expect("valid requirement");
        assert_eq!(requirement.other.get("future"), Some(&serde_json::json!({"x": 1})));
        let back: Value = serde_json::to_value(&requirement).expect("serializes");
        assert_eq!(back, serde_json::from_str::<Value>(text).expect("valid JSON"));
        assert!(!serde_json::to_string(&requirement).expect("serializes").contains("null"));
    }
}
