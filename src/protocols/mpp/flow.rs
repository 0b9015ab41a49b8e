//! One fetch for an agent, paid over MPP when the server asks.
//!
//! ```text
//! precheck ─▶ fetch unpaid ─▶ 402 + Payment challenges? ─▶ choose (policy) ─▶ pay::hold (idempotent)
//!   ─▶ mint the token (PSP, idempotency key <hold>:spt: a resumed purchase gets the same one)
//!   ─▶ fetch with Authorization: Payment <credential>
//!   ─▶ Payment-Receipt (success): pay::settle + receipt, finish(Done)
//!   ─▶ 402 again: pay::note_releasing (the key released in the same call), the hold stays
//!      until the token expires (then the ledger releases it)
//!   ─▶ no answer, or an answer without a receipt: pay::mark_unknown_releasing (one call) so that
//!      a retry re-sends the same credential
//! ```
//!
//! Not folded yet: the paid path (`pay::settle`, then `finish(Done)`: two calls where x402's
//! `settle_finishing` makes one), left to the MPP flow's own change.
//!
//! Nothing is held before the policy accepted a challenge, and no token is minted before the
//! ledger granted the hold. A token that never left the daemon (the PSP refused to mint it, or
//! the server was never sent it) is voided: nobody else can charge it.

use std::collections::BTreeMap;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::mpp::{
    choose, parse_challenges, parse_receipt, stripe_credential, Choice, MppError, PaymentChallenge, Policy, Receipt,
    SptError, SptIssuer,
};
use adapters::Micros;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::header::{self, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::super::x402::destination::Destinations;
use super::super::x402::upstream::{Answer, Outgoing, Upstream, UpstreamError};
use super::routes::{MppPaymentStatus, MppPaymentView};
use crate::app::Core;
use crate::identity::{AgentAuth, HoldId};
use crate::ledger::{Idempotency, IdempotencyFinish, IdempotencyMode};
use crate::outcome::{Failure, Kind};
use crate::pay::{self, Held, HoldSpec};

/// The daemon stops waiting for a paid answer this long before the token expires.
const SETTLE_MARGIN_MS: u64 = 1_000;
/// A credential is not (re-)sent with less time than this left.
const MIN_SEND_MS: u64 = 1_000;
const LEASE_GRACE_MS: u64 = 15_000;
const REASON_CHARS: usize = 200;

pub struct Engine {
    /// The PSP of the `stripe` method; `None`: `stripe` charges are not paid.
    pub issuer: Option<SptIssuer>,
    pub max_payment: Micros,
    pub max_validity_secs: u64,
    pub timeout: Duration,
    pub upstream: Upstream,
    pub destinations: Destinations,
    pub conformance: ConformanceSink,
    /// `tempo` session channels (`session.rs`); `None`: sessions are not paid.
    pub session: Option<super::session::Sessions>,
}

pub struct FetchRequest {
    pub outgoing: Outgoing,
    pub task: String,
    pub max_amount: Option<Micros>,
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Delivered {
    pub answer: Answer,
    pub payment: Option<MppPaymentView>,
    pub replayed: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Delivered { status: u16, headers: Vec<(String, String)>, body_base64: String, payment: Option<Box<MppPaymentView>> },
    Error { failure: String, code: String, detail: String, extra: Option<Value> },
}

/// The failures a finished purchase stores for its retries.
const STORED_ERRORS: [(&str, Kind); 4] = [
    ("mpp_already_paid", Kind::Conflict),
    ("mpp_credential_expired", Kind::Conflict),
    ("mpp_psp_refused", Kind::Provider),
    ("mpp_psp_unreachable", Kind::Provider),
];

impl Stored {
    fn replay(text: &str) -> Result<Delivered, Failure> {
        match serde_json::from_str(text).map_err(Failure::internal)? {
            Stored::Delivered { status, headers, body_base64, payment } => {
                let body = STANDARD.decode(body_base64).map_err(Failure::internal)?.into();
                let answer = Answer::from_parts(status, headers, body)
                    .ok_or_else(|| Failure::internal(format!("a stored MPP answer has status {status}")))?;
                Ok(Delivered { answer, payment: payment.map(|p| *p), replayed: true })
            }
            Stored::Error { failure, code, detail, extra } => {
                let (code, known) =
                    STORED_ERRORS.iter().find(|(c, _)| *c == code).copied().unwrap_or(("mpp_failed", Kind::Internal));
                let kind = Kind::from_name(&failure).unwrap_or(known);
                let mut extra = extra.unwrap_or_else(|| json!({}));
                if let Value::Object(map) = &mut extra {
                    map.insert("replayed".to_owned(), Value::Bool(true));
                }
                Err(Failure::new(kind, code, detail).with_extra(extra))
            }
        }
    }
}

pub(super) fn error(kind: Kind, code: &'static str, detail: impl Into<String>) -> Failure {
    Failure::new(kind, code, detail)
}

pub(super) fn clip(text: &str) -> String {
    match text.char_indices().nth(REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(super) fn refused_402(err: &MppError) -> Failure {
    let kind = if err.is_policy() { Kind::Refused } else { Kind::Provider };
    let mut extra = json!({ "upstream_status": 402 });
    if let (MppError::OverMaximum { amount, maximum }, Value::Object(map)) = (err, &mut extra) {
        map.insert("requested_micros".to_owned(), json!(amount));
        map.insert("maximum_micros".to_owned(), json!(maximum));
    }
    error(kind, err.code(), err.to_string()).with_extra(extra)
}

fn unpaid_failure(err: UpstreamError) -> Failure {
    match err {
        UpstreamError::Refused(refused) => error(Kind::Forbidden, "mpp_destination_forbidden", refused.to_string()),
        UpstreamError::NoResponse { timed_out: true, detail } => {
            error(Kind::ProviderTimeout, "mpp_upstream_timeout", detail)
        }
        UpstreamError::NoResponse { timed_out: false, detail } => {
            error(Kind::Provider, "mpp_upstream_unreachable", detail)
        }
        UpstreamError::Body { status, detail, .. } => error(Kind::Provider, "mpp_upstream_body_lost", detail)
            .with_extra(json!({ "upstream_status": status.as_u16() })),
    }
}

pub(super) fn purchase_key(request: &FetchRequest) -> String {
    match &request.idempotency_key {
        Some(key) => format!("mpp:k:{key}"),
        None => {
            let o = &request.outgoing;
            format!(
                "mpp:r:{}",
                sha256_hex(format!("{}\n{}\n{}\n{}", request.task, o.method, o.url, sha256_hex(&o.body)).as_bytes())
            )
        }
    }
}

/// What a purchase key stands for: the request and the price asked (not the challenge id, which
/// a server makes anew for every 402).
fn fingerprint(request: &FetchRequest, choice: &Choice) -> String {
    let o = &request.outgoing;
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &o.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    crate::fingerprint::of(
        "mpp.fetch",
        &json!({
            "request": {
                "method": o.method.as_str(), "url": o.url.as_str(), "headers": headers,
                "body_sha256": sha256_hex(&o.body), "task": request.task,
                "max_amount_micros": request.max_amount.map(Micros::get),
            },
            "payment": {
                "realm": choice.challenge.realm, "method": choice.challenge.method.as_str(),
                "intent": choice.challenge.intent.as_str(), "currency": choice.request.currency,
                "amount": choice.request.amount, "network_id": choice.network_id,
            },
        }),
    )
}

/// Fetches for the agent, paying over MPP when the server asks and the budget and policy allow.
pub async fn fetch(
    core: &Core,
    engine: &Engine,
    agent: &AgentAuth,
    request: FetchRequest,
) -> Result<Delivered, Failure> {
    let host = request.outgoing.url.host_str().unwrap_or_default().to_ascii_lowercase();
    if let Err(refused) = pay::precheck_task(core, agent, adapters::Protocol::Mpp, &host, &request.task).await {
        // A refused agent's open session channels close for what was already vouched.
        if let Some(sessions) = &engine.session {
            sessions.close_all(core, agent, "agent_refused").await;
        }
        return Err(refused);
    }

    let first = engine.upstream.send(&request.outgoing, None, engine.timeout).await.map_err(unpaid_failure)?;
    if !first.asks_payment() {
        return Ok(Delivered { answer: first, payment: None, replayed: false });
    }
    if let Some(sessions) = &engine.session {
        if let Some(paid) = sessions.pay(core, engine, agent, &request, &first).await {
            return paid;
        }
    }
    let now_secs = core.clock.now_ms() / 1000;
    let policy = Policy {
        methods: engine.issuer.iter().map(|_| "stripe".to_owned()).collect(),
        currencies: vec!["usd".to_owned()],
        max_payment: request.max_amount.map_or(engine.max_payment, |max| max.min(engine.max_payment)),
        min_validity_secs: (MIN_SEND_MS + SETTLE_MARGIN_MS) / 1000 + 1,
        default_validity_secs: engine.max_validity_secs,
    };
    let choice = parse_challenges(&first.headers)
        .and_then(|challenges| choose(&challenges, &policy, now_secs))
        .map_err(|err| {
            tracing::info!(agent = %agent.agent, code = err.code(), "mpp: 402 not paid");
            refused_402(&err)
        })?;
    // The token (and so the credential) lives until the challenge expires, at most max_validity.
    let mut choice = choice;
    choice.expires_at_secs = choice.expires_at_secs.min(now_secs + engine.max_validity_secs);

    let mut intent = choice.intent(request.outgoing.url.as_str());
    let challenge_header = adapters::mpp::format_www_authenticate(&choice.challenge)
        .map_err(|err| error(Kind::Provider, "mpp_malformed_challenge", err.to_string()))?;
    intent.details.insert("challenge".to_owned(), challenge_header);
    intent.details.insert("expires_at".to_owned(), choice.expires_at_secs.to_string());
    let key = purchase_key(&request);
    let spec = HoldSpec {
        intent: &intent,
        task: &request.task,
        expires: crate::ledger::HoldExpiry::At(choice.expires_at_secs * 1000),
        idempotency: Some(Idempotency {
            key: key.clone(),
            fingerprint: fingerprint(&request, &choice),
            mode: IdempotencyMode::Pending { lease_ms: engine.timeout.as_millis() as u64 + LEASE_GRACE_MS },
        }),
    };
    let (hold, resumed) = match pay::hold(core, agent, spec).await? {
        Held::Finished(stored) => return Stored::replay(&stored),
        Held::New(grant) => (grant.hold_id, false),
        Held::Resumed(grant) => match resumable(core, agent, &grant.hold_id).await {
            Ok(stored_choice) => {
                choice = stored_choice;
                (grant.hold_id, true)
            }
            Err(err) if STORED_ERRORS.iter().any(|(c, _)| *c == err.code) => {
                return Err(finish_with_error(core, agent, &key, err).await)
            }
            Err(err) => return Err(err),
        },
    };
    let paying = Paying { core, engine, agent, key, choice, hold, resumed, url: &request.outgoing.url };
    paying.pay(&request.outgoing).await
}

/// The challenge the purchase a retry resumes first answered, if its credential can still be sent.
async fn resumable(core: &Core, agent: &AgentAuth, hold: &HoldId) -> Result<Choice, Failure> {
    let info = pay::hold_info(core, agent, hold).await?;
    if info.state == "settled" {
        return Err(error(
            Kind::Conflict,
            "mpp_already_paid",
            "this purchase was paid and settled; it is not paid again",
        )
        .with_extra(json!({ "hold_id": hold.to_string(), "amount_micros": info.amount.get() })));
    }
    let details: BTreeMap<String, String> = serde_json::from_str(&info.details).unwrap_or_default();
    let sendable = info.expires_at_ms >= core.clock.now_ms() + SETTLE_MARGIN_MS + MIN_SEND_MS;
    if (info.state != "open" && info.state != "unknown") || !sendable {
        return Err(error(
            Kind::Conflict,
            "mpp_credential_expired",
            "the credential of this purchase can no longer be sent; nothing new is minted under the same purchase: \
             retry with a new Idempotency-Key to buy again",
        )
        .with_extra(json!({ "hold_id": hold.to_string(), "state": info.state })));
    }
    let challenge: PaymentChallenge = details
        .get("challenge")
        .and_then(|text| adapters::mpp::parse_www_authenticate(text).ok())
        .ok_or_else(|| Failure::internal(format!("hold {hold} lacks its MPP challenge")))?;
    let policy = Policy {
        methods: vec!["stripe".to_owned()],
        currencies: vec!["usd".to_owned()],
        max_payment: info.amount,
        min_validity_secs: 0,
        default_validity_secs: 0,
    };
    let mut choice = choose(&[challenge], &policy, 0).map_err(|err| Failure::internal(err.to_string()))?;
    choice.expires_at_secs =
        details.get("expires_at").and_then(|t| t.parse().ok()).unwrap_or(info.expires_at_ms / 1000);
    Ok(choice)
}

async fn finish_with_error(core: &Core, agent: &AgentAuth, key: &str, err: Failure) -> Failure {
    let stored = Stored::Error {
        failure: err.kind.as_str().to_owned(),
        code: err.code.to_owned(),
        detail: err.detail.clone(),
        extra: err.extra.clone(),
    };
    match serde_json::to_string(&stored) {
        Ok(stored) => finish(core, agent, key, IdempotencyFinish::Done(stored)).await,
        Err(cause) => tracing::error!(error = %cause, "mpp: cannot store a purchase's outcome"),
    }
    err
}

async fn finish(core: &Core, agent: &AgentAuth, key: &str, outcome: IdempotencyFinish) {
    if let Err(err) = pay::finish(core, agent, key, outcome).await {
        tracing::warn!(agent = %agent.agent, code = err.code, "mpp: could not finish the purchase's idempotency key");
    }
}

struct Paying<'a> {
    core: &'a Core,
    engine: &'a Engine,
    agent: &'a AgentAuth,
    key: String,
    choice: Choice,
    hold: HoldId,
    resumed: bool,
    url: &'a reqwest::Url,
}

impl Paying<'_> {
    fn service(&self) -> String {
        self.url.host_str().unwrap_or_default().to_ascii_lowercase()
    }

    fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("challenge_id".to_owned(), self.choice.challenge.id.clone()),
            ("realm".to_owned(), self.choice.challenge.realm.clone()),
            ("method".to_owned(), self.choice.challenge.method.as_str().to_owned()),
            ("intent".to_owned(), self.choice.challenge.intent.as_str().to_owned()),
            ("currency".to_owned(), self.choice.request.currency.clone()),
            ("base_amount".to_owned(), self.choice.request.amount.clone()),
            ("expires_at".to_owned(), self.choice.expires_at_secs.to_string()),
        ])
    }

    fn view(&self, status: MppPaymentStatus) -> MppPaymentView {
        MppPaymentView {
            status,
            hold_id: self.hold.to_string(),
            amount_micros: self.choice.amount.get(),
            method: self.choice.challenge.method.as_str().to_owned(),
            intent: self.choice.challenge.intent.as_str().to_owned(),
            realm: self.choice.challenge.realm.clone(),
            challenge_id: self.choice.challenge.id.clone(),
            currency: self.choice.request.currency.clone(),
            expires_at: self.choice.expires_at_secs,
            reference: None,
            receipt: None,
            reason: None,
        }
    }

    /// The provider idempotency key of this purchase's token: the same on every retry.
    fn spt_key(&self) -> String {
        format!("spendcap-{}:spt", self.hold)
    }

    async fn pay(self, outgoing: &Outgoing) -> Result<Delivered, Failure> {
        let Some(issuer) = &self.engine.issuer else {
            let err = error(Kind::Internal, "mpp_credential_failed", "the stripe method is not configured");
            return Err(self.abandon(err).await);
        };
        let spt = match issuer.mint(&self.choice.spt_request(), &self.spt_key()).await {
            Ok(spt) => spt,
            Err(err) => {
                let (code, detail) = match &err {
                    SptError::NoAnswer(_) => ("mpp_psp_unreachable", err.to_string()),
                    SptError::Refused { .. } => ("mpp_psp_refused", err.to_string()),
                };
                return Err(self.abandon(error(Kind::Provider, code, clip(&detail))).await);
            }
        };
        let credential = match stripe_credential(&self.choice, &spt, &self.engine.conformance) {
            Ok(credential) => credential,
            Err(err) => {
                return Err(self.abandon(error(Kind::Internal, "mpp_credential_failed", err.to_string())).await)
            }
        };
        let Ok(value) = HeaderValue::from_str(&credential) else {
            return Err(self.abandon(error(Kind::Internal, "mpp_credential_failed", "not a header value")).await);
        };
        let now_ms = self.core.clock.now_ms();
        let wait_ms = (self.choice.expires_at_secs * 1000).saturating_sub(now_ms + SETTLE_MARGIN_MS);
        if wait_ms < MIN_SEND_MS {
            let err = error(
                Kind::Conflict,
                "mpp_credential_expired",
                "the credential of this purchase expires too soon to be sent again",
            );
            return Err(finish_with_error(self.core, self.agent, &self.key, err).await);
        }
        // The credential replaces any Authorization of the agent's own.
        let mut outgoing = outgoing.clone();
        outgoing.headers.remove(header::AUTHORIZATION);
        let payment: (HeaderName, HeaderValue) = (header::AUTHORIZATION, value);
        let timeout = self.engine.timeout.min(Duration::from_millis(wait_ms));
        tracing::info!(agent = %self.agent.agent, service = %self.service(), challenge = %self.choice.challenge.id,
            method = self.choice.challenge.method.as_str(), amount = self.choice.amount.get(), resumed = self.resumed,
            "mpp: sending credential");
        match self.engine.upstream.send(&outgoing, Some(&payment), timeout).await {
            Ok(answer) => self.answered(answer).await,
            Err(UpstreamError::Body { status, headers, detail, .. }) => match parse_receipt(&headers) {
                Ok(Some(receipt)) if receipt.is_success() => {
                    let delivered = self.settled(Answer { status, headers, body: Default::default() }, receipt).await;
                    let err = error(Kind::Provider, "mpp_upstream_body_lost", detail)
                        .with_extra(json!({ "upstream_status": status.as_u16(), "payment": delivered.payment }));
                    Err(finish_with_error(self.core, self.agent, &self.key, err).await)
                }
                _ => Err(self.unknown(format!("HTTP {status}, then {detail}"), false).await),
            },
            Err(UpstreamError::NoResponse { timed_out, detail }) => Err(self.unknown(detail, timed_out).await),
            Err(UpstreamError::Refused(refused)) => Err(self.unknown(refused.to_string(), false).await),
        }
    }

    /// Gives up before the credential was sent: nobody but the daemon has the token, so a new
    /// purchase's hold is voided (a resumed one keeps its hold: its credential did leave).
    async fn abandon(&self, err: Failure) -> Failure {
        if !self.resumed {
            // The void stores the error for the purchase's retries in the same ledger call.
            let stored = serde_json::to_string(&Stored::Error {
                failure: err.kind.as_str().to_owned(),
                code: err.code.to_owned(),
                detail: err.detail.clone(),
                extra: err.extra.clone(),
            })
            .unwrap_or_default();
            match pay::void_finishing(self.core, self.agent, &self.hold, err.code, &self.key, &stored).await {
                Ok((_, true)) => {
                    tracing::warn!(agent = %self.agent.agent, code = err.code, "mpp: credential not sent");
                    return err;
                }
                Ok((_, false)) => {}
                Err(void_err) => {
                    tracing::warn!(hold = %self.hold, code = void_err.code, "mpp: could not void an unsent payment's hold")
                }
            }
        }
        tracing::warn!(agent = %self.agent.agent, code = err.code, "mpp: credential not sent");
        finish_with_error(self.core, self.agent, &self.key, err).await
    }

    /// Marks the hold `unknown` and, in the same ledger call, releases the purchase's key so that
    /// a retry re-sends the same credential; if that did not happen, releases it with one more.
    async fn mark_unknown(&self, detail: &str) {
        let reason = format!("mpp_outcome_unknown: {}", clip(detail));
        match pay::mark_unknown_releasing(self.core, &self.hold, &reason, Some(&self.key)).await {
            Ok((_, true)) => return,
            Ok((_, false)) => {}
            Err(err) => {
                tracing::error!(hold = %self.hold, code = err.code, "mpp: could not mark a payment's outcome unknown")
            }
        }
        finish(self.core, self.agent, &self.key, IdempotencyFinish::Release).await;
    }

    async fn unknown(&self, detail: String, timed_out: bool) -> Failure {
        tracing::warn!(agent = %self.agent.agent, service = %self.service(), detail = %clip(&detail),
            "mpp: payment outcome unknown; the hold stays counted until resolved");
        self.mark_unknown(&detail).await;
        let kind = if timed_out { Kind::ProviderTimeout } else { Kind::Provider };
        error(
            kind,
            "mpp_payment_outcome_unknown",
            format!(
                "the credential was sent but no answer came back ({}); money may have moved, so the amount stays \
                 held until the outcome is known: retry the same request to re-send the same credential",
                clip(&detail)
            ),
        )
        .with_extra(json!({ "hold_id": self.hold.to_string(), "amount_micros": self.choice.amount.get(),
            "expires_at": self.choice.expires_at_secs }))
    }

    async fn answered(&self, answer: Answer) -> Result<Delivered, Failure> {
        match parse_receipt(&answer.headers) {
            Ok(Some(receipt)) if receipt.is_success() => {
                let delivered = self.settled(answer, receipt).await;
                let stored = Stored::Delivered {
                    status: delivered.answer.status.as_u16(),
                    headers: delivered
                        .answer
                        .headers
                        .iter()
                        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                        .collect(),
                    body_base64: STANDARD.encode(&delivered.answer.body),
                    payment: delivered.payment.clone().map(Box::new),
                };
                match serde_json::to_string(&stored) {
                    Ok(stored) => finish(self.core, self.agent, &self.key, IdempotencyFinish::Done(stored)).await,
                    Err(err) => tracing::error!(error = %err, "mpp: cannot store a purchase's outcome"),
                }
                Ok(delivered)
            }
            _ if answer.asks_payment() => Err(self.rejected(&answer).await),
            outcome => {
                // An answer without a receipt: the server may have charged the token. Unknown.
                let reason = match outcome {
                    Err(err) => err.to_string(),
                    _ => "no Payment-Receipt".to_owned(),
                };
                let detail = format!("HTTP {} without a usable receipt ({reason})", answer.status.as_u16());
                self.mark_unknown(&detail).await;
                let mut view = self.view(MppPaymentStatus::Unconfirmed);
                view.reason = Some(clip(&reason));
                Ok(Delivered { answer, payment: Some(view), replayed: false })
            }
        }
    }

    /// The server answered the credential with a new 402: it refused it. The token stays
    /// chargeable until it expires, so the hold stays until then (the ledger releases it); a
    /// retry re-sends the same credential.
    async fn rejected(&self, answer: &Answer) -> Failure {
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        let mut details = self.details();
        details.insert("upstream_status".to_owned(), answer.status.as_u16().to_string());
        details.insert("upstream_body".to_owned(), clip(&body));
        // The note releases the purchase's key in the same ledger call (a retry re-sends the
        // same credential); if it did not, one more call does.
        match pay::note_releasing(self.core, self.agent, &self.hold, "mpp_payment_rejected", &details, &self.key).await
        {
            Ok(true) => {}
            Ok(false) => finish(self.core, self.agent, &self.key, IdempotencyFinish::Release).await,
            Err(err) => {
                tracing::warn!(hold = %self.hold, code = err.code, "mpp: could not log a note");
                finish(self.core, self.agent, &self.key, IdempotencyFinish::Release).await;
            }
        }
        error(Kind::Refused, "mpp_payment_rejected", format!("the server refused the credential: {}", clip(&body)))
            .with_extra(json!({
                "hold_id": self.hold.to_string(),
                "amount_micros": self.choice.amount.get(),
                "held_until_ms": self.choice.expires_at_secs * 1000,
                "upstream_status": answer.status.as_u16(),
            }))
    }

    async fn settled(&self, answer: Answer, receipt: Receipt) -> Delivered {
        let mut details = self.details();
        details.insert("reference".to_owned(), clip(&receipt.reference));
        details.insert("receipt_method".to_owned(), clip(receipt.method.as_str()));
        let mut view = self.view(MppPaymentStatus::Settled);
        view.reference = Some(clip(&receipt.reference));
        // A receipt that reports what was charged settles that, when it is within the hold; one
        // above it is an incident: the hold is settled in full and the excess reported.
        let amount = match adapters::mpp::receipt_amount(&receipt, &self.choice) {
            Some(reported) if reported <= self.choice.amount => {
                details.insert("reported_amount_micros".to_owned(), reported.get().to_string());
                reported
            }
            Some(reported) => {
                tracing::error!(agent = %self.agent.agent, hold = %self.hold, reported = reported.get(),
                    held = self.choice.amount.get(), "mpp: the receipt reports more than was held; settling the hold");
                details.insert("reported_amount_micros".to_owned(), reported.get().to_string());
                self.choice.amount
            }
            None => self.choice.amount,
        };
        view.amount_micros = amount.get();
        match pay::settle(self.core, self.agent, &self.hold, amount, &details).await {
            Ok(settled) => {
                tracing::info!(agent = %self.agent.agent, service = %self.service(), hold = %self.hold,
                    reference = %clip(&receipt.reference), amount = settled.outcome.amount.get(), "mpp: paid");
                view.receipt = Some(settled.receipt);
            }
            Err(err) => {
                tracing::error!(agent = %self.agent.agent, hold = %self.hold, code = err.code,
                    reference = %clip(&receipt.reference), "mpp: paid upstream but the ledger did not record the settlement");
                view.reason = Some(err.code.to_owned());
            }
        }
        Delivered { answer, payment: Some(view), replayed: false }
    }
}
