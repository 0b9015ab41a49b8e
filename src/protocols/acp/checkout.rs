//! One ACP purchase: read (or create) the checkout session, hold its total, have the PSP delegate
//! the owner's card for exactly that total, complete the session with the token, and settle on
//! the order — or void, so that nothing is spent, on any decline, error or timeout.
//!
//! Idempotency runs end to end. The agent's `Idempotency-Key` (or, without one, the merchant and
//! session: one purchase per session) keys a `Pending` hold whose fingerprint is the whole request
//! the agent sent; the PSP and merchant keys are derived from the hold id and the step
//! (`<hold>:delegate`, `<hold>:complete`), so a resumed purchase repeats exactly the requests of
//! the first attempt and no provider acts twice. Every hold of a session is also charged against
//! the session's exclusive budget (`acp:<digest of agent, merchant, session>`): whatever keys the
//! agent sends, on whatever instance, one purchase of a session is outstanding at a time.
//!
//! Money follows what the merchant did. A completed order is always settled, at the total it was
//! completed at when that is within the hold, else at the hold with an incident. A completion
//! whose outcome is unknown (timeout, lost answer) is never voided blindly: the session is read
//! back, settled if the merchant completed it, voided if it is canceled or expired, and otherwise
//! canceled at the merchant (with a key of its own) before the hold is voided. When even that
//! gets no answer, the hold is marked `unknown` — it stays counted and never expires — and the
//! daemon keeps reading the session back in the background ([`ResolvePolicy`]); a retry with
//! the same key, a cancel or an admin can resolve it too.
//!
//! The call that ends the hold also ends the purchase's key: the settle and the void store the
//! answer for retries (`pay::settle_finishing`, `pay::void_finishing`), marking it `unknown`
//! releases the key (`pay::mark_unknown_releasing`). A separate `pay::finish` is left for a
//! resumed purchase whose session cannot be read back (no ledger call ends anything), a void the
//! ledger did not take, and the fallbacks when the folded call did not touch the record.
//!
//! [`ResolvePolicy`]: super::ResolvePolicy

use std::collections::BTreeMap;
use std::sync::Arc;

use adapters::acp::{
    completed_order, pick_delegate_handler, require_ready, session_total, AcpError, Buyer, CancelReason,
    CancelSessionRequest, CheckoutSession, CheckoutSessionCompleteRequest, CheckoutSessionCreateRequest,
    DelegatePaymentRequest, Delegation, FulfillmentDetails, IdempotencyKey, Item, MerchantClient, Provider, RiskSignal,
    SessionStatus, SessionTotal,
};
use adapters::{Micros, Protocol};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::reply::{acp_error, describe, reply_ok, with_fields, Reply};
use super::{Acp, ResolvePolicy};
use crate::app::Core;
use crate::identity::{AgentAuth, HoldId};
use crate::ledger::{Grant, HoldInfo, Idempotency, IdempotencyFinish, IdempotencyMode, LedgerError};
use crate::outcome::{label, Failure, Kind};
use crate::pay::{self, Held, HoldSpec};
use crate::receipt::Receipt;

/// `POST /v1/acp/checkouts`: pay an existing session, or create one from items and pay it.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// A merchant's name from the ACP configuration.
    pub merchant: String,
    /// The session to pay; or give `items`.
    #[serde(default)]
    pub checkout_session_id: Option<String>,
    /// Items to create a session with (1 to 100, by the merchant's ids).
    #[serde(default)]
    pub items: Option<Vec<ItemRequest>>,
    /// The currency of a session created from items (default `usd`).
    #[serde(default)]
    pub currency: Option<String>,
    /// Buyer contact for a session created from items.
    #[serde(default)]
    pub buyer: Option<Buyer>,
    /// Where a session created from items is delivered.
    #[serde(default)]
    pub fulfillment_details: Option<FulfillmentDetails>,
    /// The agent's task label, for attribution.
    #[serde(default)]
    pub task: String,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/acp/checkouts/{checkout_session_id}/cancel`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub merchant: String,
    /// The hold of a purchase left open (an `acp_outcome_unknown` answer names it): voided once
    /// the merchant confirms the cancellation.
    #[serde(default)]
    pub hold_id: Option<String>,
}

/// The answer to a completed purchase.
#[derive(Serialize)]
struct Completed<'a> {
    status: &'static str,
    merchant: &'a str,
    checkout_session_id: &'a str,
    order: OrderView<'a>,
    /// The total the order was completed at.
    total: TotalView<'a>,
    /// Present when the merchant completed at another total than the one read and held.
    #[serde(skip_serializing_if = "Option::is_none")]
    total_changed: Option<TotalChanged>,
    amount_micros: u64,
    hold_id: &'a str,
    replayed: bool,
    receipt: Receipt,
}

/// The total read (and held) and the total the merchant completed at, in its minor units.
#[derive(Serialize)]
struct TotalChanged {
    read: u64,
    completed: u64,
}

#[derive(Serialize)]
struct OrderView<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    permalink_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_number: Option<&'a str>,
}

/// The session total in the merchant's minor units.
#[derive(Serialize)]
struct TotalView<'a> {
    amount: u64,
    currency: &'a str,
}

/// The answer to a cancellation.
#[derive(Serialize)]
struct Canceled<'a> {
    status: &'static str,
    merchant: &'a str,
    checkout_session_id: &'a str,
    hold_id: Option<String>,
    /// The session's status at the merchant: `canceled` or `expired`.
    session_status: String,
    released_micros: u64,
}

/// How a purchase that got its hold ended.
enum Outcome {
    /// Finished (paid, or voided with nothing spent): the answer, for this request and duplicates.
    Done(Reply),
    /// The hold stays open (the ledger failed): a retry with the same key resumes the purchase.
    Open(Failure),
    /// The merchant may have taken the payment: the hold is marked `unknown` (counted, never
    /// expiring) until a read-back, a retry, a cancel or an admin resolves it.
    Unknown(Failure),
}

/// What reading the session back (and, if it is still payable, canceling it) told.
enum Learned {
    /// The merchant completed it: settle.
    Completed(Box<CheckoutSession>),
    /// Canceled or expired at the merchant (the status): nothing was charged, void.
    Ended(String),
    /// Still nothing certain.
    Unknown,
}

impl Acp {
    fn merchant(&self, name: &str) -> Result<&MerchantClient, Failure> {
        self.merchants.get(name).ok_or_else(|| {
            Failure::new(
                Kind::Invalid,
                "acp_unknown_merchant",
                format!("no merchant {:?} is configured", name.chars().take(64).collect::<String>()),
            )
        })
    }
}

/// Checks the agent's token against the ledger before any merchant is called.
async fn verify_token(core: &Core, auth: &AgentAuth) -> Result<(), Failure> {
    core.ledger.balance(core.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(Failure::agent_scoped)?;
    Ok(())
}

fn sha256_hex(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

fn provider_key(text: String) -> Result<IdempotencyKey, Failure> {
    IdempotencyKey::new(text).map_err(Failure::internal)
}

fn invalid_body(detail: &str) -> Failure {
    Failure::new(Kind::Invalid, "invalid_body", detail)
}

/// The session to pay: read, or created from the items. A retried creation (same agent key)
/// sends the same `Idempotency-Key`, so the merchant answers with the same session.
async fn read_session(
    merchant: &MerchantClient,
    merchant_name: &str,
    auth: &AgentAuth,
    agent_key: Option<&str>,
    body: &CheckoutRequest,
) -> Result<CheckoutSession, Failure> {
    let for_creation = body.currency.is_some() || body.buyer.is_some() || body.fulfillment_details.is_some();
    let session = match (&body.checkout_session_id, &body.items) {
        (Some(id), None) if !for_creation => merchant.retrieve_session(id).await,
        (None, Some(items)) if (1..=100).contains(&items.len()) => {
            let items = items.iter().map(|item| Item { id: item.id.clone(), name: item.name.clone() }).collect();
            let mut request = CheckoutSessionCreateRequest::new(items, body.currency.as_deref().unwrap_or("usd"));
            request.buyer = body.buyer.clone();
            request.fulfillment_details = body.fulfillment_details.clone();
            let key = match agent_key {
                Some(key) => format!("create_{}", &sha256_hex(&[auth.agent.as_str(), merchant_name, key])[..48]),
                None => format!("create_{:032x}", rand::random::<u128>()),
            };
            merchant.create_session(&request, &provider_key(key)?).await.and_then(|session| {
                // The id names the session in every later request and in the purchase's key.
                let plain = session.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if plain && (1..=255).contains(&session.id.len()) {
                    return Ok(session);
                }
                Err(AcpError::MalformedResponse {
                    provider: Provider::Merchant,
                    http_status: 201,
                    reason: "the created session's id is not 1 to 255 letters, digits, '_' or '-'".into(),
                })
            })
        }
        (Some(_), None) => return Err(invalid_body("currency, buyer and fulfillment_details go with items only")),
        _ => return Err(invalid_body("give either checkout_session_id or items (1 to 100)")),
    };
    session.map_err(|error| {
        tracing::info!(agent = %auth.agent, merchant = merchant_name, code = error.code(), detail = %describe(&error),
            "ACP checkout session unavailable");
        let error_view = acp_error(&error);
        match &body.checkout_session_id {
            Some(id) if !matches!(error, AcpError::InvalidInput { .. }) => {
                with_fields(error_view, json!({ "checkout_session_id": id }))
            }
            _ => error_view,
        }
    })
}

/// `POST /v1/acp/checkouts`.
pub(super) async fn checkout(
    core: &Arc<Core>,
    acp: &Arc<Acp>,
    auth: &AgentAuth,
    agent_key: Option<String>,
    body: CheckoutRequest,
) -> Result<Reply, Failure> {
    let merchant = acp.merchant(&body.merchant)?;
    let merchant_name = body.merchant.as_str();
    // Checked here as well as by the hold, so that a bad label creates no session at the merchant.
    label("task", &body.task, 128)?;
    // Nothing reaches the merchant for an agent that is revoked, suspended, expired or may not
    // pay this merchant over ACP (the refusal is logged like a refused hold). The amount is not
    // known yet; the hold decides about it.
    pay::precheck_task(core, auth, Protocol::Acp, merchant_name, &body.task).await?;
    // The agent's key stands for the whole request it sent; another request under it is refused
    // before anyone is called (the hold decides again, atomically).
    let keyed = agent_key.as_ref().map(|key| (format!("acp:{key}"), crate::fingerprint::of("acp.checkout", &body)));
    if let Some((key, fingerprint)) = &keyed {
        let first = core.ledger.idempotency_fingerprint(core.clock.now_ms(), &auth.agent, key).await;
        if first.map_err(Failure::agent_scoped)?.is_some_and(|first| first != *fingerprint) {
            return Err(Failure::agent_scoped(LedgerError::IdempotencyConflict));
        }
    }
    let mut session = read_session(merchant, merchant_name, auth, agent_key.as_deref(), &body).await?;
    let on_session = |error: Failure, id: &str| with_fields(error, json!({ "checkout_session_id": id }));
    let refuse = |error: AcpError, id: &str| {
        tracing::info!(agent = %auth.agent, merchant = merchant_name, checkout_session_id = %id,
            code = error.code(), detail = %describe(&error), "ACP checkout refused before holding");
        on_session(acp_error(&error), id)
    };

    // Everything that can be checked before holding is: nothing is held for a session that
    // cannot be paid. A completed session goes on to the hold, which tells whether this daemon
    // paid it (a retried purchase whose answer was lost) or someone else did.
    match session.status {
        SessionStatus::ReadyForPayment | SessionStatus::Completed | SessionStatus::CompleteInProgress => {}
        _ => require_ready(&session).map_err(|error| refuse(error, &session.id))?,
    }
    let total = session_total(&session, &acp.currency).map_err(|error| refuse(error, &session.id))?;
    if session.status == SessionStatus::ReadyForPayment {
        pick_delegate_handler(&session, &acp.psp_name).map_err(|error| refuse(error, &session.id))?;
    }
    let intent =
        adapters::acp::intent(&session, merchant_name, &acp.currency).map_err(|error| refuse(error, &session.id))?;

    let (key, fingerprint) = keyed.unwrap_or_else(|| {
        let key = format!("acp:{merchant_name}:{}", session.id);
        (key, sha256_hex(&[merchant_name, &session.id, &total.minor_units.to_string(), &total.currency]))
    });
    let lease = session_lease(core, auth, merchant_name, &session.id).await.map_err(|e| on_session(e, &session.id))?;
    let held = pay::hold_with_budgets(
        core,
        auth,
        HoldSpec {
            intent: &intent,
            task: &body.task,
            expires: crate::ledger::HoldExpiry::At(core.clock.now_ms().saturating_add(acp.hold_ttl_ms)),
            idempotency: Some(Idempotency {
                key: key.clone(),
                fingerprint,
                mode: IdempotencyMode::Pending { lease_ms: acp.lease_ms },
            }),
        },
        vec![lease],
    )
    .await
    .map_err(|error| match error.code {
        "budget_busy" => session_busy(),
        _ => error,
    })
    .map_err(|error| on_session(error, &session.id))?;
    let (grant, resumed) = match held {
        Held::Finished(stored) => return Reply::replay(&stored),
        Held::New(grant) => (grant, false),
        Held::Resumed(grant) => (grant, true),
    };
    tracing::info!(agent = %auth.agent, merchant = merchant_name, checkout_session_id = %session.id,
        hold = %grant.hold_id, amount = grant.amount.get(), resumed, "ACP purchase held");

    let mut total = total;
    if resumed {
        // A resumed purchase pays what its hold was made for, and looks at the session as it is
        // now: a created session's replayed answer may be stale (canceled since, say).
        match pay::hold_info(core, auth, &grant.hold_id).await.map(|info| held_total(&info, &grant)) {
            Ok(Some(held)) => total = held,
            Ok(None) => {}
            Err(error) => return Err(with_fields(error, json!({ "hold_id": grant.hold_id.as_str() }))),
        }
        if body.items.is_some() {
            match merchant.retrieve_session(&session.id).await {
                Ok(fresh) => session = fresh,
                Err(error) => {
                    tracing::warn!(hold = %grant.hold_id, code = error.code(), "could not read a resumed ACP session back");
                    let _ = pay::finish(core, auth, &key, IdempotencyFinish::Release).await;
                    let error = with_fields(acp_error(&error), json!({ "hold_id": grant.hold_id.as_str() }));
                    return Err(on_session(error, &session.id));
                }
            }
        }
    }

    let purchase = Purchase {
        core,
        acp,
        auth,
        merchant_name,
        merchant,
        total,
        grant,
        key: Some(&key),
        finished: Default::default(),
    };
    match purchase.run(&session, resumed).await {
        Outcome::Done(reply) if purchase.finished.load(std::sync::atomic::Ordering::Relaxed) => Ok(reply),
        Outcome::Done(reply) => {
            if let Err(error) = pay::finish(core, auth, &key, IdempotencyFinish::Done(reply.stored())).await {
                // The record stays in flight until its lease ends; a duplicate then resumes the
                // hold and finds the purchase finished (settled or voided), so nothing is lost.
                tracing::warn!(hold = %purchase.grant.hold_id, code = error.code, "could not store the ACP answer");
            }
            Ok(reply)
        }
        Outcome::Open(error) => {
            if let Err(finish_error) = pay::finish(core, auth, &key, IdempotencyFinish::Release).await {
                tracing::warn!(hold = %purchase.grant.hold_id, code = finish_error.code, "could not release the ACP purchase");
            }
            Err(purchase.on_hold(error))
        }
        Outcome::Unknown(error) => {
            let released = purchase.finished.load(std::sync::atomic::Ordering::Relaxed);
            if let Err(finish_error) = match released {
                true => Ok(()),
                false => pay::finish(core, auth, &key, IdempotencyFinish::Release).await,
            } {
                tracing::warn!(hold = %purchase.grant.hold_id, code = finish_error.code, "could not release the ACP purchase");
            }
            let error = purchase.on_hold(error);
            resolve_later(core, acp, acp.resolve, auth, merchant_name, purchase.total, purchase.grant, key);
            Err(error)
        }
    }
}

/// 409 `acp_session_busy`: the session's exclusive budget has an outstanding purchase.
fn session_busy() -> Failure {
    Failure::new(
        Kind::Conflict,
        "acp_session_busy",
        "another purchase of this checkout session is in progress or its outcome is not known yet; retry that \
         purchase's Idempotency-Key, or cancel it",
    )
}

/// The session's exclusive budget: at most one open (or unknown) hold of this agent pays it.
async fn session_lease(
    core: &Core,
    auth: &AgentAuth,
    merchant_name: &str,
    session_id: &str,
) -> Result<String, Failure> {
    let id = format!("acp:{}", &sha256_hex(&[auth.agent.as_str(), merchant_name, session_id])[..40]);
    let label: String = format!("acp {merchant_name} {session_id}").chars().take(200).collect();
    core.ledger
        .create_bucket(core.clock.now_ms(), &auth.agent, &id, Micros::MAX, true, &label, "")
        .await
        .map_err(Failure::agent_scoped)?;
    Ok(id)
}

/// The total a hold was made for, from its details (`None` for a hold without them).
fn held_total(info: &HoldInfo, grant: &Grant) -> Option<SessionTotal> {
    let details: BTreeMap<String, String> = serde_json::from_str(&info.details).ok()?;
    Some(SessionTotal {
        checkout_session_id: details.get("checkout_session_id")?.clone(),
        minor_units: details.get("total_minor_units")?.parse().ok()?,
        currency: details.get("currency")?.clone(),
        amount: grant.amount,
    })
}

/// Reads an unknown purchase back in the background, with backoff, until it is settled or
/// voided; when the reads run out, the hold stays `unknown` (counted) for a retry, a cancel or an
/// admin to resolve.
#[allow(clippy::too_many_arguments)]
fn resolve_later(
    core: &Arc<Core>,
    acp: &Arc<Acp>,
    policy: ResolvePolicy,
    auth: &AgentAuth,
    merchant_name: &str,
    total: SessionTotal,
    grant: Grant,
    key: String,
) {
    if policy.attempts == 0 {
        return;
    }
    let (core, acp) = (core.clone(), acp.clone());
    let auth = auth.clone();
    let merchant_name = merchant_name.to_owned();
    tokio::spawn(async move {
        let Ok(merchant) = acp.merchant(&merchant_name) else { return };
        let purchase = Purchase {
            core: &core,
            acp: &acp,
            auth: &auth,
            merchant_name: &merchant_name,
            merchant,
            total,
            grant,
            key: Some(&key),
            finished: Default::default(),
        };
        let hold = &purchase.grant.hold_id;
        let mut wait = policy.first_wait;
        for attempt in 1..=policy.attempts {
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2).min(policy.max_wait);
            match pay::hold_info(&core, &auth, hold).await {
                Ok(info) if info.state == "unknown" || info.state == "open" => {}
                // Resolved by a retry, a cancel or an admin meanwhile.
                Ok(_) => return,
                Err(_) => continue,
            }
            let outcome = match purchase.learn().await {
                Learned::Completed(session) => purchase.settle_completed(&session).await,
                Learned::Ended(status) => {
                    let error = acp_error(&AcpError::SessionNotReady { status: status.clone(), reason: None });
                    purchase.void("canceled_at_merchant", with_fields(error, json!({ "session_status": status }))).await
                }
                Learned::Unknown => continue,
            };
            if let Outcome::Done(reply) = outcome {
                tracing::info!(agent = %auth.agent, hold = %hold, attempt, failure = ?reply.failure,
                    "ACP outcome resolved by reading the session back");
                let stored = purchase.finished.load(std::sync::atomic::Ordering::Relaxed);
                if let Err(error) = match stored {
                    true => Ok(()),
                    false => pay::finish(&core, &auth, &key, IdempotencyFinish::Done(reply.stored())).await,
                } {
                    tracing::warn!(hold = %hold, code = error.code, "could not store the resolved ACP answer");
                }
                return;
            }
        }
        tracing::warn!(agent = %auth.agent, hold = %hold, attempts = policy.attempts,
            "ACP outcome still unknown after the read-backs; the hold stays counted until a retry, a cancel or an \
             admin resolves it");
    });
}

/// A purchase that holds its money.
struct Purchase<'a> {
    core: &'a Core,
    acp: &'a Acp,
    auth: &'a AgentAuth,
    merchant_name: &'a str,
    merchant: &'a MerchantClient,
    /// The total read and held: the allowance, and what the completed session must show.
    total: SessionTotal,
    grant: Grant,
    /// The purchase's idempotency key, when its answer is kept for retries: the settle stores
    /// it in the same ledger call when it can, and says so in `finished`.
    key: Option<&'a str>,
    finished: std::sync::atomic::AtomicBool,
}

impl Purchase<'_> {
    fn session_id(&self) -> &str {
        &self.total.checkout_session_id
    }

    /// Adds the session and the hold to an error's body.
    fn on_hold(&self, error: Failure) -> Failure {
        with_fields(error, json!({ "checkout_session_id": self.session_id(), "hold_id": self.grant.hold_id.as_str() }))
    }

    /// The provider `Idempotency-Key` of one step of this purchase: the same on every retry.
    fn step_key(&self, step: &str) -> Result<IdempotencyKey, Failure> {
        provider_key(format!("{}:{step}", self.grant.hold_id))
    }

    async fn run(&self, session: &CheckoutSession, resumed: bool) -> Outcome {
        if resumed {
            match pay::hold_info(self.core, self.auth, &self.grant.hold_id).await {
                Err(error) => return Outcome::Open(error),
                Ok(info) if matches!(info.state.as_str(), "open" | "unknown" | "settled") => {}
                Ok(info) => {
                    let error = Failure::new(
                        Kind::Conflict,
                        "acp_purchase_ended",
                        format!(
                            "this purchase's hold was {} before it finished; send a new Idempotency-Key to try again",
                            info.state
                        ),
                    )
                    .with_extra(json!({ "hold_state": info.state }));
                    return Outcome::Done(Reply::error(&self.on_hold(error)));
                }
            }
        }
        match session.status {
            SessionStatus::ReadyForPayment => self.pay(session).await,
            SessionStatus::Completed if resumed => self.settle_completed(session).await,
            SessionStatus::CompleteInProgress if resumed => {
                self.unknown(Failure::new(
                    Kind::ProviderTimeout,
                    "acp_complete_in_progress",
                    "the merchant is still completing the checkout session",
                ))
                .await
            }
            // Canceled or expired (nothing was charged), or completed by another payment.
            _ => {
                let error = AcpError::SessionNotReady { status: session.status.to_string(), reason: None };
                self.void("session_not_ready", acp_error(&error)).await
            }
        }
    }

    async fn pay(&self, session: &CheckoutSession) -> Outcome {
        let handler = match pick_delegate_handler(session, &self.acp.psp_name) {
            Ok(handler) => handler,
            Err(error) => return self.void("no_delegate_handler", acp_error(&error)).await,
        };
        // The session must still be at the total held (a resumed purchase reads it again).
        match session_total(session, &self.acp.currency) {
            Ok(now) if now.minor_units == self.total.minor_units && now.currency == self.total.currency => {}
            Ok(now) => {
                let error = AcpError::TotalChanged {
                    read_minor: self.total.minor_units,
                    read_currency: self.total.currency.clone(),
                    completed_minor: now.minor_units,
                    completed_currency: now.currency,
                };
                return self.void("total_changed", acp_error(&error)).await;
            }
            Err(error) => return self.void("bad_total", acp_error(&error)).await,
        }
        // The allowance is the total read, which is what was held; it can never exceed the hold.
        match self.acp.currency.to_micros(self.total.minor_units, &self.total.currency) {
            Ok(allowed) if allowed <= self.grant.amount => {}
            _ => return self.void("allowance_exceeds_hold", Failure::internal("ACP allowance exceeds the hold")).await,
        }
        let metadata = BTreeMap::from([
            ("agent_id".to_owned(), self.auth.agent.to_string()),
            ("hold_id".to_owned(), self.grant.hold_id.to_string()),
            ("merchant".to_owned(), self.merchant_name.to_owned()),
        ]);
        let request = DelegatePaymentRequest::for_session(Delegation {
            card: &self.acp.card,
            billing_address: self.acp.billing_address.as_ref(),
            total: &self.total,
            handler,
            expires_at_ms: self.grant.expires_at_ms,
            risk_signals: vec![RiskSignal::cap_authorized()],
            metadata,
        });
        let request = match request {
            Ok(request) => request,
            Err(error) => return self.void("psp_error", acp_error(&error)).await,
        };
        let key = match self.step_key("delegate") {
            Ok(key) => key,
            Err(error) => return self.void("internal_error", error).await,
        };
        let token = match self.acp.psp.delegate_payment(&request, &key).await {
            Ok(response) => response.id,
            Err(error) => {
                // Whatever the PSP did, the merchant never saw a token: nothing can be charged.
                tracing::warn!(agent = %self.auth.agent, hold = %self.grant.hold_id, code = error.code(),
                    detail = %describe(&error), "ACP delegate_payment failed");
                self.note_provider_error("psp_error", &error).await;
                let reason = if matches!(error, AcpError::Timeout(_)) { "timeout" } else { "psp_error" };
                return self.void(reason, acp_error(&error)).await;
            }
        };
        let request =
            CheckoutSessionCompleteRequest::with_delegated_token(&handler.id, token, self.acp.billing_address.clone());
        let key = match self.step_key("complete") {
            Ok(key) => key,
            Err(error) => return self.void("internal_error", error).await,
        };
        match self.merchant.complete_session(self.session_id(), &request, &key).await {
            Ok(completed) => self.completed(completed).await,
            Err(error) if error.outcome_unknown() => {
                let reason = if matches!(error, AcpError::Timeout(_)) { "timeout" } else { "merchant_error" };
                self.resolve(reason, &error, acp_error(&error)).await
            }
            Err(error) => {
                tracing::info!(agent = %self.auth.agent, hold = %self.grant.hold_id, code = error.code(),
                    detail = %describe(&error), "ACP merchant refused the completion");
                self.note_provider_error("merchant_declined", &error).await;
                self.void("merchant_declined", acp_error(&error)).await
            }
        }
    }

    /// The merchant answered the completion with a session.
    async fn completed(&self, session: CheckoutSession) -> Outcome {
        if completed_order(&session).is_some() {
            return self.settle_completed(&session).await;
        }
        match &session.status {
            // Paid, maybe, or being paid: ask again before deciding.
            SessionStatus::Completed
            | SessionStatus::CompleteInProgress
            | SessionStatus::PendingApproval
            | SessionStatus::InProgress
            | SessionStatus::Other(_) => {
                let error = Failure::new(
                    Kind::Provider,
                    "acp_not_completed",
                    format!("the merchant answered the completion with status {} and no order", session.status),
                );
                let cause = AcpError::MalformedResponse {
                    provider: Provider::Merchant,
                    http_status: 200,
                    reason: format!("status {} without an order", session.status),
                };
                self.resolve("merchant_error", &cause, error).await
            }
            // The merchant says it did not take the payment (declined, needs 3-D Secure, ...).
            _ => {
                let messages: Vec<Value> = session
                    .messages
                    .iter()
                    .filter(|message| message.kind == "error")
                    .map(|message| json!({ "code": message.code, "content": message.content, "param": message.param }))
                    .collect();
                let first = session.messages.iter().find(|message| message.kind == "error");
                let detail = first.and_then(|message| message.content.clone()).unwrap_or_else(|| {
                    format!("the merchant did not complete the checkout session (status {})", session.status)
                });
                let code = first.and_then(|message| message.code.clone()).unwrap_or_default();
                tracing::info!(agent = %self.auth.agent, hold = %self.grant.hold_id, status = %session.status,
                    merchant_code = %code, "ACP merchant declined the completion");
                let note = BTreeMap::from([
                    ("session_status".to_owned(), session.status.to_string()),
                    ("merchant_code".to_owned(), code),
                ]);
                self.note("merchant_declined", &note).await;
                let error = Failure::new(Kind::Invalid, "acp_merchant_declined", detail)
                    .with_extra(json!({ "session_status": session.status.as_str(), "messages": messages }));
                self.void("merchant_declined", error).await
            }
        }
    }

    /// Settles a session the merchant completed: at the total it was completed at when that is
    /// within the hold (a `total_changed` note names both totals), else at the hold, with an
    /// incident (a note that becomes a `payment.incident` webhook). A completed order is never
    /// voided: the card was charged.
    async fn settle_completed(&self, session: &CheckoutSession) -> Outcome {
        let Some(order) = completed_order(session) else {
            return self
                .unknown(Failure::new(
                    Kind::Provider,
                    "acp_not_completed",
                    format!("the checkout session is {} without an order", session.status),
                ))
                .await;
        };
        if session.id != self.session_id() {
            let error = AcpError::SessionMismatch { expected: self.session_id().to_owned(), got: session.id.clone() };
            return self.unknown(acp_error(&error)).await;
        }
        let completed = session_total(session, &self.acp.currency);
        let (amount, completed_total, incident) = match &completed {
            Ok(total) if total.minor_units == self.total.minor_units && total.currency == self.total.currency => {
                (self.grant.amount, Some(total), None)
            }
            Ok(total) if total.amount <= self.grant.amount => (total.amount, Some(total), None),
            Ok(total) => (self.grant.amount, Some(total), Some("incident_charged_above_hold")),
            Err(_) => (self.grant.amount, None, Some("incident_completed_total_unreadable")),
        };
        let mut details = BTreeMap::from([
            ("checkout_session_id".to_owned(), self.session_id().to_owned()),
            ("order_id".to_owned(), order.order_id.to_owned()),
            ("currency".to_owned(), self.total.currency.clone()),
            ("total_minor_units".to_owned(), self.total.minor_units.to_string()),
        ]);
        if let Some(permalink) = order.permalink_url {
            details.insert("permalink_url".into(), permalink.to_owned());
        }
        let order_number = session.order.as_ref().and_then(|order| order.order_number.as_deref());
        if let Some(number) = order_number {
            details.insert("order_number".into(), number.to_owned());
        }
        let changed = completed_total
            .filter(|total| total.minor_units != self.total.minor_units || total.currency != self.total.currency);
        if let Some(total) = changed {
            details.insert("completed_minor_units".into(), total.minor_units.to_string());
            details.insert("completed_currency".into(), total.currency.clone());
        }
        let shown = completed_total.unwrap_or(&self.total);
        let answer = |settlement: &pay::Settlement| {
            reply_ok(&Completed {
                status: "completed",
                merchant: self.merchant_name,
                checkout_session_id: self.session_id(),
                order: OrderView { id: order.order_id, permalink_url: order.permalink_url, order_number },
                total: TotalView { amount: shown.minor_units, currency: &shown.currency },
                total_changed: changed
                    .map(|total| TotalChanged { read: self.total.minor_units, completed: total.minor_units }),
                amount_micros: settlement.outcome.amount.get(),
                hold_id: self.grant.hold_id.as_str(),
                replayed: false,
                receipt: settlement.receipt.clone(),
            })
        };
        let hold = &self.grant.hold_id;
        let result = match self.key {
            // The settle stores the answer for retries itself when it can (one ledger call).
            Some(key) => {
                let stored = |settlement: &pay::Settlement| answer(settlement).ok().map(|reply| reply.stored());
                pay::settle_finishing(self.core, self.auth, hold, amount, &details, key, stored).await
            }
            None => pay::settle(self.core, self.auth, hold, amount, &details).await.map(|settled| (settled, false)),
        };
        let settlement = match result {
            Ok((settlement, finished)) => {
                self.finished.store(finished, std::sync::atomic::Ordering::Relaxed);
                settlement
            }
            Err(error) => {
                tracing::error!(agent = %self.auth.agent, hold = %self.grant.hold_id, order_id = order.order_id,
                    code = error.code, "the merchant completed the order but the hold could not be settled");
                return Outcome::Open(error);
            }
        };
        if changed.is_some() || incident.is_some() {
            let mut note = BTreeMap::from([
                ("order_id".to_owned(), order.order_id.to_owned()),
                ("read_minor_units".to_owned(), self.total.minor_units.to_string()),
                ("read_currency".to_owned(), self.total.currency.clone()),
                ("held_micros".to_owned(), self.grant.amount.get().to_string()),
                ("settled_micros".to_owned(), settlement.outcome.amount.get().to_string()),
            ]);
            match &completed {
                Ok(total) => {
                    note.insert("completed_minor_units".into(), total.minor_units.to_string());
                    note.insert("completed_currency".into(), total.currency.clone());
                }
                Err(error) => {
                    note.insert("error".into(), error.code().to_owned());
                }
            }
            if let Some(incident) = incident {
                tracing::error!(agent = %self.auth.agent, hold = %self.grant.hold_id, order_id = order.order_id,
                    incident, read = self.total.minor_units, "ACP merchant completed the order above the held total; \
                    settled the hold");
            } else {
                tracing::warn!(agent = %self.auth.agent, hold = %self.grant.hold_id, order_id = order.order_id,
                    read = self.total.minor_units, "ACP merchant completed the order at another total; settled what \
                    was charged");
            }
            // A replayed settle (a resumed purchase, a read-back) noted it the first time.
            if !settlement.outcome.replayed {
                self.note(incident.unwrap_or("total_changed"), &note).await;
            }
        }
        tracing::info!(agent = %self.auth.agent, hold = %self.grant.hold_id, merchant = self.merchant_name,
            checkout_session_id = self.session_id(), order_id = order.order_id, amount = settlement.outcome.amount.get(),
            "ACP checkout completed");
        match answer(&settlement) {
            Ok(reply) => Outcome::Done(reply),
            Err(error) => Outcome::Open(error),
        }
    }

    /// Reads the session back and, if the merchant has neither completed nor ended it, cancels
    /// it there (with a key of its own, so it never collides with another cancel), so that
    /// nobody can pay it later.
    async fn learn(&self) -> Learned {
        match self.merchant.retrieve_session(self.session_id()).await {
            Ok(session) if completed_order(&session).is_some() => return Learned::Completed(Box::new(session)),
            Ok(session) if matches!(session.status, SessionStatus::Canceled | SessionStatus::Expired) => {
                return Learned::Ended(session.status.to_string());
            }
            // Paid, maybe, or being paid: only a later read can tell.
            Ok(session)
                if matches!(
                    session.status,
                    SessionStatus::Completed | SessionStatus::CompleteInProgress | SessionStatus::PendingApproval
                ) =>
            {
                return Learned::Unknown;
            }
            Ok(_) | Err(_) => {}
        }
        let request = CancelSessionRequest::with_reason(
            CancelReason::Other,
            Some("spendcap could not confirm the payment and withdrew it"),
        );
        let Ok(key) = cancel_key(&self.grant.hold_id) else { return Learned::Unknown };
        match self.merchant.cancel_session(self.session_id(), &request, &key).await {
            Ok(session) if completed_order(&session).is_some() => Learned::Completed(Box::new(session)),
            Ok(session) if session.status == SessionStatus::Canceled => Learned::Ended(session.status.to_string()),
            Ok(_) | Err(_) => Learned::Unknown,
        }
    }

    /// The completion's outcome is unknown: learn it from the merchant, or mark the hold unknown.
    async fn resolve(&self, reason: &'static str, cause: &AcpError, error: Failure) -> Outcome {
        tracing::warn!(agent = %self.auth.agent, hold = %self.grant.hold_id, code = cause.code(),
            detail = %describe(cause), "ACP completion outcome unknown; reading the session back");
        match self.learn().await {
            Learned::Completed(session) => self.settle_completed(&session).await,
            Learned::Ended(status) => self.void(reason, with_fields(error, json!({ "session_status": status }))).await,
            Learned::Unknown => self.unknown(error).await,
        }
    }

    /// The payment may have happened: the hold is marked `unknown`, so it stays counted and
    /// never expires, until a read-back, a retry, a cancel or an admin resolves it.
    /// The mark releases the purchase's key in the same ledger call (`finished`), so that a retry
    /// gets the hold back at once.
    async fn unknown(&self, cause: Failure) -> Outcome {
        match pay::mark_unknown_releasing(self.core, &self.grant.hold_id, cause.code, self.key).await {
            Ok((_, released)) => self.finished.store(released, std::sync::atomic::Ordering::Relaxed),
            // The hold stays open (counted until its expiry); the read-backs still run.
            Err(error) => {
                tracing::error!(hold = %self.grant.hold_id, code = error.code, "could not mark an ACP hold unknown")
            }
        }
        tracing::warn!(agent = %self.auth.agent, hold = %self.grant.hold_id, code = cause.code,
            "ACP payment outcome unknown; the hold stays counted until it is resolved");
        Outcome::Unknown(
            Failure::new(
                Kind::ProviderTimeout,
                "acp_outcome_unknown",
                "the merchant has not confirmed whether it took the payment; the money stays held (outcome \
                 unknown) while the daemon reads the session back. Retry with the same Idempotency-Key to finish \
                 this purchase, or cancel the checkout session with this hold_id",
            )
            .with_extra(json!({ "cause": { "code": cause.code, "detail": cause.detail } })),
        )
    }

    /// Voids the hold (nothing spent) and answers with `error`; the void stores that answer for
    /// the purchase's retries in the same ledger call, and says so in `finished`.
    async fn void(&self, reason: &str, error: Failure) -> Outcome {
        let reply_of = |released: Micros| {
            let fields = json!({ "voided": true, "released_micros": released.get(), "void_reason": reason });
            Reply::error(&self.on_hold(with_fields(error.clone(), fields)))
        };
        let hold = &self.grant.hold_id;
        let result = match self.key {
            Some(key) => {
                let stored = reply_of(self.grant.amount).stored();
                pay::void_finishing(self.core, self.auth, hold, reason, key, &stored).await.map(
                    |(released, finished)| {
                        self.finished
                            .store(finished && released == self.grant.amount, std::sync::atomic::Ordering::Relaxed);
                        released
                    },
                )
            }
            None => pay::void(self.core, self.auth, hold, reason).await,
        };
        let released = match result {
            Ok(released) => released,
            // Voided already (a concurrent cancel) or expired: nothing is spent either way.
            Err(ended) if ended.code == "hold_voided" || ended.code == "hold_expired" => Micros::ZERO,
            Err(ledger) => {
                tracing::error!(hold = %self.grant.hold_id, code = ledger.code, reason, "could not void an ACP hold");
                return Outcome::Open(ledger);
            }
        };
        tracing::info!(agent = %self.auth.agent, hold = %self.grant.hold_id, merchant = self.merchant_name,
            checkout_session_id = self.session_id(), reason, "ACP purchase voided; nothing spent");
        Outcome::Done(reply_of(released))
    }

    /// Logs a provider's error code against the hold (never the PSP's free text).
    async fn note_provider_error(&self, reason: &str, error: &AcpError) {
        let mut detail = BTreeMap::from([("error".to_owned(), error.code().to_owned())]);
        if let Some(provider) = error.provider_error() {
            detail.insert("provider_code".into(), provider.code.clone());
            detail.insert("http_status".into(), provider.http_status.to_string());
        }
        self.note(reason, &detail).await;
    }

    async fn note(&self, reason: &str, detail: &BTreeMap<String, String>) {
        if let Err(error) = pay::note(self.core, self.auth, &self.grant.hold_id, reason, detail).await {
            tracing::warn!(hold = %self.grant.hold_id, code = error.code, "could not log a note on an ACP hold");
        }
    }
}

/// A merchant `Idempotency-Key` for one cancel: fresh each time, so that it never meets another
/// cancel's key with another body (the session is read first, so a repeated cancel is harmless).
fn cancel_key(hold: &HoldId) -> Result<IdempotencyKey, Failure> {
    provider_key(format!("{hold}:cancel:{:016x}", rand::random::<u64>()))
}

/// The agent's hold for this merchant's session, for the cancel endpoint.
async fn own_hold(
    core: &Core,
    auth: &AgentAuth,
    text: &str,
    merchant_name: &str,
    checkout_session_id: &str,
) -> Result<HoldInfo, Failure> {
    let not_found = || Failure::new(Kind::NotFound, "unknown_hold", "no such hold");
    let hold: HoldId = text.parse().map_err(|_| not_found())?;
    if hold.tree() != auth.agent.tree() {
        return Err(not_found());
    }
    let info = pay::hold_info(core, auth, &hold).await.map_err(|error| match error.code {
        "unknown_hold" => not_found(),
        _ => error,
    })?;
    let details: BTreeMap<String, String> = serde_json::from_str(&info.details).unwrap_or_default();
    let same = info.protocol == "acp"
        && info.service == merchant_name
        && details.get("checkout_session_id").map(String::as_str) == Some(checkout_session_id);
    if !same {
        return Err(Failure::new(
            Kind::Invalid,
            "acp_hold_mismatch",
            "the hold is not this merchant's checkout session's",
        ));
    }
    if info.state == "settled" {
        return Err(already_completed(text, info.settled.unwrap_or(Micros::ZERO), None));
    }
    Ok(info)
}

/// 409 `acp_already_completed`: the purchase was paid (and is settled).
fn already_completed(hold: &str, settled: Micros, order_id: Option<&str>) -> Failure {
    Failure::new(Kind::Conflict, "acp_already_completed", "the purchase was paid; its hold is settled")
        .with_extra(json!({ "hold_id": hold, "settled_micros": settled.get(), "order_id": order_id }))
}

/// `POST /v1/acp/checkouts/{id}/cancel`. With the hold of a purchase, the session is read first:
/// completed → the hold is settled at what was charged (409 `acp_already_completed`); canceled or
/// expired → voided; otherwise it is canceled at the merchant, with a key of its own, and the
/// hold is voided once the merchant confirms. A hold is never dropped while the merchant may
/// still charge.
pub(super) async fn cancel(
    core: &Core,
    acp: &Acp,
    auth: &AgentAuth,
    checkout_session_id: &str,
    body: CancelRequest,
) -> Result<Reply, Failure> {
    verify_token(core, auth).await?;
    let merchant = acp.merchant(&body.merchant)?;
    let info = match &body.hold_id {
        Some(text) => own_hold(core, auth, text, &body.merchant, checkout_session_id).await?,
        None => return cancel_session(auth, merchant, &body.merchant, checkout_session_id).await,
    };
    if !matches!(info.state.as_str(), "open" | "unknown") {
        // Voided or expired already: nothing is held; the session is canceled all the same.
        return cancel_session(auth, merchant, &body.merchant, checkout_session_id).await;
    }
    let grant = Grant {
        hold_id: info.hold_id.clone(),
        amount: info.amount,
        remaining: Micros::ZERO,
        expires_at_ms: info.expires_at_ms,
        replayed: true,
    };
    let total = held_total(&info, &grant).ok_or_else(|| Failure::internal("an ACP hold without its total"))?;
    let purchase = Purchase {
        core,
        acp,
        auth,
        merchant_name: &body.merchant,
        merchant,
        total,
        grant,
        key: None,
        finished: Default::default(),
    };
    let hold_text = info.hold_id.to_string();
    match purchase.learn().await {
        Learned::Completed(session) => match purchase.settle_completed(&session).await {
            Outcome::Done(reply) => {
                let settled = reply.body["amount_micros"].as_u64().and_then(|m| Micros::new(m).ok());
                let order = session.order.as_ref().map(|order| order.id.as_str());
                Err(already_completed(&hold_text, settled.unwrap_or(Micros::ZERO), order))
            }
            Outcome::Open(error) | Outcome::Unknown(error) => Err(purchase.on_hold(error)),
        },
        Learned::Ended(status) => {
            let released = match pay::void(core, auth, &info.hold_id, "canceled_by_agent").await {
                Ok(released) => released,
                Err(ended) if ended.code == "hold_voided" || ended.code == "hold_expired" => Micros::ZERO,
                Err(error) => return Err(error),
            };
            tracing::info!(agent = %auth.agent, merchant = %body.merchant, checkout_session_id, hold = %info.hold_id,
                released = released.get(), "ACP checkout session canceled; hold voided");
            reply_ok(&Canceled {
                status: "canceled",
                merchant: &body.merchant,
                checkout_session_id,
                hold_id: Some(hold_text),
                session_status: status,
                released_micros: released.get(),
            })
        }
        Learned::Unknown => Err(purchase.on_hold(Failure::new(
            Kind::ProviderTimeout,
            "acp_outcome_unknown",
            "the merchant neither confirmed the cancellation nor showed the session ended or completed; the money \
             stays held. Try again later",
        ))),
    }
}

/// Cancels a session at the merchant for an agent with no open purchase of it.
async fn cancel_session(
    auth: &AgentAuth,
    merchant: &MerchantClient,
    merchant_name: &str,
    checkout_session_id: &str,
) -> Result<Reply, Failure> {
    let key = format!("cancel_{}", &sha256_hex(&[auth.agent.as_str(), merchant_name, checkout_session_id])[..48]);
    let request = CancelSessionRequest::with_reason(CancelReason::Other, Some("canceled by the agent"));
    let session = merchant.cancel_session(checkout_session_id, &request, &provider_key(key)?).await.map_err(|error| {
        tracing::info!(agent = %auth.agent, merchant = merchant_name, code = error.code(), detail = %describe(&error),
            "ACP cancel refused");
        let error_view = acp_error(&error);
        match error {
            AcpError::InvalidInput { .. } => error_view,
            _ => with_fields(error_view, json!({ "checkout_session_id": checkout_session_id })),
        }
    })?;
    if session.status != SessionStatus::Canceled {
        return Err(Failure::new(
            Kind::Conflict,
            "acp_not_canceled",
            format!("the merchant answered the cancellation with status {}", session.status),
        )
        .with_extra(json!({ "checkout_session_id": checkout_session_id, "session_status": session.status.as_str() })));
    }
    tracing::info!(agent = %auth.agent, merchant = merchant_name, checkout_session_id, "ACP checkout session canceled");
    reply_ok(&Canceled {
        status: "canceled",
        merchant: merchant_name,
        checkout_session_id,
        hold_id: None,
        session_status: session.status.to_string(),
        released_micros: 0,
    })
}
