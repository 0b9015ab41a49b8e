//! Where a tool's call goes: the daemon's own router, in process (`/mcp`), or a daemon over HTTP
//! (`spendcap mcp`). Either way it is one call of the agent API with the agent's token, and the
//! answer is the API's: a status and a JSON body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request};
use serde_json::Value;
use tower::ServiceExt as _;

use crate::identity::AgentToken;

/// The largest answer read back from an in-process call: an x402 fetch passes the upstream's
/// body (1 MiB by default, more when configured) through as JSON text.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// One call of the agent API, as a tool makes it.
#[derive(Debug)]
pub(crate) struct ApiCall {
    pub method: Method,
    /// Path and query, already percent-encoded.
    pub path: String,
    pub body: Option<Value>,
    /// Sent as `Idempotency-Key`.
    pub idempotency_key: Option<String>,
}

impl ApiCall {
    pub fn get(path: String) -> ApiCall {
        ApiCall { method: Method::GET, path, body: None, idempotency_key: None }
    }

    pub fn post(path: String, body: Value, idempotency_key: Option<String>) -> ApiCall {
        ApiCall { method: Method::POST, path, body: Some(body), idempotency_key }
    }
}

/// The API's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    /// The JSON body (`null` when empty, a string when it was not JSON).
    pub body: Value,
}

/// Why a call got no answer.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// The MCP request carried no agent token (only possible in process; `/mcp` refuses such
    /// requests before any tool runs).
    NoToken,
    /// The daemon could not be reached, or its answer was lost: the call may or may not have
    /// happened.
    Unreachable(String),
}

/// A daemon reached over HTTP, with one agent's token.
pub struct Remote {
    client: reqwest::Client,
    base: String,
    token: AgentToken,
}

impl Remote {
    pub fn new(base: &str, token: AgentToken) -> Result<Remote, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Longer than any flow's own provider timeouts, so the daemon answers first.
            .timeout(Duration::from_secs(180))
            .build()?;
        Ok(Remote { client, base: base.trim_end_matches('/').to_owned(), token })
    }
}

/// Where tool calls go.
#[derive(Clone)]
pub enum Backend {
    /// Inside the daemon: each call is dispatched to its router in process, with the bearer
    /// token of the MCP request that asked for it.
    InProcess(axum::Router),
    /// A daemon over HTTP, with the token `spendcap mcp` was started with.
    Remote(Arc<Remote>),
}

impl Backend {
    /// Makes the call. `request_token` is the bearer token of the MCP request (in process only).
    pub(crate) async fn call(&self, request_token: Option<&str>, call: ApiCall) -> Result<Answer, Unanswered> {
        match self {
            Backend::InProcess(router) => {
                let token = request_token.ok_or(Unanswered::NoToken)?;
                in_process(router, token, call).await
            }
            Backend::Remote(remote) => over_http(remote, call).await,
        }
    }
}

fn body_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

async fn in_process(router: &axum::Router, token: &str, call: ApiCall) -> Result<Answer, Unanswered> {
    let mut request =
        Request::builder().method(call.method).uri(&call.path).header(header::AUTHORIZATION, format!("Bearer {token}"));
    if let Some(key) = &call.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let body = match &call.body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let request = request.body(body).map_err(|err| Unanswered::Unreachable(format!("bad request: {err}")))?;
    let response = match router.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
        .await
        .map_err(|err| Unanswered::Unreachable(format!("the answer could not be read: {err}")))?;
    Ok(Answer { status, body: body_value(&bytes) })
}

async fn over_http(remote: &Remote, call: ApiCall) -> Result<Answer, Unanswered> {
    let url = format!("{}{}", remote.base, call.path);
    let mut request = remote.client.request(call.method, &url).bearer_auth(remote.token.reveal());
    if let Some(key) = &call.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    let unreachable = |err: reqwest::Error| {
        // Never the URL with a query or the token: reqwest's errors name the URL only.
        Unanswered::Unreachable(err.without_url().to_string())
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await.map_err(unreachable)?;
    Ok(Answer { status, body: body_value(&bytes) })
}
