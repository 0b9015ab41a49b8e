//! One fetch for an agent, paid when the server asks: the money path of the x402 endpoint.
//!
//! ```text
//! verify the agent ─▶ fetch unpaid ─▶ 402? ─▶ parse, choose (policy) ─▶ pay::hold (idempotent)
//!   ─▶ sign (fresh terms, or the stored ones when the purchase resumes) ─▶ fetch with payment
//!   ─▶ settled (whatever the status): pay::settle_finishing (receipt + the answer for retries,
//!      one ledger call)
//!   ─▶ 402 again / failed settlement report: pay::note_releasing (the provider's reason, and the
//!      purchase's key released, one call), the hold kept until validBefore
//!   ─▶ no answer, or no settlement report: pay::mark_unknown_releasing (counted, never expires;
//!      the key released in the same call) so that a retry re-sends the same authorization
//! ```
//!
//! A separate `finish` is left only where no ledger call ends the step: a resumed purchase that
//! cannot go on (`resumable` only reads the hold), an authorization too close to its expiry to
//! be re-sent (nothing changes), and the fallbacks when a folded call did not touch the record
//! (a settle whose receipt signed ahead was not linked).
//!
//! Nothing is held or signed before the 402 has been read and the policy accepted it, and
//! nothing is signed before the ledger granted the hold. A signed authorization is never voided:
//! anyone holding it could still settle it until its `validBefore`, so its hold stays until the
//! server confirms the settlement or the ledger expires it at `validBefore` — and when nothing
//! says whether it settled, it stays `unknown` (counted) until a retry or an admin resolves it.

use std::collections::BTreeMap;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::x402::{
    choose, parse_payment_required, parse_settlement, record_payment, sign_payment, upto_settled_amount, AllowedAsset,
    Choice, ChosenRequirement, EvmSigner, Nonce, PaymentId, PaymentPayload, PaymentRequired, PaymentScheme,
    PaymentTerms, SettlementResponse, UptoSettled, X402Error, PAYMENT_IDENTIFIER, UPTO,
};
use adapters::Micros;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::destination::Destinations;
use super::routes::{PaymentStatus, PaymentView};
use super::upstream::{asks_payment, Answer, Outgoing, Upstream, UpstreamError};
use crate::app::Core;
use crate::identity::{AgentAuth, HoldId};
use crate::ledger::{Idempotency, IdempotencyFinish, IdempotencyMode, RefusalReason};
use crate::outcome::{Failure, Kind};
use crate::pay::{self, Held, HoldSpec};
use crate::protocols::mcp_upstream::ToolCall;
use reqwest::header::{HeaderName, HeaderValue};

/// The daemon stops waiting for a paid response this long before the authorization's
/// `validBefore`, so that a confirmed settlement always reaches the ledger while its hold is open.
const SETTLE_MARGIN_MS: u64 = 1_000;
/// An authorization is not sent (or re-sent) with less time than this left to wait for the answer.
const MIN_SEND_MS: u64 = 1_000;
/// How long an in-flight purchase keeps its idempotency key beyond the upstream timeout before a
/// duplicate may take it over (the first caller died).
const LEASE_GRACE_MS: u64 = 15_000;
/// How many times a derived purchase key moves past a replayed refusal (see [`hold`]).
const MAX_DERIVED_KEY_STEPS: u32 = 8;
/// At most this much of a server's text is copied into log lines and errors.
const REASON_CHARS: usize = 200;

/// What a paid fetch runs with (built once at start-up from `X402Config`).
pub struct Engine {
    pub signer: EvmSigner,
    pub assets: Vec<AllowedAsset>,
    pub max_payment: Micros,
    pub max_validity_secs: u64,
    pub timeout: Duration,
    pub upstream: Upstream,
    pub destinations: Destinations,
    pub conformance: ConformanceSink,
}

/// An agent's fetch, parsed from either form.
pub struct FetchRequest {
    pub outgoing: Outgoing,
    pub task: String,
    /// The agent's own per-call maximum (the configured maximum applies regardless).
    pub max_amount: Option<Micros>,
    /// The agent's `Idempotency-Key`; without one, the purchase key is derived from the request.
    pub idempotency_key: Option<String>,
}

/// How the request reaches the server: over HTTP (the payment in a header), or as a tool call to
/// an upstream MCP server (the payment in `_meta`, see `crate::protocols::mcp_upstream`). Both
/// answer in the HTTP shape the flow reads.
pub enum Transport<'a> {
    Http { upstream: &'a Upstream, outgoing: &'a Outgoing },
    Mcp(&'a ToolCall),
}

impl Transport<'_> {
    async fn send(
        &self,
        payment: Option<(&PaymentPayload, &(HeaderName, HeaderValue))>,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        match self {
            Transport::Http { upstream, outgoing } => {
                upstream.send(outgoing, payment.map(|(_, header)| header), timeout).await
            }
            Transport::Mcp(call) => call.send(payment.map(|(payment, _)| payment), timeout).await,
        }
    }
}

/// What goes back to the agent: the upstream response, and the payment if one was made.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub answer: Answer,
    pub payment: Option<PaymentView>,
    /// True when this is the stored result of an earlier request for the same purchase.
    pub replayed: bool,
}

/// The outcome stored with a finished purchase's idempotency key, replayed to its retries.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Delivered {
        status: u16,
        headers: Vec<(String, String)>,
        body_base64: String,
        payment: Option<Box<PaymentView>>,
    },
    /// `failure`: the failure's kind (records written before it was stored name only the code).
    Error {
        #[serde(default)]
        failure: Option<String>,
        code: String,
        detail: String,
        extra: Option<Value>,
    },
}

/// The failures a finished purchase can store (a `Failure` code is `'static`), and their kinds.
const STORED_ERRORS: [(&str, Kind); 6] = [
    ("x402_already_paid", Kind::Conflict),
    ("x402_authorization_expired", Kind::Conflict),
    ("x402_resume_mismatch", Kind::Conflict),
    ("x402_signing_failed", Kind::Internal),
    ("x402_upstream_body_lost", Kind::Provider),
    ("x402_upstream_body_too_large", Kind::Provider),
];

/// Whether a failure ends a purchase for good (its retries get the same answer).
fn is_final(code: &str) -> bool {
    STORED_ERRORS.iter().any(|(known, _)| *known == code)
}

impl Stored {
    fn of_delivered(delivered: &Delivered) -> Stored {
        Stored::of_answer(&delivered.answer, delivered.payment.as_ref())
    }

    fn of_answer(answer: &Answer, payment: Option<&PaymentView>) -> Stored {
        Stored::Delivered {
            status: answer.status.as_u16(),
            headers: answer
                .headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
                .collect(),
            body_base64: STANDARD.encode(&answer.body),
            payment: payment.cloned().map(Box::new),
        }
    }

    fn of_error(err: &Failure) -> Stored {
        Stored::Error {
            failure: Some(err.kind.as_str().to_owned()),
            code: err.code.to_owned(),
            detail: err.detail.clone(),
            extra: err.extra.clone(),
        }
    }

    fn replay(text: &str) -> Result<Delivered, Failure> {
        let stored: Stored = serde_json::from_str(text).map_err(Failure::internal)?;
        match stored {
            Stored::Delivered { status, headers, body_base64, payment } => {
                let body = STANDARD.decode(body_base64).map_err(Failure::internal)?.into();
                let answer = Answer::from_parts(status, headers, body)
                    .ok_or_else(|| Failure::internal(format!("a stored x402 answer has status {status}")))?;
                Ok(Delivered { answer, payment: payment.map(|payment| *payment), replayed: true })
            }
            Stored::Error { failure, code, detail, extra } => {
                let (code, known_kind) = STORED_ERRORS
                    .iter()
                    .find(|(known, _)| *known == code)
                    .copied()
                    .unwrap_or(("x402_failed", Kind::Internal));
                let kind = failure.as_deref().and_then(Kind::from_name).unwrap_or(known_kind);
                let mut err = Failure::new(kind, code, detail);
                let mut extra = extra.unwrap_or_else(|| json!({}));
                if let Value::Object(map) = &mut extra {
                    map.insert("replayed".to_owned(), Value::Bool(true));
                }
                err.extra = Some(extra);
                Err(err)
            }
        }
    }
}

/// The terms that make one authorization: the same terms always sign the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Terms {
    nonce: Nonce,
    /// The Unix second the authorization was (first) signed at; its validity derives from it.
    signed_at: u64,
    payment_id: Option<PaymentId>,
}

impl Terms {
    fn fresh(now_secs: u64, declares_payment_id: bool) -> Terms {
        let payment_id = declares_payment_id
            .then(|| format!("spendcap_{}", hex::encode(rand::random::<[u8; 16]>())))
            .and_then(|id| id.parse().ok());
        Terms { nonce: Nonce::random(), signed_at: now_secs, payment_id }
    }

    fn payment_terms(&self) -> PaymentTerms {
        PaymentTerms { nonce: self.nonce, now_secs: self.signed_at, payment_id: self.payment_id.clone() }
    }

    /// Writes the terms into the hold's details, so that a resumed purchase signs them again.
    fn write(&self, choice: &Choice, details: &mut BTreeMap<String, String>) {
        details.insert("nonce".to_owned(), self.nonce.to_string());
        details.insert("signed_at".to_owned(), self.signed_at.to_string());
        details.insert("valid_before".to_owned(), choice.valid_before(self.signed_at).to_string());
        details.insert("x402_version".to_owned(), choice.version().to_string());
        if let Some(id) = &self.payment_id {
            details.insert("payment_id".to_owned(), id.to_string());
        }
    }

    /// Reads the terms a hold was made with.
    fn read(details: &BTreeMap<String, String>) -> Option<Terms> {
        Some(Terms {
            nonce: details.get("nonce")?.parse().ok()?,
            signed_at: details.get("signed_at")?.parse().ok()?,
            payment_id: match details.get("payment_id") {
                Some(id) => Some(id.parse().ok()?),
                None => None,
            },
        })
    }
}

fn error(kind: Kind, code: &'static str, detail: impl Into<String>) -> Failure {
    Failure::new(kind, code, detail)
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A 402 the daemon will not pay: unreadable (the server's fault) or refused by the policy (like
/// a budget refusal). Either way nothing was held or signed.
fn refused_402(err: &X402Error) -> Failure {
    let kind = match err {
        X402Error::UnsupportedScheme { .. }
        | X402Error::UnknownNetwork { .. }
        | X402Error::UnknownAsset { .. }
        | X402Error::DomainMismatch { .. }
        | X402Error::OverPaymentMaximum { .. }
        | X402Error::NoAcceptableRequirement { .. }
        | X402Error::PaymentIdRequired => Kind::Refused,
        _ => Kind::Provider,
    };
    let mut extra = json!({ "upstream_status": 402 });
    if let (X402Error::OverPaymentMaximum { amount, maximum }, Value::Object(map)) = (err, &mut extra) {
        map.insert("requested_micros".to_owned(), json!(amount));
        map.insert("maximum_micros".to_owned(), json!(maximum));
    }
    error(kind, err.code(), err.to_string()).with_extra(extra)
}

/// An unpaid request that got no usable answer.
fn unpaid_failure(err: UpstreamError) -> Failure {
    match err {
        UpstreamError::Refused(refused) => error(Kind::Forbidden, "x402_destination_forbidden", refused.to_string()),
        UpstreamError::NoResponse { timed_out: true, detail } => {
            error(Kind::ProviderTimeout, "x402_upstream_timeout", detail)
        }
        UpstreamError::NoResponse { timed_out: false, detail } => {
            error(Kind::Provider, "x402_upstream_unreachable", detail)
        }
        UpstreamError::Body { too_large: true, status, detail, .. } => {
            error(Kind::Provider, "x402_upstream_body_too_large", detail)
                .with_extra(json!({ "upstream_status": status.as_u16() }))
        }
        UpstreamError::Body { too_large: false, status, detail, .. } => {
            error(Kind::Provider, "x402_upstream_body_lost", detail)
                .with_extra(json!({ "upstream_status": status.as_u16() }))
        }
    }
}

/// The upstream's answer for an error body: status, headers (lowercase names, repeated ones
/// joined with ", ") and body (text, or `body_base64`).
fn upstream_json(answer: &Answer) -> Value {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &answer.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.entry(name.as_str().to_owned()).and_modify(|v| *v = format!("{v}, {value}")).or_insert(value);
    }
    match std::str::from_utf8(&answer.body) {
        Ok(text) => json!({ "status": answer.status.as_u16(), "headers": headers, "body": text }),
        Err(_) => {
            json!({ "status": answer.status.as_u16(), "headers": headers, "body_base64": STANDARD.encode(&answer.body) })
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Everything the agent asked for, normalised: method, URL, the headers sent upstream (lowercase
/// names, values in order), the body's digest, the task and the agent's maximum.
fn request_json(request: &FetchRequest) -> Value {
    let outgoing = &request.outgoing;
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &outgoing.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    json!({
        "method": outgoing.method.as_str(),
        "url": outgoing.url.as_str(),
        "headers": headers,
        "body_sha256": sha256_hex(&outgoing.body),
        "task": request.task,
        "max_amount_micros": request.max_amount.map(Micros::get),
    })
}

/// The purchase's idempotency key: the agent's own, or one derived from what it asked for (task,
/// method, URL, body), so that a plain retry of the same request is the same purchase. A retry
/// that changes anything else (headers, maximum) is the same purchase too, and so a conflict:
/// resuming it must never sign a second authorization.
fn purchase_key(request: &FetchRequest) -> String {
    match &request.idempotency_key {
        Some(key) => format!("x402:k:{key}"),
        None => {
            let outgoing = &request.outgoing;
            let material =
                format!("{}\n{}\n{}\n{}", request.task, outgoing.method, outgoing.url, sha256_hex(&outgoing.body));
            format!("x402:r:{}", sha256_hex(material.as_bytes()))
        }
    }
}

/// What a purchase key stands for: the whole request and the requirement chosen for it. The
/// same key with any other request (task, maximum, headers, body, ...), price or payee is an
/// `idempotency_conflict`.
fn fingerprint(request: &FetchRequest, choice: &Choice) -> String {
    let scheme = match choice.requirement() {
        ChosenRequirement::V1(requirement) => requirement.scheme.as_str(),
        ChosenRequirement::V2(requirement) => requirement.scheme.as_str(),
    };
    crate::fingerprint::of(
        "x402.fetch",
        &json!({
            "request": request_json(request),
            "payment": {
                "version": choice.version().to_string(),
                "scheme": scheme,
                "network": choice.network(),
                "amount": choice.atomic_amount().to_string(),
                "asset": choice.asset().to_string(),
                "pay_to": choice.pay_to().to_string(),
                "timeout_secs": choice.timeout_secs(),
            },
        }),
    )
}

/// Says what an `idempotency_conflict` means for a fetch.
fn explain_conflict(mut err: Failure, request: &FetchRequest) -> Failure {
    if err.code == "idempotency_conflict" {
        err.detail = if request.idempotency_key.is_some() {
            "this Idempotency-Key was used for another request, or the server now asks another price or payee"
        } else {
            "this same request was already bought at another price or payee; send an Idempotency-Key to buy it again"
        }
        .to_owned();
    }
    err
}

/// Whether the agent could hold `amount` now, counting every ancestor.
async fn has_room(core: &Core, agent: &AgentAuth, amount: Micros) -> bool {
    let balance = core.ledger.balance(core.clock.now_ms(), &agent.agent, &agent.caller()).await;
    balance.is_ok_and(|balance| balance.available >= amount)
}

/// Holds the purchase under its idempotency key: a new hold, the earlier one of the same
/// purchase (resumed), or the stored outcome of a finished one.
///
/// A refusal holds nothing, but the ledger keeps replaying it for its key. So when a derived key
/// (no `Idempotency-Key`) replays a refusal while the agent has room now (its cap was raised, its
/// holds ended), the purchase moves on to the request's next key (`…:1`, `…:2`, …); retries walk
/// the same keys, so they find the same purchase.
async fn hold(
    core: &Core,
    engine: &Engine,
    agent: &AgentAuth,
    request: &FetchRequest,
    choice: &Choice,
    intent: &adapters::PaymentIntent,
    expires_at_ms: u64,
) -> Result<(String, Held), Failure> {
    let fingerprint = fingerprint(request, choice);
    let lease_ms = engine.timeout.as_millis() as u64 + LEASE_GRACE_MS;
    let base_key = purchase_key(request);
    let mut step = 0;
    loop {
        let key = if step == 0 { base_key.clone() } else { format!("{base_key}:{step}") };
        let spec = HoldSpec {
            intent,
            task: &request.task,
            expires: crate::ledger::HoldExpiry::At(expires_at_ms),
            idempotency: Some(Idempotency {
                key: key.clone(),
                fingerprint: fingerprint.clone(),
                mode: IdempotencyMode::Pending { lease_ms },
            }),
        };
        match pay::hold(core, agent, spec).await {
            Err(refusal)
                if refusal.code == RefusalReason::CapExceeded.code()
                    && request.idempotency_key.is_none()
                    && step < MAX_DERIVED_KEY_STEPS
                    && has_room(core, agent, choice.amount()).await =>
            {
                step += 1;
            }
            held => return Ok((key, held.map_err(|err| explain_conflict(err, request))?)),
        }
    }
}

/// Fetches for the agent, paying when the server asks and the budget and policy allow.
pub async fn fetch(
    core: &Core,
    engine: &Engine,
    agent: &AgentAuth,
    request: FetchRequest,
) -> Result<Delivered, Failure> {
    let transport = Transport::Http { upstream: &engine.upstream, outgoing: &request.outgoing };
    fetch_via(core, engine, agent, &request, &transport).await
}

/// [`fetch`] over any transport: `request.outgoing` names the purchase (its key, fingerprint and
/// resource), `transport` carries the calls.
pub async fn fetch_via(
    core: &Core,
    engine: &Engine,
    agent: &AgentAuth,
    request: &FetchRequest,
    transport: &Transport<'_>,
) -> Result<Delivered, Failure> {
    // Nothing is fetched for a caller whose token does not match, nor for an agent that is
    // revoked, suspended, expired or denied x402 or this host: such a refusal is logged and
    // counted like a refused hold.
    let host = request.outgoing.url.host_str().unwrap_or_default().to_ascii_lowercase();
    pay::precheck_task(core, agent, adapters::Protocol::X402, &host, &request.task).await?;

    let first = transport.send(None, engine.timeout).await.map_err(unpaid_failure)?;
    if !first.asks_payment() {
        return Ok(Delivered { answer: first, payment: None, replayed: false });
    }
    let required = parse_payment_required(&first.headers, &first.body).map_err(|err| {
        tracing::info!(agent = %agent.agent, code = err.code(), "x402: unusable 402");
        refused_402(&err)
    })?;
    let policy = adapters::x402::Policy {
        assets: engine.assets.clone(),
        max_payment: request.max_amount.map_or(engine.max_payment, |max| max.min(engine.max_payment)),
        max_validity_secs: engine.max_validity_secs,
    };
    let choice = choose(&required, &policy).map_err(|err| {
        tracing::info!(agent = %agent.agent, code = err.code(), "x402: payment refused by policy");
        refused_402(&err)
    })?;
    if choice.timeout_secs().saturating_mul(1000) < MIN_SEND_MS + SETTLE_MARGIN_MS + 1_000 {
        return Err(error(
            Kind::Refused,
            "x402_validity_too_short",
            format!("the server allows {} s to settle; at least 3 s are needed", choice.timeout_secs()),
        ));
    }

    // Terms for a new purchase, stored in the hold before holding: a resumed purchase reads them
    // back and signs exactly the same authorization.
    let now_secs = core.clock.now_ms() / 1000;
    let declares_payment_id = matches!(&required, PaymentRequired::V2(r)
        if r.extensions.as_ref().is_some_and(|extensions| extensions.contains_key(PAYMENT_IDENTIFIER)));
    let fresh = Terms::fresh(now_secs, declares_payment_id);
    let mut intent = choice.intent(request.outgoing.url.as_str());
    fresh.write(&choice, &mut intent.details);
    let expires_at_ms = choice.valid_before(now_secs) * 1000;
    let (key, held) = hold(core, engine, agent, request, &choice, &intent, expires_at_ms).await?;
    let purchase = match held {
        Held::Finished(stored) => return Stored::replay(&stored),
        Held::New(grant) => Purchase { hold: grant.hold_id, terms: fresh, resumed: false },
        Held::Resumed(grant) => match resumable(core, agent, &grant.hold_id).await {
            Ok(terms) => Purchase { hold: grant.hold_id, terms, resumed: true },
            // The purchase is over for good: its retries get the same answer.
            Err(err) if is_final(err.code) => return Err(finish_with_error(core, agent, &key, err).await),
            Err(err) => return Err(err),
        },
    };
    let paying = Paying { core, engine, agent, key, choice, purchase, url: &request.outgoing.url };
    paying.pay(transport).await
}

/// A granted hold and the terms of its authorization.
struct Purchase {
    hold: HoldId,
    terms: Terms,
    resumed: bool,
}

/// The terms of the purchase a retry resumes, if it can still be paid with them.
async fn resumable(core: &Core, agent: &AgentAuth, hold: &HoldId) -> Result<Terms, Failure> {
    let info = pay::hold_info(core, agent, hold).await?;
    if info.state == "settled" {
        return Err(error(
            Kind::Conflict,
            "x402_already_paid",
            "this purchase was paid and settled, but its response was lost; it is not paid again",
        )
        .with_extra(json!({ "hold_id": hold.to_string(), "amount_micros": info.amount.get() })));
    }
    let details: BTreeMap<String, String> = serde_json::from_str(&info.details).unwrap_or_default();
    let expired = || {
        error(
            Kind::Conflict,
            "x402_authorization_expired",
            "the authorization signed for this purchase has expired without a confirmed settlement; \
             nothing new is signed under the same purchase: retry with a new Idempotency-Key to buy again",
        )
        .with_extra(json!({ "hold_id": hold.to_string(), "nonce": details.get("nonce") }))
    };
    let sendable = info.expires_at_ms >= core.clock.now_ms() + SETTLE_MARGIN_MS + MIN_SEND_MS;
    if info.state == "unknown" && !sendable {
        // It may have settled: it stays counted until an admin (or a read-back) resolves it.
        return Err(error(
            Kind::Conflict,
            "x402_payment_outcome_unknown",
            "the payment of this purchase was sent without an answer and its authorization can no longer be \
             sent again; the amount stays held until an admin resolves it (GET /v1/holds?state=unknown)",
        )
        .with_extra(
            json!({ "hold_id": hold.to_string(), "amount_micros": info.amount.get(), "nonce": details.get("nonce") }),
        ));
    }
    if (info.state != "open" && info.state != "unknown") || !sendable {
        return Err(expired());
    }
    let mut terms =
        Terms::read(&details).ok_or_else(|| Failure::internal(format!("hold {hold} lacks its x402 terms")))?;
    // A payment that waited for approval is signed only after it: its validity window starts at
    // the approval (the ledger's time of it, so every resume on any instance signs the same).
    if let Some(approved_at_ms) = info.approved_at_ms {
        terms.signed_at = terms.signed_at.max(approved_at_ms / 1000);
    }
    Ok(terms)
}

/// Ends a purchase that cannot go on: its retries get the same error.
async fn finish_with_error(core: &Core, agent: &AgentAuth, key: &str, err: Failure) -> Failure {
    match serde_json::to_string(&Stored::of_error(&err)) {
        Ok(stored) => finish(core, agent, key, IdempotencyFinish::Done(stored)).await,
        Err(cause) => tracing::error!(error = %cause, "x402: cannot store a purchase's outcome"),
    }
    err
}

async fn finish(core: &Core, agent: &AgentAuth, key: &str, outcome: IdempotencyFinish) {
    if let Err(err) = pay::finish(core, agent, key, outcome).await {
        // The lease runs out on its own; a retry then resumes the same hold.
        tracing::warn!(agent = %agent.agent, code = err.code, "x402: could not finish the purchase's idempotency key");
    }
}

struct Paying<'a> {
    core: &'a Core,
    engine: &'a Engine,
    agent: &'a AgentAuth,
    key: String,
    choice: Choice,
    purchase: Purchase,
    url: &'a reqwest::Url,
}

impl Paying<'_> {
    fn valid_before(&self) -> u64 {
        self.choice.valid_before(self.purchase.terms.signed_at)
    }

    fn is_upto(&self) -> bool {
        matches!(self.choice.scheme(), PaymentScheme::Upto { .. })
    }

    /// What a confirmed settlement is recorded at: the price (`exact`), or what the server
    /// reports it settled (`upto`), never above the authorised maximum; the incident (a note
    /// reason) when the report cannot be taken as it is.
    fn settled_amount(&self, settlement: &SettlementResponse) -> (Micros, Option<&'static str>) {
        let maximum = self.choice.amount();
        if !self.is_upto() {
            return (maximum, None);
        }
        match upto_settled_amount(settlement, self.choice.decimals(), maximum) {
            UptoSettled::Within(amount) => (amount, None),
            // The permit cannot move more than the maximum: that is what may have moved.
            UptoSettled::AboveMaximum { .. } => (maximum, Some("incident_x402_upto_settled_above_maximum")),
            UptoSettled::Unreadable => (maximum, Some("incident_x402_upto_settled_amount_unreadable")),
        }
    }

    fn service(&self) -> String {
        self.url.host_str().unwrap_or_default().to_ascii_lowercase()
    }

    /// The facts of this payment for log lines and receipts.
    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("pay_to".to_owned(), self.choice.pay_to().to_string()),
            ("network".to_owned(), self.choice.network().to_owned()),
            ("asset".to_owned(), self.choice.asset().to_string()),
            ("nonce".to_owned(), self.purchase.terms.nonce.to_string()),
            ("valid_before".to_owned(), self.valid_before().to_string()),
            ("x402_version".to_owned(), self.choice.version().to_string()),
        ])
    }

    fn view(&self, status: PaymentStatus) -> PaymentView {
        PaymentView {
            status,
            hold_id: self.purchase.hold.to_string(),
            amount_micros: self.choice.amount().get(),
            network: self.choice.network().to_owned(),
            asset: self.choice.asset().to_string(),
            pay_to: self.choice.pay_to().to_string(),
            nonce: self.purchase.terms.nonce.to_string(),
            valid_before: self.valid_before(),
            transaction: None,
            payer: None,
            receipt: None,
            reason: None,
            scheme: self.is_upto().then(|| UPTO.to_owned()),
            maximum_micros: self.is_upto().then(|| self.choice.amount().get()),
        }
    }

    /// Signs (or re-signs) the authorization, sends it, and accounts for the answer.
    async fn pay(self, transport: &Transport<'_>) -> Result<Delivered, Failure> {
        let payment = match self.sign() {
            Ok(payment) => payment,
            Err(err) => return Err(self.abandon(err).await),
        };
        let header = match payment.to_header() {
            Ok(header) => header,
            Err(err) => {
                let err = error(Kind::Internal, "x402_signing_failed", err.to_string());
                return Err(self.abandon(err).await);
            }
        };
        let now_ms = self.core.clock.now_ms();
        let wait_ms = (self.valid_before() * 1000).saturating_sub(now_ms + SETTLE_MARGIN_MS);
        if wait_ms < MIN_SEND_MS {
            // Only a resumed purchase can get here (a new one has at least 3 s): its authorization
            // is about to expire, so it is not sent again and nothing new is signed.
            let err = error(
                Kind::Conflict,
                "x402_authorization_expired",
                "the authorization of this purchase expires too soon to be sent again",
            );
            return Err(finish_with_error(self.core, self.agent, &self.key, err).await);
        }
        let timeout = self.engine.timeout.min(Duration::from_millis(wait_ms));
        record_payment(&self.engine.conformance, &payment, &self.choice);
        tracing::info!(agent = %self.agent.agent, service = %self.service(), pay_to = %self.choice.pay_to(),
            network = self.choice.network(), asset = %self.choice.asset(), nonce = %self.purchase.terms.nonce,
            amount = self.choice.amount().get(), resumed = self.purchase.resumed, "x402: sending payment");
        match transport.send(Some((&payment, &header)), timeout).await {
            // A known charge is settled whatever the answer looks like, even a 402.
            Ok(answer)
                if answer.asks_payment()
                    && !parse_settlement(&answer.headers, self.choice.version()).is_ok_and(|s| s.success) =>
            {
                Err(self.rejected(&answer).await)
            }
            Ok(answer) => self.answered(answer).await,
            Err(UpstreamError::Body { status, headers, .. }) if asks_payment(status) => {
                Err(self.rejected(&Answer { status, headers, body: Default::default() }).await)
            }
            Err(UpstreamError::Body { status, headers, too_large, detail }) => {
                match parse_settlement(&headers, self.choice.version()) {
                    Ok(settlement) if settlement.success => {
                        // Paid, but the body cannot be passed on: record the payment anyway, and
                        // store the error for the purchase's retries in the same settle.
                        let code = if too_large { "x402_upstream_body_too_large" } else { "x402_upstream_body_lost" };
                        let failure = |payment: Option<&PaymentView>| {
                            error(Kind::Provider, code, detail.clone())
                                .with_extra(json!({ "upstream_status": status.as_u16(), "payment": payment }))
                        };
                        let stored = |_: &Answer, view: &PaymentView| {
                            serde_json::to_string(&Stored::of_error(&failure(Some(view)))).ok()
                        };
                        let answer = Answer { status, headers, body: Default::default() };
                        let (delivered, finished) = self.settled(answer, settlement, stored).await;
                        let err = failure(delivered.payment.as_ref());
                        if finished {
                            return Err(err);
                        }
                        Err(finish_with_error(self.core, self.agent, &self.key, err).await)
                    }
                    _ => Err(self.unknown(format!("HTTP {status}, then {detail}"), false).await),
                }
            }
            Err(UpstreamError::NoResponse { timed_out, detail }) => Err(self.unknown(detail, timed_out).await),
            // A pooled connection does not resolve again; a new one is checked like the first.
            Err(UpstreamError::Refused(refused)) => Err(self.unknown(refused.to_string(), false).await),
        }
    }

    /// The authorization: fresh terms for a new purchase, the stored ones for a resumed one (the
    /// signature is deterministic, so it is the very same authorization).
    fn sign(&self) -> Result<PaymentPayload, Failure> {
        let payment = sign_payment(&self.choice, &self.engine.signer, &self.purchase.terms.payment_terms())
            .map_err(|err| error(Kind::Internal, "x402_signing_failed", err.to_string()))?;
        if payment.nonce().ok() != Some(self.purchase.terms.nonce)
            || payment.valid_until() != self.valid_before().to_string()
        {
            return Err(error(
                Kind::Conflict,
                "x402_resume_mismatch",
                "the authorization would differ from the one first signed for this purchase; it is not sent",
            ));
        }
        Ok(payment)
    }

    /// Gives up before anything was sent. A new purchase's hold is voided (its authorization
    /// never left the daemon); a resumed one keeps its hold (the first authorization did).
    async fn abandon(&self, err: Failure) -> Failure {
        tracing::error!(agent = %self.agent.agent, code = err.code, detail = %err.detail, "x402: payment not sent");
        if !self.purchase.resumed {
            // The void stores the error for the purchase's retries in the same ledger call.
            let stored = serde_json::to_string(&Stored::of_error(&err)).unwrap_or_default();
            match pay::void_finishing(self.core, self.agent, &self.purchase.hold, err.code, &self.key, &stored).await {
                Ok((_, true)) => return err,
                Ok((_, false)) => {}
                Err(void_err) => {
                    tracing::warn!(hold = %self.purchase.hold, code = void_err.code, "x402: could not void an unsent payment's hold")
                }
            }
        }
        finish_with_error(self.core, self.agent, &self.key, err).await
    }

    /// Logs a fact about the held payment without changing any balance.
    async fn note(&self, reason: &str, extra: &[(&str, String)]) {
        let mut details = self.details();
        details.extend(extra.iter().map(|(key, value)| ((*key).to_owned(), clip(value))));
        if let Err(err) = pay::note(self.core, self.agent, &self.purchase.hold, reason, &details).await {
            tracing::warn!(hold = %self.purchase.hold, code = err.code, reason, "x402: could not log a note");
        }
    }

    /// [`Self::note`] for a payment whose hold stays (its authorization is live): the same
    /// ledger call releases the purchase's key, so that a retry re-sends the same authorization;
    /// if it did not, one more call releases it.
    async fn note_releasing(&self, reason: &str, extra: &[(&str, String)]) {
        let mut details = self.details();
        details.extend(extra.iter().map(|(key, value)| ((*key).to_owned(), clip(value))));
        match pay::note_releasing(self.core, self.agent, &self.purchase.hold, reason, &details, &self.key).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(hold = %self.purchase.hold, code = err.code, reason, "x402: could not log a note")
            }
        }
        finish(self.core, self.agent, &self.key, IdempotencyFinish::Release).await;
    }

    /// The server answered 402 to the payment: it rejected it. The authorization stays live
    /// until `validBefore` (the server, or anyone it passed it to, could still settle it), so the
    /// hold stays too, and the ledger releases it then. A retry of the same purchase re-sends
    /// the same authorization.
    async fn rejected(&self, answer: &Answer) -> Failure {
        // The settlement report says why a settlement failed; the 402's `error` why the payment
        // was refused. Either is the provider's reason.
        let settlement = parse_settlement(&answer.headers, self.choice.version()).ok();
        let reason = settlement
            .as_ref()
            .and_then(|s| s.error_reason.clone())
            .or_else(|| {
                parse_payment_required(&answer.headers, &answer.body).ok().and_then(|r| r.error().map(str::to_owned))
            })
            .map(|r| clip(&r))
            .unwrap_or_else(|| "unspecified".to_owned());
        let message = settlement.and_then(|s| s.error_message).map(|m| clip(&m));
        tracing::warn!(agent = %self.agent.agent, service = %self.service(), nonce = %self.purchase.terms.nonce,
            reason = %reason, "x402: payment rejected; the hold stays until validBefore");
        let mut facts = vec![
            ("server_reason", reason.clone()),
            ("upstream_status", answer.status.as_u16().to_string()),
            ("upstream_body", String::from_utf8_lossy(&answer.body).into_owned()),
        ];
        if let Some(message) = &message {
            facts.push(("server_message", message.clone()));
        }
        self.note_releasing("x402_payment_rejected", &facts).await;
        error(Kind::Refused, "x402_payment_rejected", format!("the server rejected the payment: {reason}")).with_extra(
            json!({
                "reason": reason,
                "message": message,
                "upstream": upstream_json(answer),
                "hold_id": self.purchase.hold.to_string(),
                "amount_micros": self.choice.amount().get(),
                "held_until_ms": self.valid_before() * 1000,
                "nonce": self.purchase.terms.nonce.to_string(),
            }),
        )
    }

    /// Marks the hold `unknown`: the payment was sent and nothing says whether it settled. The
    /// hold stays counted and never expires until a retry gets the answer or an admin resolves it.
    /// Also releases the purchase's key in the same ledger call, so that a retry re-sends the
    /// same authorization; if that did not happen, releases it with one more call.
    async fn mark_unknown(&self, reason: &str) {
        let reason = format!("x402_outcome_unknown: {}", clip(reason));
        match pay::mark_unknown_releasing(self.core, &self.purchase.hold, &reason, Some(&self.key)).await {
            Ok((_, true)) => return,
            Ok((_, false)) => {}
            Err(err) => tracing::error!(hold = %self.purchase.hold, code = err.code,
                "x402: could not mark a payment's outcome unknown; its hold lapses at validBefore"),
        }
        finish(self.core, self.agent, &self.key, IdempotencyFinish::Release).await;
    }

    /// No answer to a sent payment: it may have settled. The hold becomes `unknown` (counted,
    /// never expires), and the purchase key is released so that a retry re-sends the same
    /// authorization (never a second one) and settles on success.
    async fn unknown(&self, detail: String, timed_out: bool) -> Failure {
        tracing::warn!(agent = %self.agent.agent, service = %self.service(), nonce = %self.purchase.terms.nonce,
            detail = %detail, "x402: payment outcome unknown; the hold stays counted until resolved");
        self.mark_unknown(&detail).await;
        let kind = if timed_out { Kind::ProviderTimeout } else { Kind::Provider };
        error(
            kind,
            "x402_payment_outcome_unknown",
            format!(
                "the payment was sent but no answer came back ({}); money may have moved, so the amount stays \
                 held until the outcome is known: retry the same request (before valid_before) to resume the \
                 same purchase with the same authorization",
                clip(&detail)
            ),
        )
        .with_extra(json!({
            "hold_id": self.purchase.hold.to_string(),
            "amount_micros": self.choice.amount().get(),
            "valid_before": self.valid_before(),
            "nonce": self.purchase.terms.nonce.to_string(),
        }))
    }

    /// The server answered the payment with something other than a 402.
    async fn answered(&self, answer: Answer) -> Result<Delivered, Failure> {
        match parse_settlement(&answer.headers, self.choice.version()) {
            Ok(settlement) if settlement.success => {
                let stored = |answer: &Answer, view: &PaymentView| {
                    serde_json::to_string(&Stored::of_answer(answer, Some(view))).ok()
                };
                let (delivered, finished) = self.settled(answer, settlement, stored).await;
                if !finished {
                    match serde_json::to_string(&Stored::of_delivered(&delivered)) {
                        Ok(stored) => finish(self.core, self.agent, &self.key, IdempotencyFinish::Done(stored)).await,
                        Err(err) => tracing::error!(error = %err, "x402: cannot store a purchase's outcome"),
                    }
                }
                Ok(delivered)
            }
            outcome => {
                // No confirmation (or a failure report): the authorization may still settle, so
                // the hold stays until validBefore; a retry re-sends the same authorization.
                let (reason, reported) = match outcome {
                    Ok(settlement) => (settlement.error_reason.unwrap_or_else(|| "settlement_failed".to_owned()), true),
                    Err(err) => (err.code().to_owned(), false),
                };
                tracing::warn!(agent = %self.agent.agent, service = %self.service(), nonce = %self.purchase.terms.nonce,
                    status = answer.status.as_u16(), reason = %reason, "x402: settlement not confirmed");
                if reported {
                    // The server reported a failed settlement: the authorization stays live until
                    // validBefore, and its hold with it.
                    self.note_releasing(
                        "x402_settlement_unconfirmed",
                        &[("reason", reason.clone()), ("upstream_status", answer.status.as_u16().to_string())],
                    )
                    .await;
                } else {
                    // The server answered without any settlement report: it may well have
                    // settled. Nothing says no money moved, so the outcome is unknown.
                    self.mark_unknown(&format!(
                        "HTTP {} without a settlement report ({reason})",
                        answer.status.as_u16()
                    ))
                    .await;
                }
                let mut view = self.view(PaymentStatus::Unconfirmed);
                view.reason = Some(clip(&reason));
                Ok(Delivered { answer, payment: Some(view), replayed: false })
            }
        }
    }

    /// The server confirmed the settlement: the hold is settled for the price, with a receipt.
    /// The settle itself stores `stored(answer, payment)` for the purchase's retries when it can
    /// (true: it did; see [`pay::settle_finishing`]).
    async fn settled(
        &self,
        answer: Answer,
        settlement: SettlementResponse,
        stored: impl Fn(&Answer, &PaymentView) -> Option<String>,
    ) -> (Delivered, bool) {
        let mut details = self.details();
        details.insert("transaction".to_owned(), clip(&settlement.transaction));
        if let Some(payer) = &settlement.payer {
            details.insert("payer".to_owned(), clip(payer));
        }
        if settlement.network != self.choice.network() {
            details.insert("settled_network".to_owned(), clip(&settlement.network));
        }
        if let Some(amount) = &settlement.amount {
            details.insert("settled_amount".to_owned(), clip(amount));
        }
        let (amount, incident) = self.settled_amount(&settlement);
        if let Some(incident) = incident {
            // The server says it took more than was authorised (or not how much): the maximum is
            // settled, and an operator is told (a `payment.incident` webhook).
            tracing::error!(agent = %self.agent.agent, service = %self.service(), hold = %self.purchase.hold,
                nonce = %self.purchase.terms.nonce, reported = settlement.amount.as_deref().map(clip).unwrap_or_default(),
                maximum = self.choice.amount().get(), incident, "x402: upto settlement report above the authorised maximum or unreadable; the maximum is settled");
            let reported = settlement.amount.as_deref().map(clip).unwrap_or_else(|| "absent".to_owned());
            self.note(
                incident,
                &[("reported_amount", reported), ("maximum_micros", self.choice.amount().get().to_string())],
            )
            .await;
        }
        if self.is_upto() {
            details.insert("scheme".to_owned(), UPTO.to_owned());
            details.insert("maximum_micros".to_owned(), self.choice.amount().get().to_string());
        }
        let mut view = self.view(PaymentStatus::Settled);
        view.amount_micros = amount.get();
        view.transaction = Some(clip(&settlement.transaction));
        view.payer = settlement.payer.as_deref().map(clip);
        let answer_of = |settled: &pay::Settlement| {
            let mut view = view.clone();
            view.receipt = Some(settled.receipt.clone());
            stored(&answer, &view)
        };
        let result =
            pay::settle_finishing(self.core, self.agent, &self.purchase.hold, amount, &details, &self.key, answer_of)
                .await;
        let mut finished = false;
        match result {
            Ok((settled, stored)) => {
                finished = stored;
                tracing::info!(agent = %self.agent.agent, service = %self.service(), hold = %self.purchase.hold,
                    nonce = %self.purchase.terms.nonce, transaction = %clip(&settlement.transaction),
                    amount = settled.outcome.amount.get(), "x402: paid");
                view.receipt = Some(settled.receipt);
            }
            Err(err) => {
                // The money moved on-chain but the ledger could not record it: say so loudly, and
                // still hand the agent what it paid for.
                tracing::error!(agent = %self.agent.agent, hold = %self.purchase.hold, code = err.code,
                    nonce = %self.purchase.terms.nonce, transaction = %clip(&settlement.transaction),
                    "x402: settled upstream but the ledger did not record the settlement");
                view.reason = Some(err.code.to_owned());
            }
        }
        (Delivered { answer, payment: Some(view), replayed: false }, finished)
    }
}
