//! Reading an LLM request into the bound of its hold, and the changes the daemon makes to it.
//!
//! The bound: the request's maximum output tokens (times `n` choices) at the output price, plus
//! an upper bound of its input tokens at the dearest input price. A text token is at least one
//! byte of the request body, so the body's size (plus the table's `input_overhead_tokens`) bounds
//! the input. A request without an output limit gets the table's default, written into the
//! request so the upstream enforces it; without a default it is refused.

use serde_json::{Map, Value};

use super::pricing::{ModelTable, PricingError};
use super::Style;
use crate::money::Micros;

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: u64 = 128;

/// An LLM request, read and made ready to forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmCall {
    pub model: String,
    pub stream: bool,
    /// The output limit the upstream enforces, per choice.
    pub max_output_tokens: u64,
    pub choices: u64,
    /// The input bound in tokens: the body's size plus the table's overhead.
    pub input_bound_tokens: u64,
    /// What the call cannot exceed.
    pub bound: Micros,
    /// The body to forward: the agent's, byte for byte, unless the daemon had to add an output
    /// limit or ask for usage in the stream.
    pub body: Vec<u8>,
    /// The daemon asked for `stream_options.include_usage`: the usage chunk the agent did not
    /// ask for is taken out of the stream.
    pub usage_added: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the request body must be a JSON object")]
    NotJson,
    #[error("the request names no model (a string \"model\" field)")]
    NoModel,
    #[error("the request sets no output limit ({0}) and the API has no default_max_output_tokens")]
    NoOutputLimit(&'static str),
    #[error("{0} must be a positive integer")]
    BadNumber(&'static str),
    #[error(transparent)]
    Pricing(#[from] PricingError),
}

impl RequestError {
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::NotJson => "api_body_not_json",
            RequestError::NoModel => "api_model_missing",
            RequestError::NoOutputLimit(_) => "api_max_tokens_required",
            RequestError::BadNumber(_) => "api_invalid_limit",
            RequestError::Pricing(err) => err.code(),
        }
    }
}

fn positive(object: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, RequestError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().filter(|n| *n > 0).map(Some).ok_or(RequestError::BadNumber(field)),
    }
}

/// The output-limit fields each style knows, and the one the daemon writes when none is set.
fn limit_fields(style: Style, path: &str) -> (&'static [&'static str], &'static str) {
    match style {
        Style::Anthropic => (&["max_tokens"], "max_tokens"),
        Style::OpenAi if path.trim_end_matches('/').ends_with("/responses") => {
            (&["max_output_tokens"], "max_output_tokens")
        }
        Style::OpenAi => (&["max_completion_tokens", "max_tokens"], "max_completion_tokens"),
    }
}

/// Reads the request `body` sent to `path` (the part after the API's name) and prices its bound.
pub fn prepare(style: Style, path: &str, body: &[u8], table: &ModelTable) -> Result<LlmCall, RequestError> {
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => object,
        _ => return Err(RequestError::NotJson),
    };
    let model = object.get("model").and_then(Value::as_str).ok_or(RequestError::NoModel)?.to_owned();
    let price = table.price(&model)?;
    let stream = object.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (fields, written) = limit_fields(style, path);
    let mut set = None;
    for field in fields {
        if let Some(limit) = positive(&object, field)? {
            set = Some(set.map_or(limit, |other: u64| other.max(limit)));
        }
    }
    let mut changed = false;
    let max_output_tokens = match set {
        Some(limit) => limit,
        None => {
            let limit = table.default_max_output_tokens.ok_or(RequestError::NoOutputLimit(written))?;
            object.insert(written.to_owned(), Value::from(limit));
            changed = true;
            limit
        }
    };
    let choices = match style {
        Style::OpenAi => positive(&object, "n")?.unwrap_or(1).min(MAX_CHOICES),
        Style::Anthropic => 1,
    };
    let mut usage_added = false;
    let is_chat = style == Style::OpenAi && fields.contains(&"max_completion_tokens");
    if stream && is_chat {
        let asked = object
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !asked {
            let options = object.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(options) = options {
                options.insert("include_usage".into(), Value::Bool(true));
                usage_added = true;
                changed = true;
            }
        }
    }
    let input_bound_tokens = (body.len() as u64).saturating_add(table.input_overhead_tokens);
    let bound = price.bound(input_bound_tokens, max_output_tokens.saturating_mul(choices))?;
    let body = if changed {
        serde_json::to_vec(&Value::Object(object)).map_err(|_| RequestError::NotJson)?
    } else {
        body.to_vec()
    };
    Ok(LlmCall { model, stream, max_output_tokens, choices, input_bound_tokens, bound, body, usage_added })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pricing::ModelPrice;
    use serde_json::json;

    fn table(default_max: Option<u64>) -> ModelTable {
        ModelTable {
            models: [(
                "m".to_owned(),
                ModelPrice { input: 1_000_000, cached_input: None, cache_write: None, output: 2_000_000 },
            )]
            .into(),
            default: None,
            default_max_output_tokens: default_max,
            input_overhead_tokens: 0,
        }
    }

    fn bytes(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).expect("json")
    }

    #[test]
    fn the_bound_is_the_body_size_plus_the_output_limit_times_choices() {
        let body = bytes(json!({ "model": "m", "max_tokens": 100, "n": 3, "messages": [] }));
        let call = prepare(Style::OpenAi, "/v1/chat/completions", &body, &table(None)).expect("prepared");
        assert_eq!(call.body, body, "forwarded byte for byte");
        assert_eq!(call.bound.get(), body.len() as u64 + 2 * 300);
        assert!(!call.stream && !call.usage_added);
    }

    #[test]
    fn a_missing_limit_takes_the_default_into_the_request_or_is_refused() {
        let body = bytes(json!({ "model": "m", "input": "hi" }));
        let err = prepare(Style::OpenAi, "/v1/responses", &body, &table(None)).expect_err("no limit");
        assert_eq!(err.code(), "api_max_tokens_required");
        let call = prepare(Style::OpenAi, "/v1/responses", &body, &table(Some(50))).expect("default");
        let sent: Value = serde_json::from_slice(&call.body).expect("json");
        assert_eq!(sent["max_output_tokens"], 50);
        let call = prepare(Style::Anthropic, "/v1/messages", &bytes(json!({ "model": "m" })), &table(Some(7)))
            .expect("default");
        assert_eq!(serde_json::from_slice::<Value>(&call.body).expect("json")["max_tokens"], 7);
    }

    #[test]
    fn an_openai_chat_stream_is_asked_for_usage_when_the_client_did_not() {
        let body = bytes(json!({ "model": "m", "max_tokens": 5, "stream": true, "messages": [] }));
        let call = prepare(Style::OpenAi, "/v1/chat/completions", &body, &table(None)).expect("prepared");
        assert!(call.usage_added);
        let sent: Value = serde_json::from_slice(&call.body).expect("json");
        assert_eq!(sent["stream_options"]["include_usage"], true);
        let asked = bytes(
            json!({ "model": "m", "max_tokens": 5, "stream": true, "stream_options": { "include_usage": true } }),
        );
        let call = prepare(Style::OpenAi, "/v1/chat/completions", &asked, &table(None)).expect("prepared");
        assert!(!call.usage_added);
        assert_eq!(call.body, asked);
    }

    #[test]
    fn bad_requests_get_stable_codes() {
        let code = |style, body: &[u8]| prepare(style, "/v1/messages", body, &table(Some(1))).map_err(|e| e.code());
        assert_eq!(code(Style::Anthropic, b"not json"), Err("api_body_not_json"));
        assert_eq!(code(Style::Anthropic, &bytes(json!({ "max_tokens": 1 }))), Err("api_model_missing"));
        assert_eq!(code(Style::Anthropic, &bytes(json!({ "model": "x", "max_tokens": 1 }))), Err("api_unknown_model"));
        assert_eq!(code(Style::Anthropic, &bytes(json!({ "model": "m", "max_tokens": -1 }))), Err("api_invalid_limit"));
        assert_eq!(code(Style::Anthropic, &bytes(json!({ "model": "m", "max_tokens": 0 }))), Err("api_invalid_limit"));
    }
}
