//! One keyed-API call: authenticate the agent, price the call's bound, hold it, forward with the
//! owner's credential, and settle what the call cost, or void when the upstream refused it
//! without billing it.
//!
//! Money follows real exposure here as everywhere:
//!
//! - nothing is sent before the hold is granted;
//! - an answer with a usage (or a fixed price, or a cost header) settles that cost (at most the
//!   hold: a call that cost more is settled at the hold and logged);
//! - an error status from the upstream is not billed by the APIs we price, so it voids, as does
//!   a connection that could not be opened;
//! - when the cost cannot be known (no response after the request went out, a stream cut before
//!   its usage, the agent gone mid-stream) the hold is settled in full and the log line says why.

use adapters::api::{LlmCall, Pricing, Style, Usage, UsageTap};
use adapters::net::ReadError;
use adapters::{Micros, PaymentIntent, Protocol};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures::StreamExt;
use std::collections::BTreeMap;

use super::{Engine, KeyedApi};
use crate::api::{label, AgentAuth, ApiError, SharedState};
use crate::identity::{AgentToken, HoldId};
use crate::pay::{self, Held, HoldSpec};
use crate::protocols::x402::destination::{check_url, refused_in, UrlError};
use crate::protocols::x402::upstream::{describe, forwarded_request_header, returned_response_header};

const PREFIX: &str = "/v1/apis/";
const TASK_HEADER: &str = "x-spendcap-task";
const API_KEY_HEADER: &str = "x-api-key";
/// The hold outlives the longest call by this much, so that the settle always comes first.
const HOLD_MARGIN_MS: u64 = 60_000;

/// `ANY /v1/apis/{name}/{*path}`.
pub async fn call(State(state): State<SharedState>, request: Request) -> Response {
    match run(state, request).await {
        Ok(response) => response,
        Err(err) => {
            let code = HeaderValue::from_str(err.code).ok();
            let mut response = err.into_response();
            if let Some(code) = code {
                response.headers_mut().insert(HeaderName::from_static("x-spendcap-error"), code);
            }
            response
        }
    }
}

/// The agent, by its token as `Authorization: Bearer` (OpenAI-style SDKs) or `x-api-key`
/// (Anthropic-style SDKs). The ledger checks the token inside the hold.
fn agent(headers: &HeaderMap) -> Result<AgentAuth, ApiError> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = text(&header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let key = text(&HeaderName::from_static(API_KEY_HEADER)).map(str::trim);
    let token: AgentToken = bearer.or(key).and_then(|t| t.parse().ok()).ok_or_else(ApiError::unauthorized)?;
    Ok(AgentAuth { agent: token.agent().clone(), token_hash: token.hash() })
}

fn invalid(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

/// The API's name and the rest of the raw path (still percent-encoded, starting with `/`).
fn split_path(path: &str) -> Result<(&str, &str), ApiError> {
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let (name, rest) =
        rest.split_once('/').map_or((rest, ""), |(name, rest)| (name, &path[path.len() - rest.len() - 1..]));
    let dot_segment = rest.split('/').any(|segment| {
        let lower = segment.to_ascii_lowercase().replace("%2e", ".");
        lower == "." || lower == ".."
    });
    if dot_segment || rest.contains('\\') || rest.to_ascii_lowercase().contains("%2f") {
        return Err(ApiError::bad_request(
            "api_invalid_path",
            "the path may not contain '.' or '..' segments or encoded slashes",
        ));
    }
    Ok((name, rest))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|value| value.to_str().map_err(|_| invalid("invalid_header", format!("{name} must be visible ASCII"))))
        .transpose()
}

/// What the call is held for and what is sent.
struct Priced {
    bound: Micros,
    body: Bytes,
    llm: Option<(Style, LlmCall)>,
}

fn price(api: &KeyedApi, method: &Method, path: &str, body: Bytes) -> Result<Priced, ApiError> {
    let bad_price = |err: adapters::AmountError| invalid(err.code(), format!("the configured price: {err}"));
    match &api.pricing {
        Pricing::PerRequest { .. } => {
            let micros = api.pricing.per_request_price(method.as_str(), path).unwrap_or_default();
            Ok(Priced { bound: Micros::positive(micros).map_err(bad_price)?, body, llm: None })
        }
        Pricing::ResponseHeader { max_micros, .. } => {
            Ok(Priced { bound: Micros::positive(*max_micros).map_err(bad_price)?, body, llm: None })
        }
        Pricing::OpenaiUsage(table) | Pricing::AnthropicUsage(table) => {
            if *method != Method::POST {
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "api_not_priced",
                    "only POST calls (with a model and an output limit) are priced for this API",
                ));
            }
            let style = api.pricing.style().unwrap_or(Style::OpenAi);
            let call = adapters::api::prepare(style, path, &body, table)
                .map_err(|err| invalid(err.code(), err.to_string()))?;
            Ok(Priced { bound: call.bound, body: Bytes::from(call.body.clone()), llm: Some((style, call)) })
        }
    }
}

fn target(engine: &Engine, api: &KeyedApi, path: &str, query: Option<&str>) -> Result<reqwest::Url, ApiError> {
    let mut text = format!("{}{}", api.base_url.as_str().trim_end_matches('/'), path);
    if let Some(query) = query {
        text.push('?');
        text.push_str(query);
    }
    check_url(&text, &engine.destinations).map_err(|err| match err {
        UrlError::Refused(refused) => {
            ApiError::new(StatusCode::FORBIDDEN, "api_destination_forbidden", refused.to_string())
        }
        other => ApiError::bad_request("api_invalid_path", other.to_string()),
    })
}

async fn run(state: SharedState, request: Request) -> Result<Response, ApiError> {
    let engine = state.protocols.api.engine().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_not_configured",
            "keyed APIs are not configured on this daemon (no SPENDCAP_APIS_CONFIG)",
        )
    })?;
    let (parts, body) = request.into_parts();
    let auth = agent(&parts.headers)?;
    let (name, path) = split_path(parts.uri.path())?;
    let unknown =
        || ApiError::new(StatusCode::NOT_FOUND, "api_unknown", format!("no API named {name:?} is configured"));
    let api = engine.apis.get(name).cloned().ok_or_else(unknown)?;
    let client = engine.clients.get(name).cloned().ok_or_else(unknown)?;
    if matches!(parts.method, Method::CONNECT | Method::TRACE) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_method",
            "CONNECT and TRACE are not forwarded",
        ));
    }
    let task = label("task", header_text(&parts.headers, TASK_HEADER)?.unwrap_or_default(), 128)?;
    let url = target(&engine, &api, path, parts.uri.query())?;
    let limit = engine.max_request_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    })?;
    let priced = price(&api, &parts.method, path, body)?;

    let mut details = BTreeMap::new();
    details.insert("method".to_owned(), parts.method.as_str().to_owned());
    details.insert("path".to_owned(), path.chars().take(200).collect());
    if let Some((_, call)) = &priced.llm {
        details.insert("model".to_owned(), call.model.chars().take(128).collect());
    }
    let intent = PaymentIntent { amount: priced.bound, service: api.name.clone(), protocol: Protocol::Api, details };
    let timeout_ms = u64::try_from(engine.timeout.as_millis()).unwrap_or(u64::MAX);
    let expires = crate::ledger::HoldExpiry::After(timeout_ms.saturating_add(HOLD_MARGIN_MS));
    let spec = HoldSpec { intent: &intent, task: &task, expires, idempotency: None };
    let grant = match pay::hold(&state, &auth, spec).await? {
        Held::New(grant) | Held::Resumed(grant) => grant,
        Held::Finished(_) => {
            return Err(ApiError::internal("a keyed-API hold without an idempotency key was replayed"))
        }
    };

    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        let agent_credential = *name == header::AUTHORIZATION || name.as_str() == API_KEY_HEADER;
        if forwarded_request_header(name) && !agent_credential && *name != api.credential.header {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(api.credential.header.clone(), api.credential.value.clone());
    if let Some((style, _)) = &priced.llm {
        if let Ok(message) = serde_json::from_slice::<serde_json::Value>(&priced.body) {
            let kind = match style {
                Style::OpenAi => "OpenAiRequest",
                Style::Anthropic => "AnthropicRequest",
            };
            engine.conformance.record("api", kind, &message);
        }
    }
    let call = Call { state, auth, api, hold: grant.hold_id, held: grant.amount, llm: priced.llm };
    let sent = client
        .request(parts.method.clone(), url)
        .headers(headers)
        .timeout(engine.timeout)
        .body(priced.body)
        .send()
        .await;
    match sent {
        Ok(response) => Ok(call.answer(&engine, response).await),
        Err(err) => Err(call.no_response(err).await),
    }
}

/// A held call on its way.
struct Call {
    state: SharedState,
    auth: AgentAuth,
    api: KeyedApi,
    hold: HoldId,
    held: Micros,
    llm: Option<(Style, LlmCall)>,
}

/// How the money of a call ended, for the agent's `X-Spendcap-*` headers.
enum Paid {
    Settled {
        amount: Micros,
        receipt: Option<String>,
    },
    Voided,
    /// The ledger did not take the settle or void; the hold stays until its expiry.
    Failed,
}

enum StreamEnd {
    Done,
    Cut(String),
    ClientGone,
}

fn usage_details(model: &str, usage: &Usage) -> BTreeMap<String, String> {
    let mut details = BTreeMap::new();
    details.insert("model".to_owned(), model.chars().take(128).collect());
    details.insert("input_tokens".to_owned(), usage.input_tokens.to_string());
    details.insert("output_tokens".to_owned(), usage.output_tokens.to_string());
    if usage.cached_input_tokens > 0 {
        details.insert("cached_input_tokens".to_owned(), usage.cached_input_tokens.to_string());
    }
    if usage.cache_write_tokens > 0 {
        details.insert("cache_write_tokens".to_owned(), usage.cache_write_tokens.to_string());
    }
    details
}

impl Call {
    fn model(&self) -> &str {
        self.llm.as_ref().map(|(_, call)| call.model.as_str()).unwrap_or_default()
    }

    async fn settle(&self, amount: Micros, details: BTreeMap<String, String>) -> Paid {
        let amount = if amount > self.held {
            tracing::warn!(agent = %self.auth.agent, hold = %self.hold, service = %self.api.name,
                cost = amount.get(), held = self.held.get(),
                "keyed API call cost more than its hold; settled at the hold (raise input_overhead_tokens)");
            self.held
        } else {
            amount
        };
        match pay::settle(&self.state, &self.auth, &self.hold, amount, &details).await {
            Ok(settlement) => {
                let receipt = serde_json::to_vec(&settlement.receipt).ok().map(|r| URL_SAFE_NO_PAD.encode(r));
                Paid::Settled { amount, receipt }
            }
            Err(err) => {
                tracing::error!(agent = %self.auth.agent, hold = %self.hold, code = err.code, detail = %err.detail,
                    "keyed API call not settled; its hold stays until it expires");
                Paid::Failed
            }
        }
    }

    /// Settles the whole hold because the cost cannot be known, and says why in the log.
    async fn settle_unknown(&self, why: &str) -> Paid {
        tracing::warn!(agent = %self.auth.agent, hold = %self.hold, service = %self.api.name, reason = why,
            held = self.held.get(), "keyed API call cost unknown; the hold is settled in full");
        let mut details = BTreeMap::new();
        if !self.model().is_empty() {
            details.insert("model".to_owned(), self.model().to_owned());
        }
        details.insert("cost_unknown".to_owned(), why.to_owned());
        self.settle(self.held, details).await
    }

    async fn void(&self, reason: &str) -> Paid {
        match pay::void(&self.state, &self.auth, &self.hold, reason).await {
            Ok(_) => Paid::Voided,
            Err(err) => {
                tracing::error!(agent = %self.auth.agent, hold = %self.hold, code = err.code, "keyed API hold not voided");
                Paid::Failed
            }
        }
    }

    /// The request got no response.
    async fn no_response(self, err: reqwest::Error) -> ApiError {
        if let Some(refused) = refused_in(&err) {
            self.void("destination_refused").await;
            return ApiError::new(StatusCode::FORBIDDEN, "api_destination_forbidden", refused.to_string());
        }
        if err.is_connect() {
            // No connection, so nothing was sent: nothing can have been billed.
            let detail = describe(err);
            self.void("upstream_unreachable").await;
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "api_upstream_unreachable",
                format!("{}: {detail}", self.api.name),
            );
        }
        let why = if err.is_timeout() { "no_response_timeout" } else { "no_response" };
        let detail = describe(err);
        self.settle_unknown(why).await;
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_upstream_no_response",
            format!(
                "{} sent no response ({detail}); the call may have been billed, so its hold was settled",
                self.api.name
            ),
        )
    }

    async fn answer(self, engine: &Engine, response: reqwest::Response) -> Response {
        let status = response.status();
        match &self.api.pricing {
            Pricing::PerRequest { .. } => {
                let paid = if status.is_success() {
                    self.settle(self.held, BTreeMap::new()).await
                } else {
                    self.void(&format!("upstream_status_{}", status.as_u16())).await
                };
                let headers = response.headers().clone();
                respond(status, &headers, Body::from_stream(response.bytes_stream()), &self.hold, &paid)
            }
            Pricing::ResponseHeader { header, unit, .. } => {
                let cost =
                    response.headers().get(header.as_str()).and_then(|v| v.to_str().ok()).map(|text| match unit {
                        adapters::api::pricing::HeaderUnit::Usd => Micros::from_decimal_str(text.trim(), 6),
                        adapters::api::pricing::HeaderUnit::Micros => Micros::from_decimal_str(text.trim(), 0),
                    });
                let paid = match cost {
                    Some(Ok(cost)) => self.settle(cost, BTreeMap::new()).await,
                    Some(Err(_)) => self.settle_unknown("cost_header_malformed").await,
                    None if status.is_success() => self.settle_unknown("cost_header_missing").await,
                    None => self.void(&format!("upstream_status_{}", status.as_u16())).await,
                };
                let headers = response.headers().clone();
                respond(status, &headers, Body::from_stream(response.bytes_stream()), &self.hold, &paid)
            }
            Pricing::OpenaiUsage(_) | Pricing::AnthropicUsage(_) => self.answer_llm(engine, response).await,
        }
    }

    async fn answer_llm(self, engine: &Engine, response: reqwest::Response) -> Response {
        let status = response.status();
        let headers = response.headers().clone();
        // An SSE answer, or an answer to a streaming request that is not JSON (some servers
        // label their stream text/plain).
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let content_type = content_type.trim_start().to_ascii_lowercase();
        let asked_stream = self.llm.as_ref().is_some_and(|(_, call)| call.stream);
        let event_stream =
            content_type.starts_with("text/event-stream") || (asked_stream && !content_type.contains("json"));
        if status.is_success() && event_stream {
            return self.stream(status, headers, response);
        }
        let body = read_body(response, engine.max_response_bytes).await;
        if !status.is_success() {
            // OpenAI- and Anthropic-style APIs do not bill a call they answer with an error.
            let paid = self.void(&format!("upstream_status_{}", status.as_u16())).await;
            return respond(status, &headers, Body::from(body.unwrap_or_default()), &self.hold, &paid);
        }
        let body = match body {
            Ok(body) => body,
            Err(why) => {
                self.settle_unknown(why).await;
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    if why == "body_too_large" { "api_upstream_body_too_large" } else { "api_upstream_cut" },
                    "the upstream's answer could not be read whole; the call's hold was settled",
                )
                .into_response();
            }
        };
        let style = self.llm.as_ref().map(|(style, _)| *style).unwrap_or(Style::OpenAi);
        let paid = match adapters::api::usage_of(style, &body) {
            Some(usage) => self.settle_usage(&usage).await,
            None => self.settle_unknown("usage_missing").await,
        };
        respond(status, &headers, Body::from(body), &self.hold, &paid)
    }

    async fn settle_usage(&self, usage: &Usage) -> Paid {
        let table = self.api.pricing.models();
        let cost = table.and_then(|t| t.price(self.model()).ok()).map(|price| price.cost(usage));
        match cost {
            Some(Ok(cost)) => self.settle(cost, usage_details(self.model(), usage)).await,
            _ => self.settle_unknown("cost_not_computable").await,
        }
    }

    /// Passes an SSE answer through as it arrives; settles when it ends.
    fn stream(self, status: StatusCode, headers: HeaderMap, response: reqwest::Response) -> Response {
        let (style, strip) =
            self.llm.as_ref().map_or((Style::OpenAi, false), |(style, call)| (*style, call.usage_added));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
        let hold = self.hold.clone();
        tokio::spawn(async move {
            let mut tap = UsageTap::new(style, strip);
            let mut upstream = response.bytes_stream();
            let end = loop {
                match upstream.next().await {
                    Some(Ok(chunk)) => {
                        let out = tap.feed(&chunk);
                        if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                            break StreamEnd::ClientGone;
                        }
                    }
                    Some(Err(err)) => break StreamEnd::Cut(describe(err)),
                    None => break StreamEnd::Done,
                }
            };
            // Dropping the upstream stream closes its connection: a client that left stops the
            // generation it would otherwise pay for.
            drop(upstream);
            if matches!(end, StreamEnd::Done) {
                let rest = tap.finish();
                if !rest.is_empty() {
                    let _ = tx.send(Ok(Bytes::from(rest))).await;
                }
            }
            match (tap.usage(), &end) {
                (Some(usage), _) => {
                    self.settle_usage(&usage).await;
                }
                (None, StreamEnd::Done) => {
                    let why = tap.error().map_or("usage_missing".to_owned(), |code| format!("stream_error_{code}"));
                    self.settle_unknown(&why.chars().take(64).collect::<String>()).await;
                }
                (None, StreamEnd::Cut(detail)) => {
                    tracing::warn!(hold = %self.hold, detail = %detail, "keyed API stream cut before its usage");
                    self.settle_unknown("stream_cut").await;
                }
                (None, StreamEnd::ClientGone) => {
                    self.settle_unknown("client_disconnected").await;
                }
            }
            // The agent sees the end of the stream only after the settle, and a cut stream as an
            // error, not as a clean end.
            if let StreamEnd::Cut(_) = end {
                let _ = tx.send(Err(std::io::Error::other("the upstream stream was cut"))).await;
            }
        });
        let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let mut response = respond(status, &headers, Body::from_stream(body), &hold, &Paid::Failed);
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-spendcap-payment"), HeaderValue::from_static("pending"));
        response
    }
}

/// Reads a whole answer, at most `limit` bytes; the reason it could not, as a log code.
async fn read_body(response: reqwest::Response, limit: usize) -> Result<Bytes, &'static str> {
    match adapters::net::read_limited(response, limit).await {
        Ok(body) => Ok(Bytes::from(body)),
        Err(ReadError::TooLarge { .. }) => Err("body_too_large"),
        Err(ReadError::Transport(_)) => Err("body_cut"),
    }
}

/// The upstream's answer (status, headers, body) with spendcap's own headers.
fn respond(status: StatusCode, upstream: &HeaderMap, body: Body, hold: &HoldId, paid: &Paid) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in upstream {
        if returned_response_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut spendcap = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    spendcap("x-spendcap-hold-id", hold.as_str());
    match paid {
        Paid::Settled { amount, receipt } => {
            spendcap("x-spendcap-payment", "settled");
            spendcap("x-spendcap-amount-micros", &amount.get().to_string());
            if let Some(receipt) = receipt {
                spendcap("x-spendcap-receipt", receipt);
            }
        }
        Paid::Voided => {
            spendcap("x-spendcap-payment", "voided");
            spendcap("x-spendcap-amount-micros", "0");
        }
        Paid::Failed => spendcap("x-spendcap-payment", "unsettled"),
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_after_the_name_is_kept_raw_and_dot_segments_are_refused() {
        assert_eq!(split_path("/v1/apis/openai/v1/chat/completions").ok(), Some(("openai", "/v1/chat/completions")));
        assert_eq!(split_path("/v1/apis/search/q%20x").ok(), Some(("search", "/q%20x")));
        for bad in
            ["/v1/apis/openai/../admin", "/v1/apis/openai/v1/%2e%2E/x", "/v1/apis/openai/a%2Fb", "/v1/apis/o/./x"]
        {
            assert_eq!(split_path(bad).map_err(|e| e.code).err(), Some("api_invalid_path"), "{bad}");
        }
    }
}
