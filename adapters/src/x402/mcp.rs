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
}
