//! Paying on behalf of an agent: the ledger steps every protocol shares — hold an intent, settle
//! with a signed receipt, void, finish an idempotent purchase — over the narrow [`Core`], with
//! the ledger's answers turned into [`Failure`]s (a budget refusal is `Kind::Refused`).
//!
//! The protocol flows (`protocols::x402`, `acp`, `ap2`, keyed APIs) call these and nothing else
//! of the ledger, so every payment, whatever its protocol, is capped, logged and receipted the
//! same way. Nothing here knows HTTP: the faces translate.

use std::collections::BTreeMap;

use adapters::{Micros, PaymentIntent, Protocol};

use crate::app::Core;
use crate::identity::{AgentAuth, AgentId, HoldId};
use crate::ledger::{
    EndsPurchase, Grant, HoldExpiry, HoldInfo, HoldOutcome, HoldRequest, Idempotency, IdempotencyFinish, LedgerError,
    MarkedUnknown, SettleOutcome,
};
use crate::outcome::{label, Failure, Kind};
use crate::receipt::{self, HeldFacts, Receipt};

/// What to hold for a payment.
pub struct HoldSpec<'a> {
    pub intent: &'a PaymentIntent,
    /// The agent's task label, for attribution.
    pub task: &'a str,
    /// When the hold must be released if nobody settles it (e.g. at an x402 `validBefore`).
    pub expires: HoldExpiry,
    pub idempotency: Option<Idempotency>,
}

#[derive(Debug)]
pub enum Held {
    /// A new hold: go on and pay.
    New(Grant),
    /// The hold an earlier request with the same idempotency key made (its outcome was unknown
    /// or its caller died): finish the same purchase with it, never start another.
    Resumed(Grant),
    /// An earlier request with the same key finished; this is its stored response.
    Finished(String),
}

fn details_json(details: &BTreeMap<String, String>) -> Result<String, Failure> {
    if details.is_empty() {
        return Ok(String::new());
    }
    serde_json::to_string(details).map_err(Failure::internal)
}

/// Holds the intent's amount against the agent and every ancestor, or refuses with a 402.
pub async fn hold(core: &Core, agent: &AgentAuth, spec: HoldSpec<'_>) -> Result<Held, Failure> {
    hold_with_budgets(core, agent, spec, Vec::new()).await
}

/// [`hold`], charging the extra budget buckets too (an AP2 open mandate's budget, say), all in
/// the same atomic step.
pub async fn hold_with_budgets(
    core: &Core,
    agent: &AgentAuth,
    spec: HoldSpec<'_>,
    buckets: Vec<String>,
) -> Result<Held, Failure> {
    let now = core.clock.now_ms();
    let request = HoldRequest {
        agent: agent.agent.clone(),
        caller: agent.caller(),
        hold_id: HoldId::generate(agent.agent.tree()),
        amount: spec.intent.amount,
        expires: spec.expires,
        task: label("task", spec.task, 128)?,
        service: label("service", &spec.intent.service, 256)?,
        protocol: spec.intent.protocol,
        idempotency: spec.idempotency,
        details: details_json(&spec.intent.details)?,
        buckets,
    };
    let result = hold_and_remember(core, now, &request).await;
    match result.map_err(Failure::agent_scoped)? {
        HoldOutcome::Granted(grant) if grant.replayed => Ok(Held::Resumed(grant)),
        HoldOutcome::Granted(grant) => Ok(Held::New(grant)),
        HoldOutcome::Refused(refusal) => {
            tracing::info!(agent = %agent.agent, reason = refusal.reason.code(), protocol = %spec.intent.protocol,
                requested = refusal.requested.get(), "payment refused");
            Err(Failure::refused(&refusal))
        }
        HoldOutcome::Finished { response } => Ok(Held::Finished(response)),
        HoldOutcome::Approval(wait) => {
            tracing::info!(agent = %agent.agent, approval = %wait.hold_id, state = wait.state.as_str(),
                protocol = %spec.intent.protocol, "payment waits for approval");
            let key = request.idempotency.as_ref().map(|i| i.key.clone());
            Err(Failure::approval(&wait, key.as_deref()))
        }
    }
}

/// Asks the ledger for `request` (with the hold metrics) and, when it grants a new hold,
/// remembers what the hold's receipt will state, so that its settle carries the receipt.
pub async fn hold_and_remember(
    core: &Core,
    now_ms: u64,
    request: &HoldRequest,
) -> Result<HoldOutcome, crate::ledger::LedgerError> {
    // What this instance signs and the expiry it computes from it must match the ledger's clock.
    core.clock_guard
        .check()
        .map_err(|offset_ms| LedgerError::ClockSkew { offset_ms, max_ms: core.clock_guard.max_ms() })?;
    // Every hold carries an idempotency key, so that a lost answer can be asked about.
    let keyed;
    let request = match request.idempotency {
        Some(_) => request,
        None => {
            keyed = HoldRequest { idempotency: Some(auto_idempotency(&request.hold_id, "daemon")), ..request.clone() };
            &keyed
        }
    };
    let started = std::time::Instant::now();
    let want_head = !core.signer.knows_head(request.agent.tree());
    let mut result = match core.ledger.hold_with_head(now_ms, request, want_head).await {
        Ok((outcome, head)) => {
            if let Some(head) = head {
                core.signer.learn_head(request.agent.tree(), &head);
            }
            Ok(outcome)
        }
        Err(err) => Err(err),
    };
    core.metrics.hold(request.protocol.as_str(), &result, started.elapsed());
    let key = request.idempotency.as_ref().map(|i| i.key.as_str());
    match &result {
        Err(LedgerError::OutcomeUnknown { .. }) => {
            core.unacked.remember(&request.agent, &request.hold_id, key, request.expires.at(now_ms))
        }
        Ok(HoldOutcome::Granted(grant)) if grant.replayed && !core.unacked.acknowledge(&grant.hold_id) => {
            result = Err(LedgerError::OutcomeUnknown {
                cause: format!("hold {} is being withdrawn", grant.hold_id),
                retry_key: key.map(str::to_owned),
            });
        }
        _ => {}
    }
    if let Ok(HoldOutcome::Granted(grant)) = &result {
        if !grant.replayed {
            core.signer.remember_hold(
                &grant.hold_id,
                HeldFacts {
                    agent: request.agent.to_string(),
                    held: grant.amount,
                    task: request.task.clone(),
                    service: request.service.clone(),
                    protocol: request.protocol.as_str().to_owned(),
                    details: request.details.clone(),
                },
            );
        }
    }
    result
}

/// The idempotency key the daemon gives a hold sent without one (`fingerprint`: of the request,
/// so that the agent can retry with the key it is told).
pub fn auto_idempotency(hold: &HoldId, fingerprint: &str) -> Idempotency {
    Idempotency {
        key: format!("auto-{hold}"),
        fingerprint: fingerprint.to_owned(),
        mode: crate::ledger::IdempotencyMode::Final,
    }
}

pub struct Settlement {
    pub outcome: SettleOutcome,
    pub receipt: Receipt,
}

/// Settles `amount` (≤ held; the rest is released) and returns the signed, chained receipt.
/// `details` (settlement transaction, order id, ...) go into the log line and the receipt.
pub async fn settle(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    amount: Micros,
    details: &BTreeMap<String, String>,
) -> Result<Settlement, Failure> {
    settle_with_receipt(core, agent, None, hold, amount, &details_json(details)?).await
}

/// Settles `amount` of `hold` (only if it was made under `protocol`, when given) with the
/// settle's `details` JSON ('' for none) and returns the signed, chained receipt. A hold this
/// daemon granted has its receipt signed before the settle, which links it in the same call.
pub async fn settle_with_receipt(
    core: &Core,
    agent: &AgentAuth,
    protocol: Option<Protocol>,
    hold: &HoldId,
    amount: Micros,
    details: &str,
) -> Result<Settlement, Failure> {
    settle_for(core, &agent.agent, &agent.caller(), protocol, hold, amount, details).await
}

/// Settles `amount` of `hold` and keeps it open for the rest (an MPP session's voucher: the
/// deposit is held once, each voucher settles its increment). `total` is the hold's settled
/// amount once this increment is in: a retry with the same total settles nothing again. No
/// receipt: the hold's receipt is signed when it ends.
pub async fn settle_part(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    amount: Micros,
    total: Micros,
    details: &BTreeMap<String, String>,
) -> Result<crate::ledger::PartSettled, Failure> {
    let details = details_json(details)?;
    core.ledger
        .settle_part(
            core.clock.now_ms(),
            &agent.agent,
            &agent.caller(),
            hold,
            amount,
            total,
            &details,
            Some(Protocol::Mpp),
        )
        .await
        .map_err(Failure::agent_scoped)
}

/// [`settle_with_receipt`] for `agent` as `caller` (an admin resolving a hold, say).
#[allow(clippy::too_many_arguments)]
pub async fn settle_for(
    core: &Core,
    agent: &crate::identity::AgentId,
    caller: &crate::ledger::Caller,
    protocol: Option<Protocol>,
    hold: &HoldId,
    amount: Micros,
    details: &str,
) -> Result<Settlement, Failure> {
    let now = core.clock.now_ms();
    let settling = core.signer.settling(hold.tree());
    let presigned = core.signer.presign(&settling, hold, now, amount, details);
    let result = core
        .ledger
        .settle_presigned(protocol, now, agent, caller, hold, amount, details, presigned.as_ref().map(|p| &p.link))
        .await;
    core.metrics.settle(&result);
    let outcome = result.map_err(|e| match caller {
        crate::ledger::Caller::Agent(_) => Failure::agent_scoped(e),
        crate::ledger::Caller::Admin | crate::ledger::Caller::Principal(_) => e.into(),
    })?;
    let receipt = receipt::issue_settled(&core.ledger, &core.signer, &outcome, presigned).await?;
    Ok(Settlement { outcome, receipt })
}

/// [`settle`] for a purchase with an idempotency key `key`: the answer its duplicates get,
/// `answer(settlement)`, is stored by the settle itself when the receipt signed ahead is the
/// settle's receipt (the usual case), so that the purchase ends in one ledger call. True when it
/// was; otherwise the caller stores its answer with [`finish`] as before. `answer` may be called
/// twice (once with the receipt signed ahead, once with the settle's), and must depend on the
/// settlement only through its argument.
pub async fn settle_finishing(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    amount: Micros,
    details: &BTreeMap<String, String>,
    key: &str,
    answer: impl Fn(&Settlement) -> Option<String>,
) -> Result<(Settlement, bool), Failure> {
    let details = details_json(details)?;
    let now = core.clock.now_ms();
    let settling = core.signer.settling(hold.tree());
    let presigned = core.signer.presign(&settling, hold, now, amount, &details);
    // The settlement as it will be if the settle links the receipt signed ahead.
    let response = presigned.as_ref().and_then(|presigned| {
        let facts = &presigned.link.facts;
        answer(&Settlement {
            outcome: SettleOutcome {
                seq: facts.seq,
                amount,
                released: Micros::new(facts.held.saturating_sub(amount.get())).ok()?,
                replayed: false,
                linked: true,
                facts: facts.clone(),
            },
            receipt: presigned.receipt().clone(),
        })
    });
    let finish = response.as_deref().map(|response| EndsPurchase { key, response });
    let caller = agent.caller();
    let result = core
        .ledger
        .settle_finishing(
            None,
            now,
            &agent.agent,
            &caller,
            hold,
            amount,
            &details,
            presigned.as_ref().map(|p| &p.link),
            finish,
        )
        .await;
    let (result, finished) = match result {
        Ok((outcome, finished)) => (Ok(outcome), finished),
        Err(err) => (Err(err), false),
    };
    core.metrics.settle(&result);
    let outcome = result.map_err(Failure::agent_scoped)?;
    let receipt = receipt::issue_settled(&core.ledger, &core.signer, &outcome, presigned).await?;
    Ok((Settlement { outcome, receipt }, finished))
}

/// [`void`] for a purchase with an idempotency key: `response` (its answer for duplicates) is
/// stored by the void itself. The flag says whether it was (the record was this hold's and not
/// finished yet).
pub async fn void_finishing(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    reason: &str,
    key: &str,
    response: &str,
) -> Result<(Micros, bool), Failure> {
    let reason = label("reason", reason, 64)?;
    let finish = Some(EndsPurchase { key, response });
    let result =
        core.ledger.void_finishing(core.clock.now_ms(), &agent.agent, &agent.caller(), hold, &reason, finish).await;
    let (result, finished) = match result {
        Ok((released, replayed, finished)) => (Ok((released, replayed)), finished),
        Err(err) => (Err(err), false),
    };
    core.metrics.void(&result);
    let (released, _) = result.map_err(Failure::agent_scoped)?;
    Ok((released, finished))
}

/// Voids a hold (nothing spent); `reason` is a code for the log, e.g. `merchant_declined`.
pub async fn void(core: &Core, agent: &AgentAuth, hold: &HoldId, reason: &str) -> Result<Micros, Failure> {
    let reason = label("reason", reason, 64)?;
    let result = core.ledger.void(core.clock.now_ms(), &agent.agent, &agent.caller(), hold, &reason).await;
    core.metrics.void(&result);
    let (released, _) = result.map_err(Failure::agent_scoped)?;
    Ok(released)
}

/// Ends an idempotent purchase: `Done(response)` for duplicates to replay, or `Release` when
/// its outcome is unknown and a retry must resume the same hold.
pub async fn finish(core: &Core, agent: &AgentAuth, key: &str, finish: IdempotencyFinish) -> Result<(), Failure> {
    core.ledger.finish_idempotent(&agent.agent, key, &finish).await.map_err(Failure::agent_scoped)
}

/// Logs a `note` about a hold without changing any balance (a provider rejected a signed
/// payment, say, and the hold stays until its expiry because the authorization is still live).
pub async fn note(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    reason: &str,
    detail: &BTreeMap<String, String>,
) -> Result<(), Failure> {
    let reason = label("reason", reason, 64)?;
    core.ledger
        .note(core.clock.now_ms(), &agent.agent, &agent.caller(), hold, &reason, &details_json(detail)?)
        .await
        .map_err(Failure::agent_scoped)
}

/// [`note`] that also releases the purchase's in-flight idempotency record `key` in the same
/// ledger call (a retry gets the hold back at once, as [`IdempotencyFinish::Release`] does): the
/// flag says whether it did (the record was this hold's and in flight).
pub async fn note_releasing(
    core: &Core,
    agent: &AgentAuth,
    hold: &HoldId,
    reason: &str,
    detail: &BTreeMap<String, String>,
    key: &str,
) -> Result<bool, Failure> {
    let reason = label("reason", reason, 64)?;
    core.ledger
        .note_releasing(
            core.clock.now_ms(),
            &agent.agent,
            &agent.caller(),
            hold,
            &reason,
            &details_json(detail)?,
            Some(key),
        )
        .await
        .map_err(Failure::agent_scoped)
}

/// The stored hold (state, amount, details), to resume a purchase exactly.
pub async fn hold_info(core: &Core, agent: &AgentAuth, hold: &HoldId) -> Result<HoldInfo, Failure> {
    core.ledger.hold_info(&agent.agent, hold).await.map_err(Failure::agent_scoped)
}

/// Checks, before anything is sent on the agent's behalf, what a hold would refuse without
/// knowing the amount: the agent (or an ancestor) revoked, suspended or expired, or its controls
/// denying `protocol` or `service`. A refusal is the same 402 a refused hold gives, logged
/// (`refuse`) and counted (`spendcap_refusals_total`) like one. The hold stays the authority
/// for money; this only keeps requests from leaving the daemon.
pub async fn precheck(core: &Core, agent: &AgentAuth, protocol: Protocol, service: &str) -> Result<(), Failure> {
    precheck_task(core, agent, protocol, service, "").await
}

/// [`precheck`], attributing a refusal to the agent's `task`.
pub async fn precheck_task(
    core: &Core,
    agent: &AgentAuth,
    protocol: Protocol,
    service: &str,
    task: &str,
) -> Result<(), Failure> {
    let service = label("service", service, 256)?;
    let task = label("task", task, 128)?;
    core.clock_guard
        .check()
        .map_err(|offset_ms| LedgerError::ClockSkew { offset_ms, max_ms: core.clock_guard.max_ms() })?;
    let result =
        core.ledger.precheck(core.clock.now_ms(), &agent.agent, &agent.caller(), protocol, &service, &task).await;
    core.metrics.precheck(protocol.as_str(), &result);
    match result.map_err(Failure::agent_scoped)? {
        None => Ok(()),
        Some(refusal) => {
            tracing::info!(agent = %agent.agent, reason = refusal.reason.code(), protocol = %protocol,
                service = %service, "payment refused before anything was sent");
            Err(Failure::refused(&refusal))
        }
    }
}

/// At most this many bytes of a reason are stored with an `unknown` hold.
const UNKNOWN_REASON_BYTES: usize = 512;

/// Marks a hold `unknown`: its payment was sent and no answer says whether money moved. It stays
/// counted against every cap and never expires, until a settle (a known charge) or a void (known
/// not to have moved money) resolves it, by a flow's read-back or an admin
/// (`POST /v1/holds/{hold}/resolve`). `reason` says what happened, for the log and the views.
pub async fn mark_unknown(core: &Core, hold: &HoldId, reason: &str) -> Result<MarkedUnknown, Failure> {
    Ok(mark_unknown_releasing(core, hold, reason, None).await?.0)
}

/// [`mark_unknown`] that also releases the purchase's in-flight idempotency record `key` in the
/// same call (what [`finish`] with `Release` does), so that a retry resumes the same hold. True
/// when it did; otherwise the caller releases it with [`finish`].
pub async fn mark_unknown_releasing(
    core: &Core,
    hold: &HoldId,
    reason: &str,
    key: Option<&str>,
) -> Result<(MarkedUnknown, bool), Failure> {
    let mut text: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.len() > UNKNOWN_REASON_BYTES {
        let cut = (0..=UNKNOWN_REASON_BYTES).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(cut);
    }
    let (marked, released) = core.ledger.mark_unknown_releasing(core.clock.now_ms(), hold, &text, key).await?;
    if !marked.replayed {
        tracing::warn!(agent = %marked.agent, hold = %hold, amount = marked.amount.get(), reason = %text,
            "payment outcome unknown; the hold stays counted until it is resolved");
    }
    Ok((marked, released))
}

/// Refuses (`agent_revoked`, forbidden) when the agent or an ancestor is revoked. For calls that
/// would write something other than a payment attempt on the agent's behalf (a task outcome, a
/// new AP2 key, a mandate's budget): after revocation an agent's token reads its own state, and
/// its payment attempts are refused by the hold itself, which logs the refusal. Settling and
/// voiding holds it already had stay open to it: a known charge is always settled. A check
/// before the write, not inside it: a write that races the revocation itself may still land.
pub async fn refuse_if_revoked(core: &Core, agent: &AgentId) -> Result<(), Failure> {
    let mut next = Some(agent.clone());
    while let Some(id) = next {
        let record = core.ledger.agent(&id).await.map_err(Failure::agent_scoped)?;
        if record.revoked.is_some() {
            return Err(Failure::new(
                Kind::Forbidden,
                "agent_revoked",
                "the agent is revoked: its token reads its own state and nothing else",
            ));
        }
        next = record.parent;
    }
    Ok(())
}
