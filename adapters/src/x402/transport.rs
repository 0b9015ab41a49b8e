//! The HTTP transport of x402: reading a 402, writing the payment header, reading the settlement
//! header. Headers carry standard (padded) base64 over compact JSON.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::error::{clip, X402Error};
use super::wire::{
    PaymentPayload, PaymentRequired, PaymentRequiredV1, PaymentRequiredV2, SettlementResponse, X402Version,
};
use crate::money::AmountError;

/// v2: the server's payment request (on the 402).
pub const PAYMENT_REQUIRED: HeaderName = HeaderName::from_static("payment-required");
/// v2: the client's payment.
pub const PAYMENT_SIGNATURE: HeaderName = HeaderName::from_static("payment-signature");
/// v2: the server's settlement report.
pub const PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("payment-response");
/// v1: the client's payment.
pub const X_PAYMENT: HeaderName = HeaderName::from_static("x-payment");
/// v1: the server's settlement report.
pub const X_PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("x-payment-response");

/// Decoding accepts base64 with or without padding: being strict about padding on input would
/// refuse servers for no safety gain. Encoding always pads (see [`PaymentPayload::to_header`]).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Reads a 402 response: the v2 `PAYMENT-REQUIRED` header when present, the v1 JSON body
/// otherwise.
///
/// Every requirement's amount must be a decimal string of atomic units (digits only); a message
/// with a negative, fractional or empty amount is refused whole, because a server that spells
/// amounts wrongly cannot be trusted on the rest. Whether an amount is payable (its size, its
/// asset) is decided later, by [`super::choose`].
pub fn parse_payment_required(headers: &HeaderMap, body: &[u8]) -> Result<PaymentRequired, X402Error> {
    if let Some(header) = headers.get(&PAYMENT_REQUIRED) {
        const WHAT: &str = "PAYMENT-REQUIRED header";
        let json = decode_base64_header(header).ok_or(X402Error::BadBase64 { what: WHAT })?;
        let value = parse_json(&json, WHAT)?;
        expect_version(&value, 2, WHAT)?;
        let required: PaymentRequiredV2 = from_value(value, WHAT)?;
        for requirement in &required.accepts {
            check_atomic_amount(&requirement.amount)?;
        }
        return Ok(PaymentRequired::V2(required));
    }

    const WHAT: &str = "402 body";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(X402Error::BadJson {
            what: WHAT,
            detail: "the response has no PAYMENT-REQUIRED header and an empty body".to_owned(),
        });
    }
    let value = parse_json(body, WHAT)?;
    if value.get("x402Version").and_then(Value::as_u64) == Some(2) {
        // The reference clients read v2 only from the header; a v2 body is a server bug.
        return Err(X402Error::UnsupportedVersion {
            what: "402 body (x402 v2 asks for payment in the PAYMENT-REQUIRED header)",
            found: "2".to_owned(),
        });
    }
    expect_version(&value, 1, WHAT)?;
    let required: PaymentRequiredV1 = from_value(value, WHAT)?;
    for requirement in &required.accepts {
        check_atomic_amount(&requirement.max_amount_required)?;
    }
    Ok(PaymentRequired::V1(required))
}

impl PaymentPayload {
    /// The header that carries this payment: `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1), with
    /// standard padded base64 over compact JSON.
    pub fn to_header(&self) -> Result<(HeaderName, HeaderValue), X402Error> {
        let name = match self.version() {
            X402Version::V1 => X_PAYMENT,
            X402Version::V2 => PAYMENT_SIGNATURE,
        };
        Ok((name, encode_header(self)?))
    }
}

/// Any x402 message as a header value: standard padded base64 over compact JSON. (The daemon only
/// sends payments; simulated servers in tests send the other messages the same way.)
pub fn encode_header(message: &impl Serialize) -> Result<HeaderValue, X402Error> {
    let json = serde_json::to_vec(message)
        .map_err(|err| X402Error::Encoding { what: "x402 message", detail: err.to_string() })?;
    HeaderValue::from_str(&STANDARD.encode(json))
        .map_err(|err| X402Error::Encoding { what: "x402 header", detail: err.to_string() })
}

/// Reads a payment from a request's `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) header: what a
/// resource server does, and what the simulated servers in the tests do to check the daemon.
pub fn parse_payment_header(headers: &HeaderMap) -> Result<PaymentPayload, X402Error> {
    let (header, what, version) = match (headers.get(&PAYMENT_SIGNATURE), headers.get(&X_PAYMENT)) {
        (Some(header), _) => (header, "PAYMENT-SIGNATURE header", 2),
        (None, Some(header)) => (header, "X-PAYMENT header", 1),
        (None, None) => {
            return Err(X402Error::MissingField {
                what: "request",
                field: "PAYMENT-SIGNATURE or X-PAYMENT header".to_owned(),
            })
        }
    };
    let json = decode_base64_header(header).ok_or(X402Error::BadBase64 { what })?;
    let value = parse_json(&json, what)?;
    expect_version(&value, version, what)?;
    let upto = value.pointer("/accepted/scheme").and_then(Value::as_str) == Some(super::upto::UPTO);
    Ok(match version {
        1 => PaymentPayload::V1(from_value(value, what)?),
        _ if upto => PaymentPayload::UptoV2(from_value(value, what)?),
        _ => PaymentPayload::V2(from_value(value, what)?),
    })
}

/// Reads the settlement report of a paid response: `PAYMENT-RESPONSE` for v2, `X-PAYMENT-RESPONSE`
/// for v1 (the other version's header is accepted as a fallback, since servers that speak both
/// mix them up).
///
/// A missing header is [`X402Error::MissingSettlement`]; anything unreadable in it is
/// [`X402Error::BadSettlement`], with the step that failed in the message. A well-formed report of
/// a failed settlement is `Ok` with `success: false`: what to do with it is the daemon's call.
pub fn parse_settlement(headers: &HeaderMap, version: X402Version) -> Result<SettlementResponse, X402Error> {
    let (primary, fallback, header_text) = match version {
        X402Version::V2 => (PAYMENT_RESPONSE, X_PAYMENT_RESPONSE, "PAYMENT-RESPONSE"),
        X402Version::V1 => (X_PAYMENT_RESPONSE, PAYMENT_RESPONSE, "X-PAYMENT-RESPONSE"),
    };
    let header = headers
        .get(&primary)
        .or_else(|| headers.get(&fallback))
        .ok_or(X402Error::MissingSettlement { header: header_text })?;
    let json = decode_base64_header(header)
        .ok_or_else(|| X402Error::BadSettlement { detail: format!("{header_text} header is not valid base64") })?;
    decode_settlement_json(&json)
}

/// Decodes a settlement report from the JSON inside the header (also what a facilitator's
/// `/settle` answers).
pub fn decode_settlement_json(json: &[u8]) -> Result<SettlementResponse, X402Error> {
    let value: Value = serde_json::from_slice(json)
        .map_err(|err| X402Error::BadSettlement { detail: format!("not JSON: {}", clip(&err.to_string())) })?;
    serde_json::from_value(value).map_err(|err| X402Error::BadSettlement {
        detail: format!("not a settlement object: {}", clip(&err.to_string())),
    })
}

/// Checks that an amount is spelled as x402 spells atomic units: decimal digits only.
pub(crate) fn check_atomic_amount(text: &str) -> Result<(), X402Error> {
    let bad = |source: AmountError| X402Error::BadAmount { amount: clip(text), source };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(text) {
        return Ok(());
    }
    if text.strip_prefix('-').is_some_and(|rest| digits(rest.replacen('.', "", 1).as_str())) {
        return Err(bad(AmountError::Negative));
    }
    if text.split_once('.').is_some_and(|(whole, fraction)| digits(whole) && digits(fraction)) {
        return Err(bad(AmountError::Fractional));
    }
    Err(bad(AmountError::Malformed(clip(text))))
}

fn decode_base64_header(header: &HeaderValue) -> Option<Vec<u8>> {
    let text = header.to_str().ok()?;
    LENIENT_BASE64.decode(text.trim()).ok()
}

fn parse_json(bytes: &[u8], what: &'static str) -> Result<Value, X402Error> {
    serde_json::from_slice(bytes).map_err(|err| X402Error::BadJson { what, detail: clip(&err.to_string()) })
}

fn from_value<T: DeserializeOwned>(value: Value, what: &'static str) -> Result<T, X402Error> {
    serde_json::from_value(value).map_err(|err| X402Error::from_serde(what, &err))
}

/// Looks at `x402Version` before anything else, so that a message of another version is reported
/// as such rather than as whatever field the other version happens to lack.
fn expect_version(value: &Value, expected: u64, what: &'static str) -> Result<(), X402Error> {
    let Some(object) = value.as_object() else {
        return Err(X402Error::BadField { what, detail: "not a JSON object".to_owned() });
    };
    match object.get("x402Version") {
        None => Err(X402Error::MissingField { what, field: "x402Version".to_owned() }),
        Some(found) if found.as_u64() == Some(expected) => Ok(()),
        Some(found) => Err(X402Error::UnsupportedVersion { what, found: clip(&found.to_string()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: HeaderName, value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_str(value).expect("test header value"));
        map
    }

    #[test]
    fn atomic_amounts_must_be_digit_strings() {
        let code = |text: &str| {
            check_atomic_amount(text).map_err(|err| match err {
                X402Error::BadAmount { source, .. } => source.code(),
                other => other.code(),
            })
        };
        assert_eq!(code("10000"), Ok(()));
        assert_eq!(code("0"), Ok(()));
        assert_eq!(code("-1"), Err("amount_negative"));
        assert_eq!(code("-1.5"), Err("amount_negative"));
        assert_eq!(code("1.5"), Err("amount_fractional"));
        assert_eq!(code(""), Err("amount_malformed"));
        assert_eq!(code("1e6"), Err("amount_malformed"));
        assert_eq!(code(" 1"), Err("amount_malformed"));
        assert_eq!(code("0x10"), Err("amount_malformed"));
        assert_eq!(code("-"), Err("amount_malformed"));
    }

    #[test]
    fn settlement_header_decodes_and_reports_failures_clearly() {
        let json = r#"{"success":true,"transaction":"0xabc","network":"eip155:8453","payer":"0x1"}"#;
        let encoded = STANDARD.encode(json);
        let settlement = parse_settlement(&headers(PAYMENT_RESPONSE, &encoded), X402Version::V2).expect("valid report");
        assert!(settlement.success);
        assert_eq!(settlement.transaction, "0xabc");
        assert_eq!(settlement.payer.as_deref(), Some("0x1"));

        // v1 reads X-PAYMENT-RESPONSE, unpadded base64 included.
        let unpadded = encoded.trim_end_matches('=');
        let v1 = parse_settlement(&headers(X_PAYMENT_RESPONSE, unpadded), X402Version::V1).expect("valid report");
        assert_eq!(v1.network, "eip155:8453");

        let failed = r#"{"success":false,"errorReason":"insufficient_funds","transaction":"","network":"base"}"#;
        let failed = parse_settlement(&headers(X_PAYMENT_RESPONSE, &STANDARD.encode(failed)), X402Version::V1)
            .expect("a failure report is still a report");
        assert!(!failed.success);
        assert_eq!(failed.error_reason.as_deref(), Some("insufficient_funds"));

        let code = |map: HeaderMap| parse_settlement(&map, X402Version::V2).map(|_| ()).map_err(|err| err.code());
        assert_eq!(code(HeaderMap::new()), Err("x402_missing_settlement"));
        assert_eq!(code(headers(PAYMENT_RESPONSE, "%%%")), Err("x402_bad_settlement"));
        assert_eq!(code(headers(PAYMENT_RESPONSE, &STANDARD.encode("{not json"))), Err("x402_bad_settlement"));
        assert_eq!(
            code(headers(PAYMENT_RESPONSE, &STANDARD.encode(r#"{"success":true}"#))),
            Err("x402_bad_settlement")
        );
    }

    #[test]
    fn payment_headers_are_read_by_version() {
        let v1 = r#"{"x402Version":1,"scheme":"exact","network":"base","payload":{"signature":"0x00","authorization":{"from":"0x1","to":"0x2","value":"1","validAfter":"0","validBefore":"9","nonce":"0x3"}}}"#;
        let payment = parse_payment_header(&headers(X_PAYMENT, &STANDARD.encode(v1))).expect("v1 payment");
        assert_eq!(payment.version(), X402Version::V1);
        assert_eq!(payment.exact().expect("an exact payment").authorization.value, "1");
        let (name, value) = payment.to_header().expect("encodes");
        assert_eq!(name, X_PAYMENT);
        let again = parse_payment_header(&headers(name, value.to_str().expect("ASCII"))).expect("round trip");
        assert_eq!(again, payment);

        let code = |map: HeaderMap| parse_payment_header(&map).map(|_| ()).map_err(|err| err.code());
        assert_eq!(code(HeaderMap::new()), Err("x402_missing_field"));
        assert_eq!(code(headers(PAYMENT_SIGNATURE, "***")), Err("x402_bad_base64"));
        assert_eq!(code(headers(PAYMENT_SIGNATURE, &STANDARD.encode(v1))), Err("x402_unsupported_version"));
        assert_eq!(
            code(headers(PAYMENT_SIGNATURE, &STANDARD.encode(r#"{"x402Version":2}"#))),
            Err("x402_missing_field")
        );
    }

    #[test]
    fn header_first_then_v1_body() {
        let v2 = r#"{"x402Version":2,"accepts":[]}"#;
        let v1_body = br#"{"x402Version":1,"error":"pay","accepts":[]}"#;
        let both =
            parse_payment_required(&headers(PAYMENT_REQUIRED, &STANDARD.encode(v2)), v1_body).expect("v2 header");
        assert_eq!(both.version(), X402Version::V2);
        let body_only = parse_payment_required(&HeaderMap::new(), v1_body).expect("v1 body");
        assert_eq!(body_only.version(), X402Version::V1);
        assert_eq!(body_only.error(), Some("pay"));
        let empty = parse_payment_required(&HeaderMap::new(), b"  ").map_err(|err| err.code());
        assert_eq!(empty, Err("x402_bad_json"));
    }
}
