//! The one place where an answer of the agent API becomes an MCP tool result, for both
//! transports: a success is structured content; any error — a budget refusal above all — is a
//! result with `isError: true` whose structured content names the `code`, says whether a retry can
//! help (`retryable`), and what to do. Every `*_micros` amount becomes a `*_usd` exact decimal
//! string (`"0.02"`, `"1.50"`, `"0.000125"`), so a model never has to convert units.

use adapters::Micros;
use rmcp::model::CallToolResult;
use serde_json::{json, Map, Value};

use super::backend::{Answer, Unanswered};
use super::explain::{explain, is_budget_refusal};

/// The tool result of one call. `idempotency_key` is the key a paying call was made with: it is
/// returned so that a retry can name the same purchase.
pub(crate) fn tool_result(answer: Result<Answer, Unanswered>, idempotency_key: Option<&str>) -> CallToolResult {
    let with_key = |mut object: Map<String, Value>| {
        if let Some(key) = idempotency_key {
            object.insert("idempotency_key".into(), Value::String(key.to_owned()));
        }
        Value::Object(object)
    };
    match answer {
        Ok(Answer { status, body }) if (200..300).contains(&status) => {
            let mut object = match in_usd(body) {
                Value::Object(object) => object,
                other => Map::from_iter([("result".to_owned(), other)]),
            };
            // A payment that waits for a person's approval (202) is not an error: it is held, and
            // the agent is told how to go on.
            if let Some(explanation) = object.get("code").and_then(Value::as_str).and_then(super::explain::explain) {
                object.insert("what_to_do".into(), Value::String(explanation.what_to_do.to_owned()));
                object.insert("retryable".into(), Value::Bool(explanation.retryable));
            }
            CallToolResult::structured(with_key(object))
        }
        Ok(Answer { status, body }) => CallToolResult::structured_error(with_key(error_content(status, body))),
        Err(Unanswered::NoToken) => CallToolResult::structured_error(with_key(error_content(
            401,
            json!({ "code": "invalid_token", "detail": "this MCP request carries no agent token" }),
        ))),
        Err(Unanswered::Unreachable(detail)) => CallToolResult::structured_error(with_key(error_content(
            0,
            json!({ "code": "daemon_unreachable", "detail": detail }),
        ))),
    }
}

/// An error result for input the tool itself refuses before calling anything.
pub(crate) fn invalid_input(code: &str, detail: String) -> CallToolResult {
    CallToolResult::structured_error(Value::Object(error_content(422, json!({ "code": code, "detail": detail }))))
}

/// The structured content of an error: the API's `{code, detail, ...}` in dollars, whether a
/// retry can help, and what to do.
fn error_content(status: u16, body: Value) -> Map<String, Value> {
    let mut object = match in_usd(body) {
        Value::Object(object) => object,
        Value::Null => Map::new(),
        other => Map::from_iter([("detail".to_owned(), other)]),
    };
    let code = object.get("code").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| match status {
        401 => "invalid_token".to_owned(),
        0 => "daemon_unreachable".to_owned(),
        _ => format!("http_{status}"),
    });
    object.insert("code".into(), Value::String(code.clone()));
    let explanation = explain(&code);
    let refusal = is_budget_refusal(&code);
    if refusal {
        // A refusal always states these, even where the answer left one out.
        for field in ["requested_usd", "remaining_usd", "limited_by"] {
            object.entry(field).or_insert(Value::Null);
        }
    }
    // Unknown codes: a server-side failure may pass on a retry with the same key (which never
    // pays twice); anything the request itself got wrong will not.
    let retryable = explanation.map_or(status == 0 || status >= 500, |e| e.retryable) && !refusal;
    object.insert("retryable".into(), Value::Bool(retryable));
    object.insert("refusal".into(), Value::Bool(refusal));
    if let Some(explanation) = explanation {
        object.insert("what_to_do".into(), Value::String(explanation.what_to_do.to_owned()));
    }
    object
}

/// The value with every `<name>_micros` integer field replaced by `<name>_usd`, an exact decimal
/// string (`null` stays `null`), at any depth — except inside receipts (`receipt`,
/// `*_receipt`), which are signed objects and pass verbatim so that they still verify.
pub(crate) fn in_usd(value: Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(name, value)| match name.strip_suffix("_micros") {
                    Some(stem) if value.is_u64() || value.is_null() => {
                        let usd = value.as_u64().map_or(Value::Null, |micros| Value::String(usd(micros)));
                        (format!("{stem}_usd"), usd)
                    }
                    _ if name == "receipt" || name.ends_with("_receipt") => (name, value),
                    _ => (name, in_usd(value)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(in_usd).collect()),
        other => other,
    }
}

/// Micro-USD as dollars, exactly, with at least two decimals: `20000` → `"0.02"`, `1500000` →
/// `"1.50"`, `125` → `"0.000125"`.
pub(crate) fn usd(micros: u64) -> String {
    let full = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    let trimmed = full.trim_end_matches('0');
    let decimals = trimmed.len() - trimmed.find('.').map_or(trimmed.len(), |dot| dot + 1);
    if decimals >= 2 {
        trimmed.to_owned()
    } else {
        full[..full.len() - 4].to_owned()
    }
}

/// Dollars as given by a model (`"0.05"`, `"2"`) to micro-USD, exactly.
pub(crate) fn micros_of_usd(field: &str, text: &str) -> Result<u64, CallToolResult> {
    Micros::from_decimal_str(text.trim(), 6).and_then(|micros| Micros::positive(micros.get())).map(Micros::get).map_err(
        |err| invalid_input(err.code(), format!("{field}: {err}; give dollars as a decimal string like \"0.25\"")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_exact_decimal_strings() {
        let cases = [(0, "0.00"), (20_000, "0.02"), (1_500_000, "1.50"), (125, "0.000125"), (2_750_001, "2.750001")];
        for (micros, text) in cases {
            assert_eq!(usd(micros), text);
            assert_eq!(micros_of_usd("x", text).ok(), (micros > 0).then_some(micros), "{text}");
        }
        assert!(micros_of_usd("max_usd", "0.1234567").is_err());
        assert!(micros_of_usd("max_usd", "1e3").is_err());
    }

    #[test]
    fn a_refusal_is_an_error_result_with_the_amounts_in_dollars() {
        let body = json!({"code": "cap_exceeded", "detail": "over", "requested_micros": 20_000,
            "remaining_micros": 10_000, "limited_by": "ag_1"});
        let result = tool_result(Ok(Answer { status: 402, body }), Some("k1"));
        assert_eq!(result.is_error, Some(true));
        let content = result.structured_content.expect("structured");
        assert_eq!(
            (&content["code"], &content["requested_usd"], &content["remaining_usd"], &content["limited_by"]),
            (&json!("cap_exceeded"), &json!("0.02"), &json!("0.01"), &json!("ag_1"))
        );
        assert_eq!((&content["retryable"], &content["idempotency_key"]), (&json!(false), &json!("k1")));
        assert!(content.get("requested_micros").is_none());

        let lost = tool_result(Err(Unanswered::Unreachable("connection reset".into())), Some("k2"));
        let content = lost.structured_content.expect("structured");
        assert_eq!((&content["code"], &content["retryable"]), (&json!("daemon_unreachable"), &json!(true)));
        let receipt = json!({"receipt": {"amount_micros": 20_000}, "signature": "s"});
        let body = json!({"payment": {"amount_micros": 20_000, "receipt": receipt}});
        let ok = tool_result(Ok(Answer { status: 200, body }), None);
        assert_eq!(ok.is_error, Some(false));
        let content = ok.structured_content.expect("structured");
        assert_eq!(content["payment"]["amount_usd"], "0.02");
        assert_eq!(content["payment"]["receipt"], receipt, "signed receipts pass verbatim");
    }
}
