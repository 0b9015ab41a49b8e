//! The `payment-identifier` extension (x402 v2): an idempotency key the client sends in the
//! PaymentPayload so that servers and facilitators can deduplicate a retried payment.
//!
//! The server declares `extensions["payment-identifier"] = {info: {required: bool}, schema}`; the
//! client echoes the declaration and adds `info.id`. The reference SDKs validate `info` against the
//! echoed schema, which requires the `required` flag, so an `info` declared without it is echoed
//! with `required: false` (the server did not require one).

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use super::error::X402Error;

/// The extension's key in `extensions`.
pub const PAYMENT_IDENTIFIER: &str = "payment-identifier";

/// A payment identifier: 16 to 128 characters of `A-Z a-z 0-9 - _`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PaymentId(String);

impl PaymentId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PaymentId {
    type Err = X402Error;

    fn from_str(text: &str) -> Result<PaymentId, X402Error> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if !(16..=128).contains(&text.len()) || !text.bytes().all(allowed) {
            return Err(X402Error::BadPaymentId);
        }
        Ok(PaymentId(text.to_owned()))
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `extensions` of a v2 PaymentPayload: the server's declarations echoed (as the reference
/// clients do, so that servers checking the echo accept it), with our id added to
/// `payment-identifier` when the server declared it.
///
/// A server that declares `info.required: true` gets [`X402Error::PaymentIdRequired`] when no id
/// is supplied, rather than a payment it will refuse.
pub(crate) fn payment_extensions(
    declared: Option<&Map<String, Value>>,
    payment_id: Option<&PaymentId>,
) -> Result<Option<Map<String, Value>>, X402Error> {
    let Some(declared) = declared else { return Ok(None) };
    let mut extensions = declared.clone();
    if let Some(Value::Object(extension)) = extensions.get_mut(PAYMENT_IDENTIFIER) {
        let mut info = match extension.get("info") {
            Some(Value::Object(info)) => info.clone(),
            _ => Map::new(),
        };
        match payment_id {
            Some(id) => {
                info.entry("required").or_insert(Value::Bool(false));
                info.insert("id".to_owned(), Value::String(id.as_str().to_owned()));
                extension.insert("info".to_owned(), Value::Object(info));
            }
            None if info.get("required") == Some(&Value::Bool(true)) => return Err(X402Error::PaymentIdRequired),
            // Without an id, the declaration is dropped rather than echoed half-filled.
            None => {
                extensions.remove(PAYMENT_IDENTIFIER);
            }
        }
    }
    Ok(if extensions.is_empty() { None } else { Some(extensions) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test extensions must be an object"),
        }
    }

    #[test]
    fn ids_are_16_to_128_safe_characters() {
        assert!("pay_7d5d747be160e280".parse::<PaymentId>().is_ok());
        assert!("a".repeat(128).parse::<PaymentId>().is_ok());
        for bad in ["short", &"a".repeat(129), "pay_7d5d747be160 e280", "pay_7d5d747be160é280", "pay/7d5d747be160e280"]
        {
            assert_eq!(bad.parse::<PaymentId>().map_err(|e| e.code()), Err("x402_bad_payment_id"), "{bad:?}");
        }
    }

    #[test]
    fn the_declaration_is_echoed_with_the_id() {
        let schema = json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"required": {"type": "boolean"}, "id": {"type": "string", "minLength": 16, "maxLength": 128}},
            "required": ["required"]});
        let server = declared(json!({
            "payment-identifier": {"info": {"required": false}, "schema": schema.clone()},
            "bazaar": {"info": {"x": 1}}
        }));
        let id: PaymentId = "pay_7d5d747be160e280504c099d984bcfe0".parse().expect("valid id");
        let sent = payment_extensions(Some(&server), Some(&id)).expect("builds").expect("some extensions");
        assert_eq!(
            Value::Object(sent),
            json!({
                "payment-identifier": {"info": {"required": false, "id": "pay_7d5d747be160e280504c099d984bcfe0"}, "schema": schema},
                "bazaar": {"info": {"x": 1}}
            })
        );

        // The spec's own example declares `info: {}`.
        let bare = declared(json!({"payment-identifier": {"info": {}}}));
        let sent = payment_extensions(Some(&bare), Some(&id)).expect("builds").expect("some extensions");
        assert_eq!(sent["payment-identifier"]["info"], json!({"required": false, "id": id.as_str()}));
    }

    #[test]
    fn no_declaration_no_extension_and_required_ids_are_enforced() {
        let id: PaymentId = "pay_7d5d747be160e280504c099d984bcfe0".parse().expect("valid id");
        assert_eq!(payment_extensions(None, Some(&id)), Ok(None));
        let other = declared(json!({"bazaar": {}}));
        let sent = payment_extensions(Some(&other), Some(&id)).expect("builds").expect("echoed");
        assert!(!sent.contains_key(PAYMENT_IDENTIFIER));

        let optional = declared(json!({"payment-identifier": {"info": {"required": false}}}));
        assert_eq!(payment_extensions(Some(&optional), None), Ok(None));
        let required = declared(json!({"payment-identifier": {"info": {"required": true}}}));
        assert_eq!(payment_extensions(Some(&required), None).map_err(|e| e.code()), Err("x402_payment_id_required"));
    }
}
