//! A tap on a server-sent-events stream: the bytes go on to the agent as they arrive while the
//! tap reads the final usage out of them.
//!
//! OpenAI chat completions report usage in a last chunk with empty `choices` when
//! `stream_options.include_usage` is set; the responses API in its `response.completed` (or
//! `.incomplete` / `.failed`) event. Anthropic reports input tokens in `message_start` and the
//! cumulative output (and, lately, input) tokens in `message_delta`.
//!
//! The SSE framing is simple enough to read here (events end at a blank line, `data:` lines
//! carry the JSON): a stream parser library would own the bytes, and the agent must get them
//! exactly as sent.

use serde_json::Value;

use super::usage::{anthropic_usage, openai_usage, Usage};
use super::Style;

/// An event longer than this is passed on without being read (its usage, if any, is lost and
/// the call settles at its hold).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub struct UsageTap {
    style: Style,
    /// Take out the usage-only chunk of an OpenAI chat stream (the daemon asked for it, the agent
    /// did not). Events are then passed on whole.
    strip_usage_chunk: bool,
    pending: Vec<u8>,
    started: Option<Usage>,
    usage: Option<Usage>,
    error: Option<String>,
}

/// Where the first event in `buf` ends (after its blank line), if it is complete.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some(i + 4);
        }
        i += 1;
    }
    None
}

/// The event's `data` (its `data:` lines joined by newlines).
fn event_data(event: &[u8]) -> String {
    let text = String::from_utf8_lossy(event);
    let mut data = String::new();
    for line in text.split('\n').map(|line| line.trim_end_matches('\r')) {
        if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    data
}

impl UsageTap {
    pub fn new(style: Style, strip_usage_chunk: bool) -> UsageTap {
        UsageTap { style, strip_usage_chunk, pending: Vec::new(), started: None, usage: None, error: None }
    }

    /// Reads one chunk of the stream and returns the bytes to pass on now: the chunk itself, or,
    /// when a chunk is taken out, the complete events so far.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            let keep = self.read(&event);
            if self.strip_usage_chunk && keep {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            let event = std::mem::take(&mut self.pending);
            if self.strip_usage_chunk {
                out.extend_from_slice(&event);
            }
        }
        if self.strip_usage_chunk {
            out
        } else {
            chunk.to_vec()
        }
    }

    /// The stream ended: what is left to pass on (an unfinished last event).
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        if self.strip_usage_chunk {
            rest
        } else {
            Vec::new()
        }
    }

    /// The call's final usage, once the stream reported it.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// An error event the upstream sent in the stream, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Reads one event; false when it is the usage chunk to take out.
    fn read(&mut self, event: &[u8]) -> bool {
        let data = event_data(event);
        if data.is_empty() || data == "[DONE]" {
            return true;
        }
        let Ok(value) = serde_json::from_str::<Value>(&data) else { return true };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind == "error" || value.get("error").is_some_and(|e| !e.is_null()) {
            let error = value.get("error").unwrap_or(&value);
            let code = ["type", "code"].iter().find_map(|k| error.get(k).and_then(Value::as_str)).unwrap_or("error");
            self.error = Some(code.chars().take(64).collect());
        }
        match self.style {
            Style::OpenAi => {
                if let Some(usage) = value.get("usage").filter(|u| u.is_object()).and_then(openai_usage) {
                    self.usage = Some(usage);
                    let usage_only = value.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
                    return !usage_only;
                }
                if matches!(kind, "response.completed" | "response.incomplete" | "response.failed") {
                    if let Some(usage) = value.pointer("/response/usage").and_then(openai_usage) {
                        self.usage = Some(usage);
                    }
                }
            }
            Style::Anthropic => match kind {
                "message_start" => self.started = value.pointer("/message/usage").and_then(anthropic_usage),
                "message_delta" => {
                    let Some(delta) = value.get("usage") else { return true };
                    let mut usage = self.started.unwrap_or_default();
                    if let Some(output) = delta.get("output_tokens").and_then(Value::as_u64) {
                        usage.output_tokens = output;
                    }
                    // Newer answers repeat the input counts, cumulatively, in the delta.
                    if delta.get("input_tokens").and_then(Value::as_u64).is_some() {
                        let mut with_output = delta.clone();
                        if let Some(object) = with_output.as_object_mut() {
                            object.entry("output_tokens").or_insert(Value::from(usage.output_tokens));
                        }
                        if let Some(full) = anthropic_usage(&with_output) {
                            usage = full;
                        }
                    }
                    self.usage = Some(usage);
                }
                _ => {}
            },
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}\n\n\
        data: [DONE]\n\n";

    fn run(tap: &mut UsageTap, text: &str, piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(piece) {
            out.extend(tap.feed(chunk));
        }
        out.extend(tap.finish());
        out
    }

    #[test]
    fn an_openai_chat_stream_passes_unchanged_and_its_usage_is_read() {
        for piece in [1, 7, CHAT.len()] {
            let mut tap = UsageTap::new(Style::OpenAi, false);
            assert_eq!(run(&mut tap, CHAT, piece), CHAT.as_bytes());
            assert_eq!(tap.usage().map(|u| (u.input_tokens, u.output_tokens)), Some((12, 3)));
        }
    }

    #[test]
    fn the_usage_chunk_the_agent_did_not_ask_for_is_taken_out() {
        for piece in [1, 5, CHAT.len()] {
            let mut tap = UsageTap::new(Style::OpenAi, true);
            let out = String::from_utf8(run(&mut tap, CHAT, piece)).expect("utf8");
            assert!(!out.contains("prompt_tokens"), "{out}");
            assert!(out.starts_with("data: {\"choices\":[{") && out.ends_with("data: [DONE]\n\n"), "{out}");
            assert_eq!(tap.usage().map(|u| u.output_tokens), Some(3));
        }
    }

    #[test]
    fn a_responses_stream_reports_usage_on_completion() {
        let text = "event: response.output_text.delta\r\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\r\n\r\n\
            event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"input_tokens_details\":{\"cached_tokens\":2}}}}\r\n\r\n";
        let mut tap = UsageTap::new(Style::OpenAi, false);
        assert_eq!(run(&mut tap, text, 3), text.as_bytes());
        assert_eq!(tap.usage().map(|u| (u.input_tokens, u.cached_input_tokens, u.output_tokens)), Some((9, 2, 4)));
    }

    #[test]
    fn an_anthropic_stream_adds_message_start_and_message_delta() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hello\"}}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut tap = UsageTap::new(Style::Anthropic, false);
        assert_eq!(run(&mut tap, text, 11), text.as_bytes());
        assert_eq!(tap.usage().map(|u| (u.input_tokens, u.cached_input_tokens, u.output_tokens)), Some((30, 5, 15)));
    }

    #[test]
    fn a_cut_stream_has_no_usage_and_an_error_event_is_noted() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
            event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let mut tap = UsageTap::new(Style::Anthropic, false);
        run(&mut tap, text, 64);
        assert_eq!(tap.usage(), None);
        assert_eq!(tap.error(), Some("overloaded_error"));
    }
}
