//! MPP `session` over the `tempo` method: a payment channel paid one request at a time.
//!
//! ```text
//! 402 with a tempo/session challenge the policy accepts
//!   no open channel for (agent, realm, payee, token, escrow, chain):
//!     pay::hold(deposit) ─▶ open: the deposit + the first voucher (cumulative = price)
//!   an open channel: the next voucher (cumulative = last + price); a channel whose deposit
//!     cannot cover it is closed first and a new one opened
//!   ─▶ Payment-Receipt: pay::settle_part(cumulative − settled so far), the hold stays open
//!   ─▶ 402 again: the voucher left the daemon, it stays counted in the hold
//!   ─▶ no answer / no receipt: pay::mark_unknown (the hold never lapses until resolved)
//! close (deposit exhausted, the agent refused by the precheck, the channel's time up):
//!   pay::settle(everything vouched and not yet settled): one signed receipt, the rest released
//! ```
//!
//! The whole deposit is held from the start, so a session never takes an agent past its cap;
//! a voucher is signed only inside a granted hold. A retry of a purchase (same idempotency key,
//! or the same request) re-sends the voucher it was paid with (signing is deterministic), and
//! the ledger's increment is idempotent by its running total, so it is settled once.
//!
//! A channel lives in the daemon instance that opened it (its deposit hold is in the ledger, so
//! the money is safe whatever happens to the instance: the hold is released at its expiry, or
//! stays counted when an outcome was unknown). Another instance opens its own channel.

use std::collections::{BTreeMap, HashMap};

use adapters::mpp::session::{
    accepted_cumulative, choose_session, session_credential, Action, Channel, SessionChoice, SessionPolicy, PATH_USD,
    TEMPO_CHAIN_ID,
};
use adapters::mpp::{parse_challenges, parse_receipt, MppError};
use adapters::x402::{Address, EvmSigner};
use adapters::Micros;
use reqwest::header::{self, HeaderName, HeaderValue};
use serde_json::json;

use super::flow::{clip, error, purchase_key, refused_402, Delivered, Engine, FetchRequest};
use super::routes::{MppPaymentStatus, MppPaymentView};
use crate::app::Core;
use crate::identity::{AgentAuth, HoldId};
use crate::ledger::HoldExpiry;
use crate::outcome::{Failure, Kind};
use crate::pay::{self, Held, HoldSpec};

use super::super::x402::upstream::{Answer, UpstreamError};

/// Tempo's testnet, paid like the main chain (the token list decides what is money).
const TEMPO_TESTNET_CHAIN_ID: u64 = 42_431;
/// A deposit, when the challenge suggests none, covers this many requests.
const DEFAULT_UNITS: u64 = 10;
/// A channel is closed (and a new one opened) this long before its hold would lapse.
const CLOSE_MARGIN_MS: u64 = 60_000;

/// The open session channels of this daemon instance and the key that signs for them.
pub struct Sessions {
    signer: EvmSigner,
    max_deposit: Micros,
    ttl_ms: u64,
    /// One lock for every channel: a channel's vouchers must go out in order, and a close and
    /// a voucher of the same channel must not cross.
    channels: tokio::sync::Mutex<HashMap<ChannelKey, OpenChannel>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ChannelKey {
    agent: String,
    realm: String,
    payee: Address,
    token: Address,
    escrow: Address,
    chain_id: u64,
}

struct OpenChannel {
    channel: Channel,
    hold: HoldId,
    /// When the ledger releases the deposit if nothing closes the channel (the daemon's clock).
    expires_at_ms: u64,
    /// The highest cumulative amount signed (base units = micro-USD).
    vouched: u128,
    /// What the ledger has settled of the deposit.
    settled: u128,
    vouchers: u64,
    /// Purchase key → the credential it was paid with (action, cumulative amount).
    purchases: HashMap<String, (Action, u128)>,
}

fn micros(amount: u128) -> Micros {
    // Every cumulative amount is bounded by the deposit, a Micros.
    Micros::new(u64::try_from(amount).unwrap_or(u64::MAX)).unwrap_or(Micros::MAX)
}

impl Sessions {
    pub fn new(signer: EvmSigner, max_deposit: Micros, ttl_secs: u64) -> Sessions {
        Sessions { signer, max_deposit, ttl_ms: ttl_secs * 1000, channels: Default::default() }
    }

    /// Pays a 402 with a `tempo` `session` challenge, if it has one this daemon may pay.
    /// `None`: the 402 is not a session's (or it offers a `charge` too): the charge flow goes on.
    pub async fn pay(
        &self,
        core: &Core,
        engine: &Engine,
        agent: &AgentAuth,
        request: &FetchRequest,
        first: &Answer,
    ) -> Option<Result<Delivered, Failure>> {
        let challenges = parse_challenges(&first.headers).ok()?;
        if !challenges.iter().any(|c| c.intent.as_str() == "session") {
            return None;
        }
        let policy = SessionPolicy {
            tokens: PATH_USD.parse().into_iter().collect(),
            chain_ids: vec![TEMPO_CHAIN_ID, TEMPO_TESTNET_CHAIN_ID],
            max_payment: request.max_amount.map_or(engine.max_payment, |max| max.min(engine.max_payment)),
            max_deposit: self.max_deposit,
            default_units: DEFAULT_UNITS,
        };
        let choice = match choose_session(&challenges, &policy) {
            Ok(choice) => choice,
            Err(_) if challenges.iter().any(|c| c.intent.is_charge()) => return None,
            Err(err) => {
                tracing::info!(agent = %agent.agent, code = err.code(), "mpp: session 402 not paid");
                return Some(Err(refused_402(&err)));
            }
        };
        Some(self.pay_choice(core, engine, agent, request, choice).await)
    }

    async fn pay_choice(
        &self,
        core: &Core,
        engine: &Engine,
        agent: &AgentAuth,
        request: &FetchRequest,
        choice: SessionChoice,
    ) -> Result<Delivered, Failure> {
        let key = purchase_key(request);
        let channel_key = ChannelKey {
            agent: agent.agent.to_string(),
            realm: choice.challenge.realm.clone(),
            payee: choice.payee,
            token: choice.token,
            escrow: choice.escrow,
            chain_id: choice.chain_id,
        };
        let price = u128::from(choice.price.get());
        let mut channels = self.channels.lock().await;
        let retry = channels.get(&channel_key).and_then(|open| open.purchases.get(&key).copied());
        let (action, cumulative) = match retry {
            Some(paid) => paid,
            None => {
                let stale = channels.get(&channel_key).is_some_and(|open| {
                    open.vouched + price > open.channel.deposit
                        || open.expires_at_ms <= core.clock.now_ms() + CLOSE_MARGIN_MS
                });
                if stale {
                    if let Some(open) = channels.remove(&channel_key) {
                        self.close(core, agent, open, "channel_spent").await;
                    }
                }
                match channels.get_mut(&channel_key) {
                    Some(open) => {
                        open.vouched += price;
                        open.vouchers += 1;
                        open.purchases.insert(key.clone(), (Action::Voucher, open.vouched));
                        (Action::Voucher, open.vouched)
                    }
                    None => {
                        let open = self.open(core, agent, request, &choice, &key).await?;
                        channels.insert(channel_key.clone(), open);
                        (Action::Open, price)
                    }
                }
            }
        };
        let Some(open) = channels.get_mut(&channel_key) else {
            return Err(Failure::internal("a session channel vanished under its lock"));
        };
        let credential = open
            .channel
            .payload(action, cumulative, &self.signer)
            .and_then(|payload| session_credential(&choice.challenge, &payload, &engine.conformance))
            .map_err(|err: MppError| error(Kind::Internal, "mpp_credential_failed", err.to_string()))?;
        let value = HeaderValue::from_str(&credential)
            .map_err(|_| error(Kind::Internal, "mpp_credential_failed", "not a header value"))?;
        let mut outgoing = request.outgoing.clone();
        outgoing.headers.remove(header::AUTHORIZATION);
        let payment: (HeaderName, HeaderValue) = (header::AUTHORIZATION, value);
        tracing::info!(agent = %agent.agent, hold = %open.hold, channel = %open.channel.id, cumulative = %cumulative,
            retry = retry.is_some(), "mpp: sending a session voucher");
        let sent = engine.upstream.send(&outgoing, Some(&payment), engine.timeout).await;
        let paid = Paid { core, agent, choice: &choice, cumulative, replayed: retry.is_some() };
        match sent {
            Ok(answer) => match parse_receipt(&answer.headers) {
                Ok(Some(receipt)) if receipt.is_success() => {
                    let reference = clip(&receipt.reference);
                    if accepted_cumulative(&receipt).is_some_and(|accepted| accepted < cumulative) {
                        tracing::warn!(hold = %open.hold, cumulative = %cumulative,
                            "mpp: the session receipt reports less than the voucher; the voucher stands");
                    }
                    paid.settled(open, answer, reference).await
                }
                _ if answer.asks_payment() => Err(paid.rejected(open, &answer).await),
                _ => {
                    paid.unknown(open, "no Payment-Receipt").await;
                    let mut view = paid.view(open, MppPaymentStatus::Unconfirmed);
                    view.reason = Some(format!("HTTP {} without a usable receipt", answer.status.as_u16()));
                    Ok(Delivered { answer, payment: Some(view), replayed: false })
                }
            },
            Err(UpstreamError::Body { status, detail, .. }) => {
                Err(paid.unknown(open, &format!("HTTP {status}, then {detail}")).await)
            }
            Err(UpstreamError::NoResponse { detail, .. }) => Err(paid.unknown(open, &detail).await),
            Err(UpstreamError::Refused(refused)) => Err(paid.unknown(open, &refused.to_string()).await),
        }
    }

    /// Holds a new channel's deposit; nothing is signed unless the ledger grants it.
    async fn open(
        &self,
        core: &Core,
        agent: &AgentAuth,
        request: &FetchRequest,
        choice: &SessionChoice,
        key: &str,
    ) -> Result<OpenChannel, Failure> {
        let intent = choice.intent(request.outgoing.url.as_str());
        let spec = HoldSpec {
            intent: &intent,
            task: &request.task,
            expires: HoldExpiry::After(self.ttl_ms),
            idempotency: None,
        };
        let grant = match pay::hold(core, agent, spec).await? {
            Held::New(grant) | Held::Resumed(grant) => grant,
            Held::Finished(_) => return Err(Failure::internal("a session deposit without a key was replayed")),
        };
        let channel = Channel::open(choice, &self.signer, rand::random());
        tracing::info!(agent = %agent.agent, hold = %grant.hold_id, channel = %channel.id,
            deposit = choice.deposit.get(), "mpp: session channel opened");
        Ok(OpenChannel {
            channel,
            hold: grant.hold_id,
            expires_at_ms: core.clock.now_ms() + self.ttl_ms,
            vouched: u128::from(choice.price.get()),
            settled: 0,
            vouchers: 1,
            purchases: HashMap::from([(key.to_owned(), (Action::Open, u128::from(choice.price.get())))]),
        })
    }

    /// Closes a channel for what was vouched: settles every voucher not settled yet (accepted,
    /// refused or unanswered: the server holds them all) and releases the rest of the deposit,
    /// with one signed receipt that states the session's totals.
    async fn close(&self, core: &Core, agent: &AgentAuth, open: OpenChannel, reason: &str) {
        let rest = open.vouched.saturating_sub(open.settled);
        let details = BTreeMap::from([
            ("channel_id".to_owned(), open.channel.id.to_string()),
            ("session_vouched_micros".to_owned(), open.vouched.to_string()),
            ("vouchers".to_owned(), open.vouchers.to_string()),
            ("close_reason".to_owned(), reason.to_owned()),
        ]);
        match pay::settle(core, agent, &open.hold, micros(rest), &details).await {
            Ok(settled) => tracing::info!(agent = %agent.agent, hold = %open.hold, vouched = %open.vouched,
                released = settled.outcome.released.get(), reason, "mpp: session channel closed"),
            Err(err) => tracing::error!(agent = %agent.agent, hold = %open.hold, code = err.code,
                "mpp: could not close a session channel in the ledger"),
        }
    }

    /// Closes every open channel of `agent` (it was refused: revoked, suspended, expired).
    /// Nothing is sent to the servers: each holds the highest voucher it accepted.
    pub async fn close_all(&self, core: &Core, agent: &AgentAuth, reason: &str) {
        let mut channels = self.channels.lock().await;
        let keys: Vec<ChannelKey> = channels.keys().filter(|key| key.agent == agent.agent.as_str()).cloned().collect();
        for key in keys {
            if let Some(open) = channels.remove(&key) {
                self.close(core, agent, open, reason).await;
            }
        }
    }
}

/// One voucher sent, and what to do with its answer.
struct Paid<'a> {
    core: &'a Core,
    agent: &'a AgentAuth,
    choice: &'a SessionChoice,
    cumulative: u128,
    replayed: bool,
}

impl Paid<'_> {
    fn view(&self, open: &OpenChannel, status: MppPaymentStatus) -> MppPaymentView {
        MppPaymentView {
            status,
            hold_id: open.hold.to_string(),
            amount_micros: self.choice.price.get(),
            method: self.choice.challenge.method.as_str().to_owned(),
            intent: self.choice.challenge.intent.as_str().to_owned(),
            realm: self.choice.challenge.realm.clone(),
            challenge_id: self.choice.challenge.id.clone(),
            currency: self.choice.token.to_string(),
            expires_at: open.expires_at_ms / 1000,
            reference: Some(open.channel.id.to_string()),
            receipt: None,
            reason: None,
        }
    }

    fn details(&self, open: &OpenChannel) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("channel_id".to_owned(), open.channel.id.to_string()),
            ("cumulative".to_owned(), self.cumulative.to_string()),
            ("challenge_id".to_owned(), self.choice.challenge.id.clone()),
        ])
    }

    /// The server accepted the voucher: its increment is settled, the deposit's rest stays held.
    async fn settled(&self, open: &mut OpenChannel, answer: Answer, reference: String) -> Result<Delivered, Failure> {
        let mut view = self.view(open, MppPaymentStatus::Settled);
        view.reference = Some(reference);
        if self.cumulative > open.settled {
            let increment = micros(self.cumulative - open.settled);
            match pay::settle_part(
                self.core,
                self.agent,
                &open.hold,
                increment,
                micros(self.cumulative),
                &self.details(open),
            )
            .await
            {
                Ok(_) => open.settled = self.cumulative,
                Err(err) => {
                    tracing::error!(agent = %self.agent.agent, hold = %open.hold, code = err.code,
                        "mpp: a voucher was accepted but the ledger did not record it");
                    view.reason = Some(err.code.to_owned());
                }
            }
        }
        Ok(Delivered { answer, payment: Some(view), replayed: self.replayed })
    }

    /// The server answered the voucher with a new 402. The voucher left the daemon, so it stays
    /// counted in the deposit's hold (the channel's close settles it).
    async fn rejected(&self, open: &OpenChannel, answer: &Answer) -> Failure {
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        let mut details = self.details(open);
        details.insert("upstream_body".to_owned(), clip(&body));
        if let Err(err) = pay::note(self.core, self.agent, &open.hold, "mpp_payment_rejected", &details).await {
            tracing::warn!(hold = %open.hold, code = err.code, "mpp: could not log a note");
        }
        error(Kind::Refused, "mpp_payment_rejected", format!("the server refused the voucher: {}", clip(&body)))
            .with_extra(json!({
                "hold_id": open.hold.to_string(),
                "amount_micros": self.choice.price.get(),
                "upstream_status": answer.status.as_u16(),
            }))
    }

    /// No conclusive answer: the voucher may have been accepted. The deposit's hold becomes
    /// `unknown` (it never lapses) and a retry re-sends the same voucher.
    async fn unknown(&self, open: &OpenChannel, detail: &str) -> Failure {
        tracing::warn!(agent = %self.agent.agent, hold = %open.hold, detail = %clip(detail),
            "mpp: session voucher outcome unknown; it stays counted until resolved");
        if let Err(err) =
            pay::mark_unknown(self.core, &open.hold, &format!("mpp_outcome_unknown: {}", clip(detail))).await
        {
            tracing::error!(hold = %open.hold, code = err.code, "mpp: could not mark a payment's outcome unknown");
        }
        error(
            Kind::Provider,
            "mpp_payment_outcome_unknown",
            format!(
                "the voucher was sent but no answer came back ({}); it stays held until the outcome is known: retry \
                 the same request to re-send the same voucher",
                clip(detail)
            ),
        )
        .with_extra(json!({ "hold_id": open.hold.to_string(), "amount_micros": self.choice.price.get() }))
    }
}
