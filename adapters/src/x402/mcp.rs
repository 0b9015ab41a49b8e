//! The x402 MCP binding (as the official x402 Python package 2.25's `x402.mcp` speaks it): a paid
//! tool answers a call without payment with a tool result `isError: true` whose
//! `structuredContent` (or, failing that, the first text content, as JSON) is a `PaymentRequired`;
//! the client retries the same call with the signed `PaymentPayload` in
//! `params._meta["x402/payment"]`; the paid result carries the `SettlementResponse` in
//! `result._meta["x402/payment-response"]`.
//!
//! Pure functions over JSON values (the MCP face has the rmcp types; this crate knows no MCP
//! library). Another binding (MPP's JSON-RPC `-32042` with `org.paymentauth/credential`) is one
//! more [`McpPaymentBinding`] variant with its own reading and writing.

use serde_json::{Map, Value};

use super::error::X402Error;
use super::transport::{encode_header, PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE};
use super::wire::{PaymentPayload, PaymentRequired, PaymentRequiredV1, PaymentRequiredV2, SettlementResponse};

/// `params._meta` key of the payment.
pub const MCP_PAYMENT_META_KEY: &str = "x402/payment";
/// `result._meta` key of the settlement report.
pub const MCP_PAYMENT_RESPONSE_META_KEY: &str = "x402/payment-response";

/// The ways an upstream MCP tool can ask for payment. Only x402's is spoken so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum McpPaymentBinding {
    /// x402: `isError` result carrying `PaymentRequired`; `_meta["x402/payment"]`.
    X402,
}

/// The `PaymentRequired` a tool result asks for, if it is an x402 payment request: an error
/// result (`isError: true`) whose `structuredContent`, or else whose first text content parsed
/// as JSON, is a v1 or v2 `PaymentRequired`. `None` for any other result (a paid tool's answer,
/// an ordinary tool error).
pub fn payment_required_of_tool_result(result: &Value) -> Option<PaymentRequired> {
    if result.get("isError").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    if let Some(required) = result.get("structuredContent").and_then(payment_required_of_object) {
        return Some(required);
    }
    let text = result.get("content")?.as_array()?.first()?;
    if text.get("type").and_then(Value::as_str) != Some("text") {
        return None;
    }
    let parsed: Value = serde_json::from_str(text.get("text")?.as_str()?).ok()?;
    payment_required_of_object(&parsed)
}

fn payment_required_of_object(object: &Value) -> Option<PaymentRequired> {
    object.get("accepts")?;
    match object.get("x402Version").and_then(Value::as_u64)? {
        1 => serde_json::from_value::<PaymentRequiredV1>(object.clone()).ok().map(PaymentRequired::V1),
        2 => serde_json::from_value::<PaymentRequiredV2>(object.clone()).ok().map(PaymentRequired::V2),
        _ => None,
    }
}

/// The retried call's `_meta`: the caller's own `_meta` (if any) with the payment added.
pub fn meta_with_payment(
    meta: Option<&Map<String, Value>>,
    payment: &PaymentPayload,
) -> Result<Map<String, Value>, X402Error> {
    let mut meta = meta.cloned().unwrap_or_default();
    let payment = serde_json::to_value(payment)
        .map_err(|err| X402Error::Encoding { what: "x402 MCP payment", detail: err.to_string() })?;
    meta.insert(MCP_PAYMENT_META_KEY.to_owned(), payment);
    Ok(meta)
}

/// The settlement report in a tool result's `_meta` (also where the official server puts it on
/// a settlement failure: in `structuredContent`). `Err(MissingSettlement)` when there is none.
pub fn settlement_of_tool_result(result: &Value) -> Result<SettlementResponse, X402Error> {
    let report = result
        .get("_meta")
        .and_then(|meta| meta.get(MCP_PAYMENT_RESPONSE_META_KEY))
        .or_else(|| result.get("structuredContent").and_then(|content| content.get(MCP_PAYMENT_RESPONSE_META_KEY)))
        .ok_or(X402Error::MissingSettlement { header: "_meta[\"x402/payment-response\"]" })?;
    let report = match report {
        Value::String(text) => serde_json::from_str(text),
        other => serde_json::from_value(other.clone()),
    };
    report.map_err(|err| X402Error::BadSettlement { detail: format!("x402/payment-response: {err}") })
}

/// A tool result in the shape of the HTTP answer the x402 purchase flow reads, so that one flow
/// pays both transports: a payment request is a 402 with the v2 `PAYMENT-REQUIRED` header (a v1
/// request is the 402's body); any other result is a 200 whose body is the result's JSON; a
/// settlement report (success or failure) becomes the `PAYMENT-RESPONSE` header (v2) and the
/// `X-PAYMENT-RESPONSE` header (v1). Returns (status, headers, body).
pub fn http_answer_of_tool_result(result: &Value) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut headers = Vec::new();
    let settlement = settlement_of_tool_result(result).ok().and_then(|settlement| encode_header(&settlement).ok());
    if let Some(text) = settlement.as_ref().and_then(|value| value.to_str().ok()) {
        headers.push((PAYMENT_RESPONSE.as_str().to_owned(), text.to_owned()));
        headers.push((X_PAYMENT_RESPONSE.as_str().to_owned(), text.to_owned()));
    }
    let body = serde_json::to_vec(result).unwrap_or_default();
    match payment_required_of_tool_result(result) {
        Some(PaymentRequired::V2(required)) => {
            if let Some(text) = encode_header(&required).ok().and_then(|value| value.to_str().ok().map(str::to_owned)) {
                headers.push((PAYMENT_REQUIRED.as_str().to_owned(), text));
            }
            (402, headers, body)
        }
        Some(PaymentRequired::V1(required)) => (402, headers, serde_json::to_vec(&required).unwrap_or_default()),
        None => (200, headers, body),
    }
}

/// The tool result carried by an answer made by [`http_answer_of_tool_result`] (its body), for
/// a 200; `None` when the body is not a JSON object.
pub fn tool_result_of_http_body(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(body).ok()? {
        Value::Object(object) => Some(object),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `x402.mcp`'s server wrapper (x402 2.25, `_create_payment_required_result`) returns.
    fn official_payment_required() -> Value {
        let required = json!({
            "x402Version": 2,
            "error": "Payment required to access this tool",
            "resource": {"url": "mcp://tool/get_weather", "description": "Tool: get_weather", "mimeType": "application/json"},
            "accepts": [{
                "scheme": "exact", "network": "eip155:84532", "amount": "1000",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C", "maxTimeoutSeconds": 300,
                "extra": {"name": "USDC", "version": "2"}
            }]
        });
        json!({
            "content": [{"type": "text", "text": required.to_string()}],
            "structuredContent": required,
            "isError": true
        })
    }

    #[test]
    fn a_payment_request_is_read_from_structured_content_or_text() {
        let result = official_payment_required();
        let Some(PaymentRequired::V2(required)) = payment_required_of_tool_result(&result) else {
            panic!("a v2 payment request")
        };
        assert_eq!(required.accepts[0].amount, "1000");
        let mut text_only = result.clone();
        text_only.as_object_mut().expect("object").remove("structuredContent");
        assert!(matches!(payment_required_of_tool_result(&text_only), Some(PaymentRequired::V2(_))));
    }

    #[test]
    fn other_results_are_not_payment_requests() {
        let mut not_error = official_payment_required();
        not_error["isError"] = json!(false);
        assert!(payment_required_of_tool_result(&not_error).is_none());
        let plain_error = json!({"content": [{"type": "text", "text": "city not found"}], "isError": true});
        assert!(payment_required_of_tool_result(&plain_error).is_none());
        let other_json =
            json!({"content": [{"type": "text", "text": "{\"x402Version\":3,\"accepts\":[]}"}], "isError": true});
        assert!(payment_required_of_tool_result(&other_json).is_none());
    }

    #[test]
    fn the_settlement_is_read_from_meta() {
        let paid = json!({
            "content": [{"type": "text", "text": "sunny"}],
            "_meta": {"x402/payment-response": {"success": true, "transaction": "0xabc", "network": "eip155:84532", "amount": "1000"}}
        });
        let settlement = settlement_of_tool_result(&paid).expect("a settlement");
        assert!(settlement.success);
        assert_eq!(settlement.amount.as_deref(), Some("1000"));
        assert_eq!(
            settlement_of_tool_result(&json!({"content": []})).map_err(|e| e.code()),
            Err("x402_missing_settlement")
        );
        let broken = json!({"_meta": {"x402/payment-response": {"success": "yes"}}});
        assert_eq!(settlement_of_tool_result(&broken).map_err(|e| e.code()), Err("x402_bad_settlement"));
    }

    #[test]
    fn a_tool_result_reads_as_the_http_answer_the_purchase_flow_expects() {
        use http::header::{HeaderMap, HeaderName, HeaderValue};
        let to_map = |headers: &[(String, String)]| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(
                    HeaderName::try_from(name.as_str()).expect("name"),
                    HeaderValue::from_str(value).expect("value"),
                );
            }
            map
        };
        let (status, headers, body) = http_answer_of_tool_result(&official_payment_required());
        assert_eq!(status, 402);
        let required = crate::x402::parse_payment_required(&to_map(&headers), &body).expect("a 402 the flow reads");
        assert!(matches!(required, PaymentRequired::V2(r) if r.accepts[0].amount == "1000"));

        let paid = json!({
            "content": [{"type": "text", "text": "sunny"}],
            "_meta": {"x402/payment-response": {"success": true, "transaction": "0xabc", "network": "eip155:84532"}}
        });
        let (status, headers, body) = http_answer_of_tool_result(&paid);
        assert_eq!(status, 200);
        let settlement =
            crate::x402::parse_settlement(&to_map(&headers), crate::x402::X402Version::V2).expect("a settlement");
        assert_eq!(settlement.transaction, "0xabc");
        assert_eq!(tool_result_of_http_body(&body), paid.as_object().cloned());

        let (status, headers, _) = http_answer_of_tool_result(&json!({"content": [], "isError": true}));
        assert_eq!((status, headers.len()), (200, 0));
    }
}
