//! A simulated LLM provider that answers in OpenAI's format (`POST /v1/chat/completions`,
//! `POST /v1/responses`) and Anthropic's (`POST /v1/messages`), non-streaming and streaming
//! (SSE), with a `usage` computed from the request: input tokens are the body's bytes / 4 (at
//! least 1), output tokens the reply's words, at most the request's output limit. It checks the
//! owner's key (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic) and counts the
//! calls it billed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{json, Value};

use super::Server;

/// The simulated models and their prices (micro-USD per million tokens: input, output).
pub const MODELS: &[(&str, u64, u64)] = &[("sim-gpt", 2_000_000, 8_000_000), ("sim-claude", 3_000_000, 15_000_000)];
const REPLY: &[&str] = &["Hello", "from", "the", "simulated", "model,", "paid", "within", "your", "cap."];

pub struct LlmProvider {
    server: Server,
    state: Arc<LlmState>,
}

struct LlmState {
    key: String,
    billed: AtomicU64,
}

impl LlmProvider {
    pub async fn start() -> std::io::Result<LlmProvider> {
        let state = Arc::new(LlmState {
            key: format!("sk-sim-{}", hex::encode(rand::random::<[u8; 16]>())),
            billed: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .route("/v1/messages", post(messages))
            .with_state(state.clone());
        Ok(LlmProvider { server: Server::start(app).await?, state })
    }

    pub fn base(&self) -> &str {
        self.server.base()
    }

    /// The owner's API key the provider accepts.
    pub fn key(&self) -> &str {
        &self.state.key
    }

    /// Calls answered with a usage (billed).
    pub fn billed_calls(&self) -> u64 {
        self.state.billed.load(Ordering::Relaxed)
    }

    /// The daemon's `SPENDCAP_APIS_CONFIG` for this provider: `openai` and `anthropic`.
    pub fn apis_json(&self) -> Value {
        let table = |model: &str| {
            let (_, input, output) = MODELS.iter().find(|(name, _, _)| *name == model).copied().unwrap_or(("", 1, 1));
            json!({ model: { "input": input, "output": output } })
        };
        json!({
            "allow_private": ["127.0.0.1"],
            "apis": [
                { "name": "openai", "base_url": self.base(),
                  "credential": { "header": "authorization", "scheme": "Bearer", "value": self.key() },
                  "pricing": { "kind": "openai_usage", "default_max_output_tokens": 256, "models": table("sim-gpt") } },
                { "name": "anthropic", "base_url": self.base(),
                  "credential": { "header": "x-api-key", "value": self.key() },
                  "pricing": { "kind": "anthropic_usage", "models": table("sim-claude") } }
            ]
        })
    }
}

fn authorized(state: &LlmState, headers: &HeaderMap, anthropic: bool) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if anthropic {
        text("x-api-key") == state.key
    } else {
        text("authorization") == format!("Bearer {}", state.key)
    }
}

struct Asked {
    model: String,
    stream: bool,
    include_usage: bool,
    input_tokens: u64,
    output_tokens: u64,
}

fn read(body: &Bytes, limit_field: &str) -> Option<Asked> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let limit = value.get(limit_field).and_then(Value::as_u64).unwrap_or(REPLY.len() as u64);
    Some(Asked {
        model: value.get("model")?.as_str()?.to_owned(),
        stream: value.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: value.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
        input_tokens: (body.len() as u64 / 4).max(1),
        output_tokens: limit.min(REPLY.len() as u64),
    })
}

fn words(asked: &Asked) -> Vec<String> {
    REPLY
        .iter()
        .take(asked.output_tokens as usize)
        .enumerate()
        .map(|(i, w)| if i == 0 { (*w).to_owned() } else { format!(" {w}") })
        .collect()
}

fn sse(events: Vec<(Option<&str>, Value)>, done: bool) -> Response {
    let mut text = String::new();
    for (event, data) in events {
        if let Some(event) = event {
            text.push_str(&format!("event: {event}\n"));
        }
        text.push_str(&format!("data: {data}\n\n"));
    }
    if done {
        text.push_str("data: [DONE]\n\n");
    }
    ([(header::CONTENT_TYPE, "text/event-stream")], text).into_response()
}

fn refuse(status: StatusCode, kind: &str) -> Response {
    (status, axum::Json(json!({ "type": "error", "error": { "type": kind, "message": kind } }))).into_response()
}

async fn chat(State(state): State<Arc<LlmState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&state, &headers, false) {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_api_key");
    }
    let Some(asked) = read(&body, "max_completion_tokens").or_else(|| read(&body, "max_tokens")) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request_error");
    };
    state.billed.fetch_add(1, Ordering::Relaxed);
    let usage = json!({ "prompt_tokens": asked.input_tokens, "completion_tokens": asked.output_tokens,
        "total_tokens": asked.input_tokens + asked.output_tokens });
    let id = super::random_id("chatcmpl");
    if !asked.stream {
        return axum::Json(
            json!({ "id": id, "object": "chat.completion", "created": super::now_secs(), "model": asked.model,
            "choices": [ { "index": 0, "finish_reason": "stop",
                "message": { "role": "assistant", "content": words(&asked).concat() } } ],
            "usage": usage }),
        )
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        let mut chunk = json!({ "id": id, "object": "chat.completion.chunk", "created": super::now_secs(), "model": asked.model,
            "choices": [ { "index": 0, "delta": delta, "finish_reason": finish } ] });
        if asked.include_usage {
            chunk["usage"] = Value::Null;
        }
        (None, chunk)
    };
    let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), Value::Null)];
    events.extend(words(&asked).into_iter().map(|w| chunk(json!({ "content": w }), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    if asked.include_usage {
        events.push((
            None,
            json!({ "id": id, "object": "chat.completion.chunk", "created": super::now_secs(),
            "model": asked.model, "choices": [], "usage": usage }),
        ));
    }
    sse(events, true)
}

async fn responses(State(state): State<Arc<LlmState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&state, &headers, false) {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_api_key");
    }
    let Some(asked) = read(&body, "max_output_tokens") else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request_error");
    };
    state.billed.fetch_add(1, Ordering::Relaxed);
    let text = words(&asked).concat();
    let id = super::random_id("resp");
    let item_id = super::random_id("msg");
    let part = json!({ "type": "output_text", "text": text, "annotations": [] });
    let item =
        json!({ "type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [part] });
    let response = json!({ "id": id, "object": "response", "created_at": super::now_secs(), "status": "completed",
        "model": asked.model,
        "output": [item],
        "usage": { "input_tokens": asked.input_tokens, "output_tokens": asked.output_tokens,
            "total_tokens": asked.input_tokens + asked.output_tokens,
            "input_tokens_details": { "cached_tokens": 0 }, "output_tokens_details": { "reasoning_tokens": 0 } } });
    if !asked.stream {
        return axum::Json(response).into_response();
    }
    let mut in_progress = response.clone();
    in_progress["status"] = json!("in_progress");
    in_progress["output"] = json!([]);
    let mut events = vec![
        (Some("response.created"), json!({ "type": "response.created", "response": in_progress })),
        (
            Some("response.output_item.added"),
            json!({ "type": "response.output_item.added", "output_index": 0,
            "item": { "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": [] } }),
        ),
        (
            Some("response.content_part.added"),
            json!({ "type": "response.content_part.added", "item_id": item_id,
            "output_index": 0, "content_index": 0, "part": { "type": "output_text", "text": "", "annotations": [] } }),
        ),
    ];
    for word in words(&asked) {
        events.push((
            Some("response.output_text.delta"),
            json!({ "type": "response.output_text.delta",
            "item_id": item_id, "output_index": 0, "content_index": 0, "delta": word, "logprobs": [] }),
        ));
    }
    events.push((
        Some("response.output_text.done"),
        json!({ "type": "response.output_text.done", "item_id": item_id,
        "output_index": 0, "content_index": 0, "text": text, "logprobs": [] }),
    ));
    events.push((
        Some("response.content_part.done"),
        json!({ "type": "response.content_part.done", "item_id": item_id,
        "output_index": 0, "content_index": 0, "part": part }),
    ));
    events.push((
        Some("response.output_item.done"),
        json!({ "type": "response.output_item.done", "output_index": 0, "item": item }),
    ));
    events.push((Some("response.completed"), json!({ "type": "response.completed", "response": response })));
    for (n, (_, event)) in events.iter_mut().enumerate() {
        event["sequence_number"] = json!(n);
    }
    sse(events, false)
}

async fn messages(State(state): State<Arc<LlmState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&state, &headers, true) {
        return refuse(StatusCode::UNAUTHORIZED, "authentication_error");
    }
    let Some(asked) = read(&body, "max_tokens") else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request_error");
    };
    state.billed.fetch_add(1, Ordering::Relaxed);
    let id = super::random_id("msg");
    if !asked.stream {
        return axum::Json(json!({ "id": id, "type": "message", "role": "assistant", "model": asked.model,
            "content": [ { "type": "text", "text": words(&asked).concat() } ],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": { "input_tokens": asked.input_tokens, "output_tokens": asked.output_tokens } }))
        .into_response();
    }
    let mut events = vec![
        (
            Some("message_start"),
            json!({ "type": "message_start", "message": { "id": id, "type": "message",
            "role": "assistant", "model": asked.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": { "input_tokens": asked.input_tokens, "output_tokens": 1 } } }),
        ),
        (
            Some("content_block_start"),
            json!({ "type": "content_block_start", "index": 0,
            "content_block": { "type": "text", "text": "" } }),
        ),
    ];
    for word in words(&asked) {
        events.push((
            Some("content_block_delta"),
            json!({ "type": "content_block_delta", "index": 0,
            "delta": { "type": "text_delta", "text": word } }),
        ));
    }
    events.push((Some("content_block_stop"), json!({ "type": "content_block_stop", "index": 0 })));
    events.push((Some("message_delta"), json!({ "type": "message_delta",
        "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": { "output_tokens": asked.output_tokens } })));
    events.push((Some("message_stop"), json!({ "type": "message_stop" })));
    sse(events, false)
}
