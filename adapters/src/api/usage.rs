//! Token usage as each API reports it, normalised.

use serde_json::Value;

use super::Style;

/// Tokens one call used. `input_tokens` counts every input token, cached and cache writes
/// included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
}

fn count(value: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(value, |value, key| value.get(key))?.as_u64()
}

/// An OpenAI `usage` object: chat completions (`prompt_tokens`, `completion_tokens`,
/// `prompt_tokens_details.cached_tokens`) or responses (`input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`).
pub fn openai_usage(usage: &Value) -> Option<Usage> {
    let input = count(usage, &["prompt_tokens"]).or_else(|| count(usage, &["input_tokens"]))?;
    let output = count(usage, &["completion_tokens"]).or_else(|| count(usage, &["output_tokens"]))?;
    let cached = count(usage, &["prompt_tokens_details", "cached_tokens"])
        .or_else(|| count(usage, &["input_tokens_details", "cached_tokens"]))
        .unwrap_or(0)
        .min(input);
    Some(Usage { input_tokens: input, cached_input_tokens: cached, cache_write_tokens: 0, output_tokens: output })
}

/// An Anthropic `usage` object: `input_tokens` (uncached), `cache_read_input_tokens`,
/// `cache_creation_input_tokens`, `output_tokens`.
pub fn anthropic_usage(usage: &Value) -> Option<Usage> {
    let uncached = count(usage, &["input_tokens"])?;
    let output = count(usage, &["output_tokens"])?;
    let read = count(usage, &["cache_read_input_tokens"]).unwrap_or(0);
    let write = count(usage, &["cache_creation_input_tokens"]).unwrap_or(0);
    Some(Usage {
        input_tokens: uncached.saturating_add(read).saturating_add(write),
        cached_input_tokens: read,
        cache_write_tokens: write,
        output_tokens: output,
    })
}

/// The usage in a non-streaming answer's body, if it has one.
pub fn usage_of(style: Style, body: &[u8]) -> Option<Usage> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let usage = value.get("usage")?;
    match style {
        Style::OpenAi => openai_usage(usage),
        Style::Anthropic => anthropic_usage(usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_format_is_read() {
        let chat = json!({ "usage": { "prompt_tokens": 10, "completion_tokens": 5,
            "prompt_tokens_details": { "cached_tokens": 4 } } });
        assert_eq!(
            usage_of(Style::OpenAi, chat.to_string().as_bytes()),
            Some(Usage { input_tokens: 10, cached_input_tokens: 4, cache_write_tokens: 0, output_tokens: 5 })
        );
        let responses = json!({ "usage": { "input_tokens": 7, "output_tokens": 3, "total_tokens": 10 } });
        assert_eq!(usage_of(Style::OpenAi, responses.to_string().as_bytes()).map(|u| u.output_tokens), Some(3));
        let messages = json!({ "usage": { "input_tokens": 3, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20, "output_tokens": 9 } });
        assert_eq!(
            usage_of(Style::Anthropic, messages.to_string().as_bytes()),
            Some(Usage { input_tokens: 123, cached_input_tokens: 100, cache_write_tokens: 20, output_tokens: 9 })
        );
        assert_eq!(usage_of(Style::Anthropic, b"{\"error\":{}}"), None);
    }
}
