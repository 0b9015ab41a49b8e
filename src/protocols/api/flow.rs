//! One keyed-API call: price the call's bound, hold it, forward with the owner's credential, and
//! settle what the call cost, or void when the upstream refused it without billing it. The HTTP
//! face (`routes.rs`) reads the agent's request into an [`ApiRequest`] and turns the
//! [`Outcome`] (or the [`Failure`]) into its answer; nothing here knows the face.
//!
//! ```text
//! resolve (API, method, URL) ─▶ price the bound ─▶ pay::hold (idempotent, pending)
//!   ─▶ waits for approval? Failure::approval (202), nothing sent; the repeat with the same key
//!      resumes the approved hold exactly once
//!   ─▶ send with the owner's credential ─▶ usage / price / cost header: pay::settle_finishing
//!   ─▶ an error status or no connection: pay::void_finishing
//!   ─▶ a stream: passed through as it arrives, settled from its usage when it ends
//! ```
//!
//! Money follows real exposure here as everywhere:
//!
//! - nothing is sent before the hold is granted (and, under an approval rule, approved);
//! - an answer with a usage (or a fixed price, or a cost header) settles that cost (at most the
//!   hold: a call that cost more is settled at the hold and logged);
//! - an error status from the upstream is not billed by the APIs we price, so it voids, as does
//!   a connection that could not be opened;
//! - when the cost cannot be known (no response after the request went out, a stream cut before
//!   its usage, the agent gone mid-stream) the hold is settled in full and the log line says why.
//!
//! Every call carries an idempotency key (the agent's `Idempotency-Key`, or one the daemon
//! makes): the settle or void that ends the call stores its answer for duplicates in the same
//! ledger call, so a call is made upstream at most once per key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use adapters::api::{LlmCall, Pricing, Style, Usage, UsageTap};
use adapters::net::ReadError;
use adapters::{Micros, PaymentIntent, Protocol};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::header::{self, HeaderMap};
use reqwest::Method;
use serde_json::json;

use super::{Engine, KeyedApi};
use crate::app::Core;
use crate::identity::{AgentAuth, HoldId};
use crate::ledger::{HoldExpiry, Idempotency, IdempotencyFinish, IdempotencyMode};
use crate::outcome::{Failure, Kind, Reply};
use crate::pay::{self, Held, HoldSpec};
use crate::protocols::x402::destination::{check_url, refused_in, UrlError};
use crate::protocols::x402::upstream::{describe, forwarded_request_header};
use crate::receipt::Receipt;

/// The header Anthropic-style SDKs send their key in (the agent's token, never forwarded).
pub const API_KEY_HEADER: &str = "x-api-key";
/// The hold outlives the longest call by this much, so that the settle always comes first.
const HOLD_MARGIN_MS: u64 = 60_000;
/// A resumed call (its approval came) is sent only while its hold has at least twice this left,
/// and its answer is waited for until this long before the hold ends.
const RESUME_MARGIN_MS: u64 = 5_000;

/// An agent's call, as the face read it.
pub struct ApiRequest {
    pub api: Target,
    pub method: Method,
    /// The agent's headers (its own credential is dropped here, never forwarded).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub task: String,
    /// The agent's `Idempotency-Key`; without one, the daemon makes one for the call.
    pub idempotency_key: Option<String>,
}

/// The API a call goes to and the checked URL it is sent to.
pub struct Target {
    api: KeyedApi,
    client: reqwest::Client,
    /// The raw path after the API's name (percent-encoded, starting with `/`).
    path: String,
    url: reqwest::Url,
}

/// What the call ended as, for the agent.
pub enum Outcome {
    /// The upstream's answer.
    Delivered(Box<Delivered>),
    /// The key's call was made before: the answer stored for its duplicates.
    Replayed(Reply),
}

/// The upstream's answer and what it cost.
pub struct Delivered {
    /// The provider's status, passed on as it is.
    pub status: u16,
    /// The provider's headers, all of them (the face chooses what it passes on).
    pub headers: HeaderMap,
    pub body: Body,
    pub hold: HoldId,
    pub paid: Paid,
}

pub enum Body {
    Whole(Bytes),
    /// Passed through as it arrives; an error ends it as cut.
    Stream(BoxStream<'static, Result<Bytes, std::io::Error>>),
}

/// How the money of a call ended.
pub enum Paid {
    Settled {
        amount: Micros,
        receipt: Option<Receipt>,
    },
    Voided,
    /// The ledger did not take the settle or void; the hold stays until its expiry.
    Failed,
    /// A stream: settled from its usage when it ends, after its last byte reached the agent.
    Pending,
}

fn invalid(code: &'static str, detail: impl Into<String>) -> Failure {
    Failure::invalid(code, detail)
}

/// The configured API `name`, whether it takes `method`, and the URL `path` + `query` is sent to.
pub fn resolve(
    engine: &Engine,
    name: &str,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<Target, Failure> {
    let unknown = || Failure::new(Kind::NotFound, "api_unknown", format!("no API named {name:?} is configured"));
    let api = engine.apis.get(name).cloned().ok_or_else(unknown)?;
    let client = engine.clients.get(name).cloned().ok_or_else(unknown)?;
    if matches!(*method, Method::CONNECT | Method::TRACE) {
        return Err(Failure::new(Kind::MethodNotAllowed, "invalid_method", "CONNECT and TRACE are not forwarded"));
    }
    let mut text = format!("{}{}", api.base_url.as_str().trim_end_matches('/'), path);
    if let Some(query) = query {
        text.push('?');
        text.push_str(query);
    }
    let url = check_url(&text, &engine.destinations).map_err(|err| match err {
        UrlError::Refused(refused) => Failure::new(Kind::Forbidden, "api_destination_forbidden", refused.to_string()),
        other => Failure::malformed("api_invalid_path", other.to_string()),
    })?;
    Ok(Target { api, client, path: path.to_owned(), url })
}

/// What the call is held for and what is sent.
struct Priced {
    bound: Micros,
    body: Bytes,
    llm: Option<(Style, LlmCall)>,
}

fn price(api: &KeyedApi, method: &Method, path: &str, body: Bytes) -> Result<Priced, Failure> {
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
                return Err(Failure::new(
                    Kind::MethodNotAllowed,
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

/// What an idempotency key stands for: the call as the agent sent it (its headers aside, which
/// SDKs vary between retries).
fn fingerprint(request: &ApiRequest) -> String {
    use sha2::{Digest, Sha256};
    crate::fingerprint::of(
        "api.call",
        &json!({
            "api": request.api.api.name,
            "method": request.method.as_str(),
            "url": request.api.url.as_str(),
            "task": request.task,
            "body_sha256": hex::encode(Sha256::digest(&request.body)),
        }),
    )
}

/// The answer a finished call's key gives its duplicates: the call is not made again.
fn already_called(hold: &HoldId, payment: &str, amount: Micros) -> String {
    let failure = Failure::new(
        Kind::Conflict,
        "api_already_called",
        "the call with this Idempotency-Key was made; it is not made again (its answer is not kept): \
         send a new Idempotency-Key to call again",
    )
    .with_extra(json!({ "hold_id": hold.to_string(), "payment": payment, "amount_micros": amount.get() }));
    Reply::error(&failure).stored()
}

/// Makes the call for the agent: held before it is sent, settled from what it cost.
pub async fn call(
    core: &Arc<Core>,
    engine: &Arc<Engine>,
    auth: &AgentAuth,
    request: ApiRequest,
) -> Result<Outcome, Failure> {
    let fingerprint = fingerprint(&request);
    let ApiRequest { api: target, method, headers: agent_headers, body, task, idempotency_key } = request;
    let Target { api, client, path, url } = target;
    let priced = price(&api, &method, &path, body)?;

    let mut details = BTreeMap::new();
    details.insert("method".to_owned(), method.as_str().to_owned());
    details.insert("path".to_owned(), path.chars().take(200).collect());
    if let Some((_, call)) = &priced.llm {
        details.insert("model".to_owned(), call.model.chars().take(128).collect());
    }
    let intent = PaymentIntent { amount: priced.bound, service: api.name.clone(), protocol: Protocol::Api, details };
    let timeout_ms = u64::try_from(engine.timeout.as_millis()).unwrap_or(u64::MAX);
    let lifetime_ms = timeout_ms.saturating_add(HOLD_MARGIN_MS);
    // The key stays in flight a little longer than the hold lives: a duplicate that takes it
    // over (the first caller died) finds the hold ended, and never sends the call again.
    let key = idempotency_key.unwrap_or_else(|| format!("api-{:032x}", rand::random::<u128>()));
    let idempotency = Idempotency {
        key: key.clone(),
        fingerprint,
        mode: IdempotencyMode::Pending { lease_ms: lifetime_ms.saturating_add(1_000) },
    };
    let spec = HoldSpec {
        intent: &intent,
        task: &task,
        expires: HoldExpiry::After(lifetime_ms),
        idempotency: Some(idempotency),
    };
    let (grant, timeout) = match pay::hold(core, auth, spec).await? {
        Held::New(grant) => (grant, engine.timeout),
        Held::Resumed(grant) => {
            let timeout = resumable(core, auth, &grant.hold_id, engine.timeout).await?;
            (grant, timeout)
        }
        Held::Finished(stored) => return Ok(Outcome::Replayed(Reply::replay(&stored)?)),
    };

    let mut headers = HeaderMap::new();
    for (name, value) in &agent_headers {
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
    let call = Call {
        core: Arc::clone(core),
        auth: auth.clone(),
        api,
        hold: grant.hold_id,
        held: grant.amount,
        key,
        llm: priced.llm,
    };
    let sent = client.request(method, url).headers(headers).timeout(timeout).body(priced.body).send().await;
    match sent {
        Ok(response) => call.answer(engine, response).await,
        Err(err) => Err(call.no_response(err).await),
    }
}

/// How long a resumed call (the repeat of one that waited for approval) may wait for its answer,
/// if it may still be sent: only a hold that is open with time left is, so that a call is made
/// upstream at most once, and settled while its hold is open.
async fn resumable(core: &Core, auth: &AgentAuth, hold: &HoldId, timeout: Duration) -> Result<Duration, Failure> {
    let info = pay::hold_info(core, auth, hold).await?;
    let left_ms = info.expires_at_ms.saturating_sub(core.clock.now_ms());
    let extra = json!({ "hold_id": hold.to_string(), "state": info.state });
    if info.state == "open" && left_ms >= 2 * RESUME_MARGIN_MS {
        return Ok(timeout.min(Duration::from_millis(left_ms - RESUME_MARGIN_MS)));
    }
    if info.state == "open" || info.state == "expired" {
        return Err(Failure::new(
            Kind::Conflict,
            "hold_expired",
            "the hold of this call ended (or has too little time left) before it was sent; nothing was sent: \
             call again with a new Idempotency-Key",
        )
        .with_extra(extra));
    }
    Err(Failure::new(
        Kind::Conflict,
        "api_already_called",
        "the call with this Idempotency-Key was made; it is not made again: send a new Idempotency-Key to call again",
    )
    .with_extra(extra))
}

/// A held call on its way.
struct Call {
    core: Arc<Core>,
    auth: AgentAuth,
    api: KeyedApi,
    hold: HoldId,
    held: Micros,
    /// The call's idempotency key: the end of its hold finishes it.
    key: String,
    llm: Option<(Style, LlmCall)>,
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

/// A streamed body of the upstream's, as the face passes it on.
fn passed_on(response: reqwest::Response) -> Body {
    Body::Stream(response.bytes_stream().map(|chunk| chunk.map_err(std::io::Error::other)).boxed())
}

impl Call {
    fn model(&self) -> &str {
        self.llm.as_ref().map(|(_, call)| call.model.as_str()).unwrap_or_default()
    }

    fn delivered(&self, status: u16, headers: HeaderMap, body: Body, paid: Paid) -> Outcome {
        Outcome::Delivered(Box::new(Delivered { status, headers, body, hold: self.hold.clone(), paid }))
    }

    /// Settles `amount` and stores the key's answer in the same ledger call (or, when the
    /// receipt signed ahead was not linked, with one more).
    async fn settle(&self, amount: Micros, details: BTreeMap<String, String>) -> Paid {
        let amount = if amount > self.held {
            tracing::warn!(agent = %self.auth.agent, hold = %self.hold, service = %self.api.name,
                cost = amount.get(), held = self.held.get(),
                "keyed API call cost more than its hold; settled at the hold (raise input_overhead_tokens)");
            self.held
        } else {
            amount
        };
        let answer = |settled: &pay::Settlement| Some(already_called(&self.hold, "settled", settled.outcome.amount));
        match pay::settle_finishing(&self.core, &self.auth, &self.hold, amount, &details, &self.key, answer).await {
            Ok((settlement, finished)) => {
                if !finished {
                    let stored = already_called(&self.hold, "settled", settlement.outcome.amount);
                    if let Err(err) =
                        pay::finish(&self.core, &self.auth, &self.key, IdempotencyFinish::Done(stored)).await
                    {
                        tracing::warn!(hold = %self.hold, code = err.code, "keyed API: could not finish the call's key");
                    }
                }
                Paid::Settled { amount, receipt: Some(settlement.receipt) }
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

    /// Voids the hold and stores the key's answer in the same ledger call.
    async fn void(&self, reason: &str) -> Paid {
        let stored = already_called(&self.hold, "voided", Micros::ZERO);
        match pay::void_finishing(&self.core, &self.auth, &self.hold, reason, &self.key, &stored).await {
            Ok(_) => Paid::Voided,
            Err(err) => {
                tracing::error!(agent = %self.auth.agent, hold = %self.hold, code = err.code, "keyed API hold not voided");
                Paid::Failed
            }
        }
    }

    /// The request got no response.
    async fn no_response(self, err: reqwest::Error) -> Failure {
        if let Some(refused) = refused_in(&err) {
            self.void("destination_refused").await;
            return Failure::new(Kind::Forbidden, "api_destination_forbidden", refused.to_string());
        }
        if err.is_connect() {
            // No connection, so nothing was sent: nothing can have been billed.
            let detail = describe(err);
            self.void("upstream_unreachable").await;
            return Failure::new(Kind::Provider, "api_upstream_unreachable", format!("{}: {detail}", self.api.name));
        }
        let why = if err.is_timeout() { "no_response_timeout" } else { "no_response" };
        let detail = describe(err);
        self.settle_unknown(why).await;
        Failure::new(
            Kind::Provider,
            "api_upstream_no_response",
            format!(
                "{} sent no response ({detail}); the call may have been billed, so its hold was settled",
                self.api.name
            ),
        )
    }

    async fn answer(self, engine: &Engine, response: reqwest::Response) -> Result<Outcome, Failure> {
        let status = response.status();
        match &self.api.pricing {
            Pricing::PerRequest { .. } => {
                let paid = if status.is_success() {
                    self.settle(self.held, BTreeMap::new()).await
                } else {
                    self.void(&format!("upstream_status_{}", status.as_u16())).await
                };
                let headers = response.headers().clone();
                Ok(self.delivered(status.as_u16(), headers, passed_on(response), paid))
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
                Ok(self.delivered(status.as_u16(), headers, passed_on(response), paid))
            }
            Pricing::OpenaiUsage(_) | Pricing::AnthropicUsage(_) => self.answer_llm(engine, response).await,
        }
    }

    async fn answer_llm(self, engine: &Engine, response: reqwest::Response) -> Result<Outcome, Failure> {
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
            let (status, hold) = (status.as_u16(), self.hold.clone());
            let body = self.stream(response);
            return Ok(Outcome::Delivered(Box::new(Delivered { status, headers, body, hold, paid: Paid::Pending })));
        }
        let body = read_body(response, engine.max_response_bytes).await;
        if !status.is_success() {
            // OpenAI- and Anthropic-style APIs do not bill a call they answer with an error.
            let paid = self.void(&format!("upstream_status_{}", status.as_u16())).await;
            return Ok(self.delivered(status.as_u16(), headers, Body::Whole(body.unwrap_or_default()), paid));
        }
        let body = match body {
            Ok(body) => body,
            Err(why) => {
                self.settle_unknown(why).await;
                return Err(Failure::new(
                    Kind::Provider,
                    if why == "body_too_large" { "api_upstream_body_too_large" } else { "api_upstream_cut" },
                    "the upstream's answer could not be read whole; the call's hold was settled",
                ));
            }
        };
        let style = self.llm.as_ref().map(|(style, _)| *style).unwrap_or(Style::OpenAi);
        let paid = match adapters::api::usage_of(style, &body) {
            Some(usage) => self.settle_usage(&usage).await,
            None => self.settle_unknown("usage_missing").await,
        };
        Ok(self.delivered(status.as_u16(), headers, Body::Whole(body), paid))
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
    fn stream(self, response: reqwest::Response) -> Body {
        let (style, strip) =
            self.llm.as_ref().map_or((Style::OpenAi, false), |(style, call)| (*style, call.usage_added));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
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
        Body::Stream(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed(),
        )
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
