//! The in-process ledger for `serve --dev` and tests: the same operations and semantics as the
//! Lua library, over plain maps behind one mutex. Nothing is durable.
//!
//! A `std::sync::Mutex` (not tokio's) is right here: no operation awaits while holding it, and
//! each one is a few map lookups, so contention costs less than an async lock's bookkeeping.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use adapters::{Micros, Protocol};

use super::approval::{Approval, ApprovalState, ApprovalWait, Decided};
use super::controls::{self, crossed, payment_names, Controls, Crossing, Period};
use super::{
    AgentControls, AgentRecord, AgentSetup, AlertRead, Balance, Bucket, Caller, ChainHead, EndsPurchase, Grant,
    HoldInfo, HoldOutcome, HoldRequest, IdempotencyFinish, IdempotencyMode, LedgerError, LogEntry, MarkedUnknown,
    NewAgent, PartSettled, PeriodUsage, ReceiptFacts, ReceiptLink, Refusal, RefusalReason, SettleOutcome, TaskOutcome,
    IDEMPOTENCY_RETENTION_MS, MAX_DEPTH,
};
use crate::identity::{AgentId, HoldId, TokenHash, TreeId};
use crate::operators::{NewOperator, OperatorRecord};
use crate::roles::Actor;

mod orchestrators;

const EXPIRE_BATCH: usize = 32;
const EXPIRE_MAX: usize = 1024;

struct Agent {
    attrs: BTreeMap<String, String>,
    record: AgentRecord,
    /// The agent itself, then its ancestors up to the root.
    path: Vec<AgentId>,
    token: TokenHash,
    controls: Controls,
    alerts: Vec<u8>,
    /// The highest alert threshold sent for the cap, and the cap it was for.
    alerted: Option<(u8, u64)>,
    breaker: Breaker,
}

/// The runaway-loop breaker's memory of an agent's recent holds (as the Lua library keeps it).
#[derive(Default)]
struct Breaker {
    /// Times of the latest holds, newest first, at most `max_holds`.
    holds: VecDeque<u64>,
    /// (time, amount) of the holds within the spend window, newest first, and their sum.
    spends: VecDeque<(u64, u64)>,
    spend_sum: u64,
    /// The last hold's service + amount, and how many holds in a row had it.
    last: Option<String>,
    repeats: u64,
}

/// A period or per-task counter: what holds charged to it spent and hold.
#[derive(Default)]
struct Counter {
    spent: u64,
    held: u64,
    alerted: Option<(u8, u64)>,
}

/// A counter a hold would charge, with the limit it was checked against.
struct Charge {
    id: String,
    level: String,
    limit: u64,
    used: u64,
    period: Option<(Period, u64)>,
    task: Option<String>,
}

/// The `alerts` consumer group of a tree's log: entries up to `delivered` (an index into the
/// log) went to some consumer; those not yet acknowledged are pending, with their consumer.
#[derive(Default)]
struct AlertGroup {
    delivered: usize,
    pending: BTreeMap<usize, (String, Instant)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HoldState {
    /// Held, waiting for a person's approval; `expires_at_ms` is the approval's expiry.
    PendingApproval,
    Open,
    /// Its payment may have moved money: counted until a settle or void resolves it.
    Unknown,
    Settled,
    Voided,
    Expired,
}

impl HoldState {
    fn error(self) -> LedgerError {
        match self {
            HoldState::Settled => LedgerError::HoldSettled,
            HoldState::Voided => LedgerError::HoldVoided,
            HoldState::PendingApproval => LedgerError::HoldPendingApproval,
            HoldState::Expired | HoldState::Open | HoldState::Unknown => LedgerError::HoldExpired,
        }
    }
}

struct Hold {
    buckets: Vec<String>,
    counters: Vec<String>,
    details: String,
    agent: AgentId,
    amount: u64,
    state: HoldState,
    expires_at_ms: u64,
    settled: u64,
    /// What `settle_part` settled of it so far (`psettled` in Redis); `amount` is what is left.
    part_settled: u64,
    seq: u64,
    task: String,
    service: String,
    protocol: String,
    unknown_reason: String,
    unknown_since_ms: Option<u64>,
    created_at_ms: u64,
    /// Under a `new service` approval rule: a settle adds the service to the agent's seen ones.
    new_service_rule: bool,
    approval: Option<HoldApproval>,
}

/// A hold's approval, as the Lua library keeps it in the hold's `appr*` fields.
struct HoldApproval {
    reason: String,
    state: ApprovalState,
    expires_at_ms: u64,
    /// The hold's own lifetime, from the approval on.
    life_ms: u64,
    by: String,
    note: String,
    decided_at_ms: Option<u64>,
}

impl Hold {
    fn approval_view(&self, id: &str, now_ms: u64) -> Option<Approval> {
        let a = self.approval.as_ref()?;
        let mut state = a.state;
        if state == ApprovalState::Pending && a.expires_at_ms <= now_ms {
            state = ApprovalState::Expired;
        }
        Some(Approval {
            approval_id: id.to_owned(),
            agent: self.agent.to_string(),
            amount_micros: self.amount,
            state,
            reason: a.reason.clone(),
            expires_at_ms: a.expires_at_ms,
            created_at_ms: self.created_at_ms,
            service: self.service.clone(),
            protocol: self.protocol.clone(),
            task: self.task.clone(),
            by: a.by.clone(),
            note: a.note.clone(),
            decided_at_ms: a.decided_at_ms,
        })
    }

    fn approval_wait(&self, id: &HoldId, state: ApprovalState, replayed: bool) -> Option<ApprovalWait> {
        let a = self.approval.as_ref()?;
        Some(ApprovalWait {
            hold_id: id.clone(),
            amount: money(self.amount),
            expires_at_ms: a.expires_at_ms,
            reason: a.reason.clone(),
            state,
            by: a.by.clone(),
            note: a.note.clone(),
            replayed,
        })
    }
}

enum IdemStatus {
    Granted(Grant),
    Refused(Refusal),
    InFlight {
        grant: Grant,
        lease_until_ms: u64,
    },
    Done(String),
    /// The hold waits (or waited) for approval; an approved one is resumed once.
    Approval {
        hold: HoldId,
        remaining: u64,
    },
}

struct IdemRecord {
    fingerprint: String,
    status: IdemStatus,
    kept_until_ms: u64,
    /// A duplicate got the recorded answer: the agent has it (see `forget_unacknowledged`).
    replayed: bool,
}

#[derive(Default)]
struct Tree {
    buckets: HashMap<String, Bucket>,
    agents: BTreeMap<String, Agent>,
    holds: HashMap<String, Hold>,
    /// Open holds by (expiry, id).
    open: BTreeSet<(u64, String)>,
    /// Holds whose outcome is unknown, by (time marked, id); they never expire.
    unknown: BTreeSet<(u64, String)>,
    log: Vec<LogEntry>,
    log_seq: u64,
    idempotency: HashMap<(String, String), IdemRecord>,
    receipts: BTreeMap<u64, ReceiptFacts>,
    head: ChainHead,
    counters: HashMap<String, Counter>,
    /// Per agent: the periods it has counters for, by (start, period).
    periods: HashMap<String, BTreeSet<(u64, Period)>>,
    group: Option<AlertGroup>,
    /// Task-scoped tokens by id (`<P>:tt:<id>`), and each agent's (`<P>:tts:<agent>`).
    task_tokens: BTreeMap<String, orchestrators::TaskTokenRec>,
    agent_task_tokens: HashMap<String, BTreeSet<String>>,
    /// The sub-agents each agent created itself (`<P>:sub:<agent>`).
    sub_agents: HashMap<String, BTreeSet<String>>,
    /// Per agent: the services it settled with while under a `new service` approval rule.
    seen: HashMap<String, std::collections::HashSet<String>>,
    /// Holds that waited for approval, by (time made, id).
    approvals: BTreeSet<(u64, String)>,
}

#[derive(Default)]
struct State {
    trees: BTreeMap<TreeId, Tree>,
    handles: HashMap<String, AgentId>,
    /// Operator tokens by id, their names (name -> id) and their log (`<ns>:{ops}` in Redis).
    operators: BTreeMap<String, OperatorRecord>,
    operator_names: HashMap<String, String>,
    operator_log: Vec<LogEntry>,
}

#[derive(Default)]
pub struct MemoryLedger {
    state: Mutex<State>,
}

impl Tree {
    fn log(&mut self, tree: &TreeId, mut entry: LogEntry) {
        self.log_seq += 1;
        entry.id = format!("{}-{}", entry.ts_ms, self.log_seq);
        entry.tree = tree.to_string();
        self.log.push(entry);
    }

    /// Ends an open hold: `(state, settled)` says how (settled micros are spent, the rest released);
    /// `by` names who ended it on the log entry ("" for the agent or the daemon).
    #[allow(clippy::too_many_arguments)]
    fn end_hold(
        &mut self,
        tree: &TreeId,
        hold_id: &str,
        (state, settled): (HoldState, u64),
        now: u64,
        reason: &str,
        details: &str,
        by: &str,
    ) {
        let Some(hold) = self.holds.get_mut(hold_id) else { return };
        if !matches!(hold.state, HoldState::Open | HoldState::Unknown | HoldState::PendingApproval) {
            return;
        }
        let mut reason = reason;
        if hold.state == HoldState::PendingApproval {
            if let Some(a) = hold.approval.as_mut() {
                a.state = match state {
                    HoldState::Expired => {
                        reason = "approval_expired";
                        ApprovalState::Expired
                    }
                    _ if reason == "approval_denied" => ApprovalState::Denied,
                    _ => ApprovalState::Canceled,
                };
            }
        }
        if state == HoldState::Settled && hold.new_service_rule {
            self.seen.entry(hold.agent.to_string()).or_default().insert(hold.service.to_ascii_lowercase());
        }
        if let Some(since) = hold.unknown_since_ms {
            self.unknown.remove(&(since, hold_id.to_owned()));
        }
        hold.state = state;
        hold.settled = settled;
        let (agent, amount, expires) = (hold.agent.clone(), hold.amount, hold.expires_at_ms);
        let (task, service, protocol) = (hold.task.clone(), hold.service.clone(), hold.protocol.clone());
        for id in hold.buckets.clone() {
            if let Some(bucket) = self.buckets.get_mut(&id) {
                bucket.held = money(bucket.held.get() - amount);
                bucket.spent = money(bucket.spent.get() + settled);
                bucket.open_holds -= 1;
            }
        }
        for id in hold.counters.clone() {
            if let Some(counter) = self.counters.get_mut(&id) {
                counter.held -= amount;
                counter.spent += settled;
            }
        }
        self.open.remove(&(expires, hold_id.to_owned()));
        let path = self.agents.get(agent.as_str()).map(|a| a.path.clone()).unwrap_or_default();
        for id in &path {
            if let Some(level) = self.agents.get_mut(id.as_str()) {
                level.record.held = Micros::new(level.record.held.get() - amount).unwrap_or_default();
                level.record.spent = Micros::new(level.record.spent.get() + settled).unwrap_or_default();
            }
        }
        let event = match state {
            HoldState::Settled => "settle",
            HoldState::Voided => "void",
            HoldState::Expired | HoldState::Open | HoldState::Unknown | HoldState::PendingApproval => "expire",
        };
        let amt = if state == HoldState::Settled { settled } else { amount };
        self.log(
            tree,
            LogEntry {
                ts_ms: now,
                event: event.into(),
                agent: agent.to_string(),
                task,
                service,
                protocol,
                amount: Some(amt),
                released: Some(amount - settled),
                hold: hold_id.to_owned(),
                reason: reason.into(),
                detail: details.into(),
                by: by.into(),
                ..LogEntry::default()
            },
        );
    }

    /// Releases a pending approval whose time ran out (as `spendcap_hold`'s `lapse_approval`).
    fn lapse_approval(&mut self, tree: &TreeId, id: &str, now: u64) {
        if self.holds.get(id).is_some_and(|h| h.state == HoldState::PendingApproval && h.expires_at_ms <= now) {
            self.end_hold(tree, id, (HoldState::Expired, 0), now, "hold_expired", "", "");
        }
    }

    /// Why the approval rules of the agent and its ancestors hold this payment for approval (the
    /// first matching level's reason, the shortest matching time), and whether any level has a
    /// `new service` rule.
    fn approval_needed(&self, path: &[AgentId], request: &HoldRequest) -> (Option<(&'static str, u64)>, bool) {
        let names = payment_names(&request.service, &request.details);
        let seen =
            self.seen.get(request.agent.as_str()).is_some_and(|s| s.contains(&request.service.to_ascii_lowercase()));
        let (mut out, mut new_rule) = (None, false);
        for id in path {
            let Some(rule) = self.agents.get(id.as_str()).and_then(|a| a.controls.approval.as_ref()) else { continue };
            new_rule |= rule.new_service;
            if let Some(why) = rule.reason(request.amount.get(), request.protocol.as_str(), &names, seen) {
                out = Some(match out {
                    None => (why, rule.ttl_ms),
                    Some((first, ttl)) => (first, rule.ttl_ms.min(ttl)),
                });
            }
        }
        (out, new_rule)
    }

    /// A repeated request whose first one waits (or waited) for approval (`approval_replay` in
    /// the Lua library): approved → the reservation, once; otherwise the approval's state.
    fn approval_replay(
        &mut self,
        tree: &TreeId,
        key: &(String, String),
        hold_id: &HoldId,
        remaining: u64,
        mode: IdempotencyMode,
        now: u64,
    ) -> Result<HoldOutcome, LedgerError> {
        self.lapse_approval(tree, hold_id.as_str(), now);
        let h = self.holds.get(hold_id.as_str()).ok_or_else(|| LedgerError::Corrupt("approval without hold".into()))?;
        let state = h.approval.as_ref().map_or(ApprovalState::Expired, |a| a.state);
        if state != ApprovalState::Approved {
            return h
                .approval_wait(hold_id, state, true)
                .map(HoldOutcome::Approval)
                .ok_or_else(|| LedgerError::Corrupt("approval without rule".into()));
        }
        let grant = Grant {
            hold_id: hold_id.clone(),
            amount: money(h.amount),
            remaining: money(remaining),
            expires_at_ms: h.expires_at_ms,
            replayed: false,
        };
        if let Some(record) = self.idempotency.get_mut(key) {
            record.status = match mode {
                IdempotencyMode::Pending { lease_ms } => {
                    IdemStatus::InFlight { grant: grant.clone(), lease_until_ms: now + lease_ms }
                }
                IdempotencyMode::Final => IdemStatus::Granted(grant.clone()),
            };
        }
        Ok(HoldOutcome::Granted(Grant { replayed: true, ..grant }))
    }

    /// Releases up to `limit` due holds; returns how many it released.
    fn expire_due(&mut self, tree: &TreeId, now: u64, limit: usize) -> usize {
        let due: Vec<String> =
            self.open.iter().take_while(|(expiry, _)| *expiry <= now).take(limit).map(|(_, id)| id.clone()).collect();
        for id in &due {
            self.end_hold(tree, id, (HoldState::Expired, 0), now, "hold_expired", "", "");
        }
        due.len()
    }

    /// Authenticates a caller for the end of a hold it has (a task token that expired or was
    /// revoked since still ends its holds, as `auth_ending` in the Lua library).
    fn auth(&self, agent: &AgentId, caller: &Caller) -> Result<Vec<AgentId>, LedgerError> {
        let a = self.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
        self.check_token(agent, &a.token, caller, None)?;
        Ok(a.path.clone())
    }

    /// Authenticates a caller for anything else: a task token must be live (`auth` with `now` in
    /// the Lua library). Returns the path and the task a task token is for.
    fn auth_live(
        &self,
        agent: &AgentId,
        caller: &Caller,
        now: u64,
    ) -> Result<(Vec<AgentId>, Option<String>), LedgerError> {
        let a = self.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
        let task = self.check_token(agent, &a.token, caller, Some(now))?;
        Ok((a.path.clone(), task))
    }

    /// Decides a hold on the current balances: a refusal (and who refused), the room left, and
    /// the counters a grant charges. The same checks, in the same order, as `spendcap_hold`.
    fn decide(
        &self,
        path: &[AgentId],
        request: &HoldRequest,
        now: u64,
    ) -> (Option<(RefusalReason, String)>, u64, Vec<Charge>) {
        let amount = request.amount.get();
        let levels: Vec<&Agent> = path.iter().filter_map(|id| self.agents.get(id.as_str())).collect();
        if let Some(refusal) = self.gate(path, request.protocol, &request.service, &request.details, now) {
            return (Some(refusal), 0, Vec::new());
        }
        let (mut room, by) = self.available(path);
        if amount > room {
            return (Some((RefusalReason::CapExceeded, by)), room, Vec::new());
        }
        // The tightest of the per-payment, period and per-task limits of every level.
        let mut tight: Option<(u64, RefusalReason, String)> = None;
        let mut consider = |r: u64, reason: RefusalReason, id: &str| {
            if tight.as_ref().is_none_or(|(t, _, _)| r < *t) {
                tight = Some((r, reason, id.to_owned()));
            }
        };
        let mut charges = Vec::new();
        let mut task = request.task.clone();
        for l in &levels {
            let c = &l.controls;
            let id = l.record.id.as_str();
            if let Some(limit) = c.per_payment {
                consider(limit, RefusalReason::PerPaymentLimitExceeded, id);
            }
            for period in Period::COUNTED {
                let Some(limit) = c.limit(period) else { continue };
                let start = period.start_ms(now);
                let counter_id = format!("p:{id}:{}:{start}", period.as_str());
                let used = self.counters.get(&counter_id).map(|c| c.spent + c.held).unwrap_or(0);
                consider(limit.saturating_sub(used), RefusalReason::of_period(period), id);
                charges.push(Charge {
                    id: counter_id,
                    level: id.to_owned(),
                    limit,
                    used,
                    period: Some((period, start)),
                    task: None,
                });
            }
            if let Some(limit) = c.task_cap {
                let counter_id = format!("t:{id}:{}", super::task_digest(&task));
                let used = self.counters.get(&counter_id).map(|c| c.spent + c.held).unwrap_or(0);
                consider(limit.saturating_sub(used), RefusalReason::TaskCapExceeded, id);
                charges.push(Charge {
                    id: counter_id,
                    level: id.to_owned(),
                    limit,
                    used,
                    period: None,
                    task: Some(task.clone()),
                });
            }
            if let Some(parent_task) = &l.record.task_of {
                task = parent_task.clone();
            }
        }
        if let Some((tight, reason, by)) = tight {
            if amount > tight {
                return (Some((reason, by)), tight, Vec::new());
            }
            room = room.min(tight);
        }
        for id in &request.buckets {
            let Some(b) = self.buckets.get(id) else { continue };
            let b_room = b.cap.get().saturating_sub(b.spent.get() + b.held.get());
            if b.exclusive && b.open_holds > 0 {
                return (Some((RefusalReason::BudgetBusy, id.clone())), 0, Vec::new());
            }
            if amount > b_room {
                return (Some((RefusalReason::BudgetExceeded, id.clone())), b_room, Vec::new());
            }
            room = room.min(b_room);
        }
        (None, room, charges)
    }

    /// The checks of a payment that need no amount, in `spendcap_hold`'s order: revoked,
    /// suspended, expired (any level), then the protocol and service lists.
    fn gate(
        &self,
        path: &[AgentId],
        protocol: Protocol,
        service: &str,
        details: &str,
        now: u64,
    ) -> Option<(RefusalReason, String)> {
        let levels: Vec<&Agent> = path.iter().filter_map(|id| self.agents.get(id.as_str())).collect();
        if let Some(l) = levels.iter().find(|l| l.record.revoked.is_some()) {
            return Some((RefusalReason::AgentRevoked, l.record.id.to_string()));
        }
        if let Some(l) = levels.iter().find(|l| l.record.suspended.is_some()) {
            return Some((RefusalReason::AgentSuspended, l.record.id.to_string()));
        }
        if let Some(l) = levels.iter().find(|l| l.record.expires_at_ms.is_some_and(|t| t <= now)) {
            return Some((RefusalReason::AgentExpired, l.record.id.to_string()));
        }
        let names = payment_names(service, details);
        for l in &levels {
            match l.controls.list_refusal(protocol.as_str(), &names) {
                Some("protocol_denied") => return Some((RefusalReason::ProtocolDenied, l.record.id.to_string())),
                Some(_) => return Some((RefusalReason::ServiceDenied, l.record.id.to_string())),
                None => {}
            }
        }
        None
    }

    /// The agent's own runaway-loop breaker, for a hold that would otherwise be granted: the
    /// suspension reason and rule (JSON) if it trips. Forgets spends that left the window.
    fn breaker(&mut self, agent: &AgentId, request: &HoldRequest, now: u64) -> Option<(&'static str, String)> {
        let a = self.agents.get_mut(agent.as_str())?;
        let c = &a.controls;
        if c.max_holds.is_none() && c.max_repeats.is_none() {
            return None;
        }
        let b = &mut a.breaker;
        if let (Some(max), Some(window)) = (c.max_holds, c.window_ms) {
            if b.holds.get(max as usize - 1).is_some_and(|t| *t + window > now) {
                return Some(("velocity", format!(r#"{{"rule":"holds","max_holds":{max},"window_ms":{window}}}"#)));
            }
        }
        if let (Some(max), Some(window)) = (c.max_spend, c.spend_window_ms) {
            while b.spends.back().is_some_and(|(t, _)| *t + window <= now) {
                if let Some((_, amount)) = b.spends.pop_back() {
                    b.spend_sum -= amount;
                }
            }
            if b.spend_sum + request.amount.get() > max {
                return Some((
                    "velocity",
                    format!(r#"{{"rule":"spend","max_spend":{max},"spend_window_ms":{window}}}"#),
                ));
            }
        }
        if let Some(max) = c.max_repeats {
            let sig = format!("{}\n{}", request.service, request.amount.get());
            let count = if b.last.as_deref() == Some(sig.as_str()) { b.repeats + 1 } else { 1 };
            if count > max as u64 {
                return Some(("repeat", format!(r#"{{"rule":"repeat","max_repeats":{max}}}"#)));
            }
        }
        None
    }

    /// Records a granted hold in the agent's breaker memory.
    fn remember(&mut self, agent: &AgentId, request: &HoldRequest, now: u64) {
        let Some(a) = self.agents.get_mut(agent.as_str()) else { return };
        let c = &a.controls;
        if c.max_holds.is_none() && c.max_repeats.is_none() {
            return;
        }
        let b = &mut a.breaker;
        if let Some(max) = c.max_holds {
            b.holds.push_front(now);
            b.holds.truncate(max as usize);
        }
        if c.max_spend.is_some() {
            b.spends.push_front((now, request.amount.get()));
            b.spend_sum += request.amount.get();
        }
        let sig = format!("{}\n{}", request.service, request.amount.get());
        b.repeats = if b.last.as_deref() == Some(sig.as_str()) { b.repeats + 1 } else { 1 };
        b.last = Some(sig);
    }

    /// The smallest headroom over the path, and the agent it belongs to.
    fn available(&self, path: &[AgentId]) -> (u64, String) {
        let mut best: Option<(u64, String)> = None;
        for id in path {
            let Some(level) = self.agents.get(id.as_str()) else { continue };
            let r = &level.record;
            let room = r.cap.get().saturating_sub(r.spent.get() + r.held.get());
            if best.as_ref().is_none_or(|(b, _)| room < *b) {
                best = Some((room, id.to_string()));
            }
        }
        best.unwrap_or((0, String::new()))
    }
}

/// The checks `spendcap_set_controls` and `spendcap_create_agent` make.
fn check_setup(controls: &Controls, alerts: &[u8]) -> Result<(), LedgerError> {
    controls.validate().map_err(|e| LedgerError::InvalidArgument(e.to_string()))?;
    controls::validate_alerts(alerts).map_err(|e| LedgerError::InvalidArgument(e.to_string()))
}

fn lease_ms(mode: IdempotencyMode) -> u64 {
    match mode {
        IdempotencyMode::Final => 0,
        IdempotencyMode::Pending { lease_ms } => lease_ms,
    }
}

fn money(value: u64) -> Micros {
    // Every stored amount was checked on the way in and every sum is bounded by a cap.
    Micros::new(value).unwrap_or(Micros::MAX)
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this file; the maps are still
        // consistent at every await-free step, so keep serving rather than poisoning forever.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        Ok(())
    }

    pub async fn create_agent(&self, now_ms: u64, new: &NewAgent) -> Result<(), LedgerError> {
        self.create_agent_with(now_ms, new, &AgentSetup::default()).await
    }

    pub async fn create_agent_with(&self, now_ms: u64, new: &NewAgent, setup: &AgentSetup) -> Result<(), LedgerError> {
        check_setup(&setup.controls, &setup.alerts)?;
        if setup.task_of.is_some() && new.parent.is_none() {
            return Err(LedgerError::InvalidArgument(
                "only a sub-agent can be created for a task of its parent".into(),
            ));
        }
        let mut state = self.lock();
        insert_agent(&mut state, now_ms, new, setup, "", &setup.by)
    }
}

/// Creates an agent in `state` (the part of `create_agent_with` after its argument checks);
/// `reason` and `by` go on the `create` log entry (`sub_agent` and `agent:<parent>` for one an
/// agent created).
fn insert_agent(
    state: &mut State,
    now_ms: u64,
    new: &NewAgent,
    setup: &AgentSetup,
    reason: &str,
    by: &str,
) -> Result<(), LedgerError> {
    {
        if state.handles.contains_key(&new.handle) {
            return Err(LedgerError::HandleTaken);
        }
        let tree_id = new.id.tree().clone();
        let tree = state.trees.entry(tree_id.clone()).or_default();
        if tree.agents.contains_key(new.id.as_str()) {
            return Err(LedgerError::AgentExists);
        }
        let mut path = vec![new.id.clone()];
        let mut depth = 1;
        if let Some(parent) = &new.parent {
            let p = tree.agents.get(parent.as_str()).ok_or(LedgerError::UnknownParent)?;
            depth = p.record.depth + 1;
            if depth > MAX_DEPTH {
                return Err(LedgerError::TreeTooDeep);
            }
            path.extend(p.path.iter().cloned());
        }
        let labels = serde_json::to_string(&new.labels).unwrap_or_default();
        tree.agents.insert(
            new.id.to_string(),
            Agent {
                attrs: BTreeMap::new(),
                record: AgentRecord {
                    id: new.id.clone(),
                    handle: new.handle.clone(),
                    parent: new.parent.clone(),
                    depth,
                    cap: new.cap,
                    spent: Micros::ZERO,
                    held: Micros::ZERO,
                    revoked: None,
                    revoked_at_ms: None,
                    expires_at_ms: new.expires_at_ms,
                    created_at_ms: now_ms,
                    labels: new.labels.clone(),
                    suspended: None,
                    suspended_at_ms: None,
                    task_of: setup.task_of.clone(),
                    archived_at_ms: None,
                },
                path,
                token: new.token_hash.clone(),
                controls: setup.controls.clone(),
                alerts: setup.alerts.clone(),
                alerted: None,
                breaker: Breaker::default(),
            },
        );
        if new.parent.is_none() && tree.group.is_none() {
            tree.group = Some(AlertGroup { delivered: tree.log.len(), pending: BTreeMap::new() });
        }
        tree.log(
            &tree_id,
            LogEntry {
                ts_ms: now_ms,
                event: "create".into(),
                agent: new.id.to_string(),
                cap: Some(new.cap.get()),
                parent: new.parent.as_ref().map(AgentId::to_string).unwrap_or_default(),
                task: setup.task_of.clone().unwrap_or_default(),
                detail: labels,
                reason: reason.into(),
                by: by.to_owned(),
                ..LogEntry::default()
            },
        );
        state.handles.insert(new.handle.clone(), new.id.clone());
        Ok(())
    }
}

impl MemoryLedger {
    fn with_tree<T>(
        &self,
        tree: &TreeId,
        f: impl FnOnce(&mut Tree) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut state = self.lock();
        let tree = state.trees.get_mut(tree).ok_or(LedgerError::UnknownAgent)?;
        f(tree)
    }

    pub async fn set_cap(&self, now_ms: u64, agent: &AgentId, cap: Micros) -> Result<Micros, LedgerError> {
        self.set_cap_as(now_ms, agent, cap, &Actor::default()).await
    }

    pub async fn set_cap_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        cap: Micros,
        actor: &Actor,
    ) -> Result<Micros, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            if !tree.agents.contains_key(agent.as_str()) {
                return Err(LedgerError::UnknownAgent);
            }
            tree.expire_due(tree_id, now_ms, EXPIRE_MAX);
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            if actor.tighten_only && cap > a.record.cap {
                return Err(LedgerError::RoleForbidden(format!(
                    "this token may only lower a cap (it is {})",
                    a.record.cap.get()
                )));
            }
            let committed = a.record.spent.get() + a.record.held.get();
            if cap.get() < committed {
                return Err(LedgerError::CapBelowCommitted { committed });
            }
            let previous = a.record.cap;
            a.record.cap = cap;
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "cap".into(),
                    agent: agent.to_string(),
                    cap: Some(cap.get()),
                    amount: Some(previous.get()),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(previous)
        })
    }

    pub async fn set_controls(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
    ) -> Result<(), LedgerError> {
        self.set_controls_as(now_ms, agent, controls, None, &Actor::default()).await
    }

    pub async fn set_controls_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
        expected: Option<&Controls>,
        actor: &Actor,
    ) -> Result<(), LedgerError> {
        check_setup(&controls.controls, &controls.alerts)?;
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            if expected.is_some_and(|e| e.to_wire() != a.controls.to_wire()) {
                return Err(LedgerError::ChangedMeanwhile);
            }
            a.controls = controls.controls.clone();
            a.alerts = controls.alerts.clone();
            let wire = controls.controls.to_wire();
            let shown = if wire.is_empty() { "null".to_owned() } else { wire };
            let alerts = serde_json::to_string(&controls::alerts_to_wire(&controls.alerts)).unwrap_or_default();
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "controls".into(),
                    agent: agent.to_string(),
                    detail: format!(r#"{{"controls":{shown},"alerts":{alerts}}}"#),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(())
        })
    }

    pub async fn controls(&self, agent: &AgentId) -> Result<AgentControls, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let a = tree.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            Ok(AgentControls { controls: a.controls.clone(), alerts: a.alerts.clone() })
        })
    }

    pub async fn set_expiry(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
    ) -> Result<Option<u64>, LedgerError> {
        self.set_expiry_as(now_ms, agent, expires_at_ms, &Actor::default()).await
    }

    pub async fn set_expiry_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
        actor: &Actor,
    ) -> Result<Option<u64>, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            let later = match (expires_at_ms, a.record.expires_at_ms) {
                (None, _) => true,
                (Some(new), Some(old)) => new > old,
                (Some(_), None) => false,
            };
            if actor.tighten_only && later {
                return Err(LedgerError::RoleForbidden("this token may only make an expiry earlier".into()));
            }
            let previous = std::mem::replace(&mut a.record.expires_at_ms, expires_at_ms);
            let shown = expires_at_ms.map(|t| t.to_string()).unwrap_or_else(|| "null".into());
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "expiry".into(),
                    agent: agent.to_string(),
                    detail: format!(r#"{{"expires_at_ms":{shown}}}"#),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(previous)
        })
    }

    pub async fn reinstate(&self, now_ms: u64, agent: &AgentId) -> Result<Option<String>, LedgerError> {
        self.reinstate_as(now_ms, agent, &Actor::default()).await
    }

    pub async fn reinstate_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<Option<String>, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            let Some(was) = a.record.suspended.take() else { return Ok(None) };
            a.record.suspended_at_ms = None;
            a.breaker = Breaker::default();
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "reinstate".into(),
                    agent: agent.to_string(),
                    reason: was.clone(),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(Some(was))
        })
    }

    pub async fn periods(&self, agent: &AgentId, limit: usize) -> Result<Vec<PeriodUsage>, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let Some(index) = tree.periods.get(agent.as_str()) else { return Ok(Vec::new()) };
            Ok(index
                .iter()
                .rev()
                .take(limit.max(1))
                .map(|(start, period)| {
                    let id = format!("p:{agent}:{}:{start}", period.as_str());
                    let c = tree.counters.get(&id);
                    PeriodUsage {
                        period: *period,
                        start_ms: *start,
                        end_ms: period.end_ms(*start),
                        spent: money(c.map(|c| c.spent).unwrap_or(0)),
                        held: money(c.map(|c| c.held).unwrap_or(0)),
                    }
                })
                .collect())
        })
    }

    pub async fn task_usage(&self, agent: &AgentId, task: &str) -> Result<Option<(Micros, Micros)>, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let id = format!("t:{agent}:{}", super::task_digest(task));
            Ok(tree.counters.get(&id).map(|c| (money(c.spent), money(c.held))))
        })
    }

    pub async fn ensure_alert_group(&self, tree_id: &TreeId) -> Result<(), LedgerError> {
        let mut state = self.lock();
        let tree = state.trees.entry(tree_id.clone()).or_default();
        if tree.group.is_none() {
            tree.group = Some(AlertGroup { delivered: tree.log.len(), pending: BTreeMap::new() });
        }
        Ok(())
    }

    pub async fn read_alerts(
        &self,
        tree_id: &TreeId,
        consumer: &str,
        read: AlertRead,
        count: usize,
    ) -> Result<Vec<LogEntry>, LedgerError> {
        let mut state = self.lock();
        let Some(tree) = state.trees.get_mut(tree_id) else { return Ok(Vec::new()) };
        let Some(group) = tree.group.as_mut() else {
            return Err(LedgerError::InvalidArgument("the tree has no alerts group".into()));
        };
        let now = Instant::now();
        let indexes: Vec<usize> = match read {
            AlertRead::New => {
                let end = (group.delivered + count).min(tree.log.len());
                let fresh: Vec<usize> = (group.delivered..end).collect();
                group.delivered = end;
                fresh
            }
            AlertRead::Pending => {
                group.pending.iter().filter(|(_, (c, _))| c == consumer).map(|(i, _)| *i).take(count).collect()
            }
            AlertRead::Stale { min_idle_ms } => group
                .pending
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at).as_millis() as u64 >= min_idle_ms)
                .map(|(i, _)| *i)
                .take(count)
                .collect(),
        };
        for i in &indexes {
            group.pending.insert(*i, (consumer.to_owned(), now));
        }
        Ok(indexes.into_iter().filter_map(|i| tree.log.get(i).cloned()).collect())
    }

    pub async fn ack_alerts(&self, tree_id: &TreeId, ids: &[String]) -> Result<(), LedgerError> {
        let mut state = self.lock();
        let Some(tree) = state.trees.get_mut(tree_id) else { return Ok(()) };
        let Some(group) = tree.group.as_mut() else { return Ok(()) };
        let log = &tree.log;
        group.pending.retain(|i, _| !log.get(*i).is_some_and(|e| ids.contains(&e.id)));
        Ok(())
    }

    pub async fn revoke(&self, now_ms: u64, agent: &AgentId, reason: &str) -> Result<(u64, bool), LedgerError> {
        self.revoke_as(now_ms, agent, reason, &Actor::default()).await
    }

    pub async fn revoke_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        reason: &str,
        actor: &Actor,
    ) -> Result<(u64, bool), LedgerError> {
        if reason.is_empty()
            || reason.len() > 64
            || !reason.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(LedgerError::InvalidArgument("reason must be 1 to 64 characters of [A-Za-z0-9_.-]".into()));
        }
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            if let Some(at) = a.record.revoked_at_ms.filter(|_| a.record.revoked.is_some()) {
                return Ok((at, true));
            }
            a.record.revoked = Some(reason.to_owned());
            a.record.revoked_at_ms = Some(now_ms);
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "revoke".into(),
                    agent: agent.to_string(),
                    reason: reason.into(),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok((now_ms, false))
        })
    }

    pub async fn archive(&self, now_ms: u64, agent: &AgentId) -> Result<(u64, bool, String), LedgerError> {
        self.archive_as(now_ms, agent, &Actor::default()).await
    }

    pub async fn archive_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<(u64, bool, String), LedgerError> {
        let mut state = self.lock();
        let tree = state.trees.get_mut(agent.tree()).ok_or(LedgerError::UnknownAgent)?;
        let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
        let handle = a.record.handle.clone();
        if let Some(at) = a.record.archived_at_ms {
            return Ok((at, true, handle));
        }
        if a.record.revoked.is_none() {
            a.record.revoked = Some("archived".into());
            a.record.revoked_at_ms = Some(now_ms);
        }
        a.record.archived_at_ms = Some(now_ms);
        tree.log(
            agent.tree(),
            LogEntry {
                ts_ms: now_ms,
                event: "archive".into(),
                agent: agent.to_string(),
                reason: "archived".into(),
                by: actor.by.clone(),
                ..LogEntry::default()
            },
        );
        if state.handles.get(&handle) == Some(agent) {
            state.handles.remove(&handle);
        }
        Ok((now_ms, false, handle))
    }

    pub async fn rotate_token(&self, now_ms: u64, agent: &AgentId, token_hash: &TokenHash) -> Result<(), LedgerError> {
        self.rotate_token_as(now_ms, agent, token_hash, &Actor::default()).await
    }

    pub async fn rotate_token_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        token_hash: &TokenHash,
        actor: &Actor,
    ) -> Result<(), LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            a.token = token_hash.clone();
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "rotate".into(),
                    agent: agent.to_string(),
                    by: actor.by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(())
        })
    }

    pub async fn balance(&self, now_ms: u64, agent: &AgentId, caller: &Caller) -> Result<Balance, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let (path, _) = tree.auth_live(agent, caller, now_ms)?;
            tree.expire_due(tree_id, now_ms, EXPIRE_MAX);
            let (available, limited_by) = tree.available(&path);
            let r = &tree.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?.record;
            Ok(Balance {
                cap: r.cap,
                spent: r.spent,
                held: r.held,
                remaining: money(r.cap.get().saturating_sub(r.spent.get() + r.held.get())),
                available: money(available),
                limited_by,
                revoked: r.revoked.clone(),
                revoked_at_ms: r.revoked_at_ms,
                expires_at_ms: r.expires_at_ms,
                suspended: r.suspended.clone(),
                suspended_at_ms: r.suspended_at_ms,
            })
        })
    }

    /// [`Self::hold`], and with `want_head`, for a new grant, the tree's receipt chain head (as
    /// `spendcap_hold`).
    pub async fn hold_with_head(
        &self,
        now_ms: u64,
        request: &HoldRequest,
        want_head: bool,
    ) -> Result<(HoldOutcome, Option<ChainHead>), LedgerError> {
        let outcome = self.hold(now_ms, request).await?;
        let head = match &outcome {
            HoldOutcome::Granted(grant) if want_head && !grant.replayed => {
                Some(self.chain_head(request.agent.tree()).await?)
            }
            _ => None,
        };
        Ok((outcome, head))
    }

    /// Ends the idempotency record `key` of `agent` if it belongs to `hold` (as `finish_with` in
    /// `spendcap.lua`): `Some(response)` stores the answer of an in-flight or granted record,
    /// `None` releases an in-flight one. True when it did.
    fn finish_with(tree: &mut Tree, agent: &AgentId, key: &str, hold: &HoldId, response: Option<&str>) -> bool {
        let Some(record) = tree.idempotency.get_mut(&(agent.to_string(), key.to_owned())) else { return false };
        let next = match (&record.status, response) {
            (IdemStatus::InFlight { grant, .. } | IdemStatus::Granted(grant), Some(response))
                if &grant.hold_id == hold =>
            {
                IdemStatus::Done(response.to_owned())
            }
            (IdemStatus::InFlight { grant, .. }, None) if &grant.hold_id == hold => IdemStatus::Granted(grant.clone()),
            _ => return false,
        };
        record.status = next;
        true
    }

    pub async fn hold(&self, now_ms: u64, request: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        let tree_id = request.agent.tree();
        let expires_at = request.expires.at(now_ms);
        self.with_tree(tree_id, |tree| {
            let (path, forced_task) = tree.auth_live(&request.agent, &request.caller, now_ms)?;
            // A task-scoped token's payments are that task's, whatever label the request names.
            let forced_request;
            let request = match forced_task {
                Some(task) => {
                    forced_request = HoldRequest { task, ..request.clone() };
                    &forced_request
                }
                None => request,
            };
            let idem_key = request.idempotency.as_ref().map(|i| (request.agent.to_string(), i.key.clone()));
            if let (Some(key), Some(idem)) = (&idem_key, &request.idempotency) {
                if let Some(record) = tree.idempotency.get_mut(key).filter(|r| r.kept_until_ms > now_ms) {
                    if record.fingerprint != idem.fingerprint {
                        return Err(LedgerError::IdempotencyConflict);
                    }
                    // A duplicate (its own new hold id) gets the answer, not the daemon re-asking.
                    let own = match &record.status {
                        IdemStatus::Granted(g) | IdemStatus::InFlight { grant: g, .. } => g.hold_id == request.hold_id,
                        _ => false,
                    };
                    record.replayed |= !own;
                    if let IdemStatus::Approval { hold, remaining } = &record.status {
                        let (hold, remaining) = (hold.clone(), *remaining);
                        return tree.approval_replay(tree_id, key, &hold, remaining, idem.mode, now_ms);
                    }
                    return match &mut record.status {
                        IdemStatus::InFlight { lease_until_ms, .. } if now_ms < *lease_until_ms => {
                            Err(LedgerError::IdempotencyInFlight)
                        }
                        IdemStatus::InFlight { grant, lease_until_ms } => {
                            // The first caller's lease ran out: take it over, same hold.
                            *lease_until_ms = now_ms + lease_ms(idem.mode);
                            Ok(HoldOutcome::Granted(Grant { replayed: true, ..grant.clone() }))
                        }
                        IdemStatus::Done(response) => Ok(HoldOutcome::Finished { response: response.clone() }),
                        IdemStatus::Granted(grant) => {
                            Ok(HoldOutcome::Granted(Grant { replayed: true, ..grant.clone() }))
                        }
                        IdemStatus::Refused(refusal) => {
                            Ok(HoldOutcome::Refused(Refusal { replayed: true, ..refusal.clone() }))
                        }
                        IdemStatus::Approval { .. } => Err(LedgerError::Corrupt("approval record".into())),
                    };
                }
            }
            if tree.holds.contains_key(request.hold_id.as_str()) {
                return Err(LedgerError::InvalidArgument("hold id already used".into()));
            }
            for id in &request.buckets {
                let owned = tree.buckets.get(id).is_some_and(|b| path.contains(&b.agent));
                if !owned {
                    return Err(LedgerError::UnknownBucket);
                }
            }
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            let amount = request.amount.get();
            let (mut refusal, mut room, mut charges) = tree.decide(&path, request, now_ms);
            let retried = matches!(
                refusal,
                Some((
                    RefusalReason::CapExceeded
                        | RefusalReason::BudgetExceeded
                        | RefusalReason::BudgetBusy
                        | RefusalReason::PerPaymentLimitExceeded
                        | RefusalReason::DailyLimitExceeded
                        | RefusalReason::WeeklyLimitExceeded
                        | RefusalReason::MonthlyLimitExceeded
                        | RefusalReason::AllTimeLimitExceeded
                        | RefusalReason::TaskCapExceeded,
                    _
                ))
            );
            if retried {
                let mut released = 0;
                loop {
                    let n = tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
                    released += n;
                    if n < EXPIRE_BATCH || released >= EXPIRE_MAX {
                        break;
                    }
                }
                if released > 0 {
                    (refusal, room, charges) = tree.decide(&path, request, now_ms);
                }
            }
            if refusal.is_none() {
                if let Some((reason, rule)) = tree.breaker(&request.agent, request, now_ms) {
                    if let Some(a) = tree.agents.get_mut(request.agent.as_str()) {
                        a.record.suspended = Some(reason.to_owned());
                        a.record.suspended_at_ms = Some(now_ms);
                    }
                    tree.log(
                        tree_id,
                        LogEntry {
                            ts_ms: now_ms,
                            event: "suspend".into(),
                            agent: request.agent.to_string(),
                            task: request.task.clone(),
                            service: request.service.clone(),
                            protocol: request.protocol.to_string(),
                            amount: Some(amount),
                            reason: reason.into(),
                            detail: rule,
                            ..LogEntry::default()
                        },
                    );
                    refusal = Some((RefusalReason::AgentSuspended, request.agent.to_string()));
                }
            }
            let (approval, new_service_rule) = match refusal {
                None => tree.approval_needed(&path, request),
                Some(_) => (None, false),
            };
            let mut approval_remaining = 0;
            let outcome = match refusal {
                Some((reason, by)) => {
                    let remaining = match reason {
                        RefusalReason::AgentRevoked
                        | RefusalReason::AgentExpired
                        | RefusalReason::AgentSuspended
                        | RefusalReason::ProtocolDenied
                        | RefusalReason::ServiceDenied => 0,
                        _ => room,
                    };
                    tree.log(
                        tree_id,
                        LogEntry {
                            ts_ms: now_ms,
                            event: "refuse".into(),
                            agent: request.agent.to_string(),
                            task: request.task.clone(),
                            service: request.service.clone(),
                            protocol: request.protocol.to_string(),
                            amount: Some(amount),
                            reason: reason.code().into(),
                            remaining: Some(remaining),
                            limited_by: by.clone(),
                            detail: request.details.clone(),
                            ..LogEntry::default()
                        },
                    );
                    HoldOutcome::Refused(Refusal {
                        reason,
                        requested: request.amount,
                        remaining: money(remaining),
                        limited_by: by,
                        replayed: false,
                    })
                }
                None => {
                    let mut crossings: Vec<Crossing> = Vec::new();
                    for id in &path {
                        if let Some(level) = tree.agents.get_mut(id.as_str()) {
                            let before = level.record.spent.get() + level.record.held.get();
                            level.record.held = money(level.record.held.get() + amount);
                            let cap = level.record.cap.get();
                            let fired = crossed(&level.alerts, cap, before, before + amount, level.alerted);
                            for percent in &fired {
                                crossings.push(Crossing {
                                    agent: id.to_string(),
                                    limit: "cap".into(),
                                    period_start_ms: None,
                                    task: None,
                                    percent: *percent,
                                    limit_micros: cap,
                                    used_micros: before + amount,
                                });
                            }
                            if let Some(top) = fired.last() {
                                level.alerted = Some((*top, cap));
                            }
                        }
                    }
                    for charge in &charges {
                        let alerts = tree.agents.get(&charge.level).map(|a| a.alerts.clone()).unwrap_or_default();
                        let counter = tree.counters.entry(charge.id.clone()).or_default();
                        counter.held += amount;
                        let fired = crossed(&alerts, charge.limit, charge.used, charge.used + amount, counter.alerted);
                        if let Some(top) = fired.last() {
                            counter.alerted = Some((*top, charge.limit));
                        }
                        for percent in fired {
                            crossings.push(Crossing {
                                agent: charge.level.clone(),
                                limit: charge.period.map(|(p, _)| p.as_str()).unwrap_or("task").into(),
                                period_start_ms: charge.period.map(|(_, start)| start),
                                task: charge.task.clone(),
                                percent,
                                limit_micros: charge.limit,
                                used_micros: charge.used + amount,
                            });
                        }
                        if let Some((period, start)) = charge.period {
                            tree.periods.entry(charge.level.clone()).or_default().insert((start, period));
                        }
                    }
                    tree.remember(&request.agent, request, now_ms);
                    for id in &request.buckets {
                        if let Some(bucket) = tree.buckets.get_mut(id) {
                            bucket.held = money(bucket.held.get() + amount);
                            bucket.open_holds += 1;
                        }
                    }
                    let counters: Vec<String> = charges.iter().map(|c| c.id.clone()).collect();
                    // A payment that needs approval waits until then; once approved, it lives its
                    // own lifetime from the decision on.
                    let (state, hold_expires, hold_approval) = match approval {
                        Some((reason, ttl_ms)) => (
                            HoldState::PendingApproval,
                            now_ms + ttl_ms,
                            Some(HoldApproval {
                                reason: reason.to_owned(),
                                state: ApprovalState::Pending,
                                expires_at_ms: now_ms + ttl_ms,
                                life_ms: expires_at.saturating_sub(now_ms).max(1),
                                by: String::new(),
                                note: String::new(),
                                decided_at_ms: None,
                            }),
                        ),
                        None => (HoldState::Open, expires_at, None),
                    };
                    if hold_approval.is_some() {
                        let week = 7 * 24 * 3_600_000;
                        tree.approvals.retain(|(at, _)| *at + week > now_ms);
                        tree.approvals.insert((now_ms, request.hold_id.to_string()));
                    }
                    let (approval_reason, approval_expires) = match &hold_approval {
                        Some(a) => (a.reason.clone(), Some(a.expires_at_ms)),
                        None => (String::new(), None),
                    };
                    tree.holds.insert(
                        request.hold_id.to_string(),
                        Hold {
                            buckets: request.buckets.clone(),
                            counters: counters.clone(),
                            details: request.details.clone(),
                            agent: request.agent.clone(),
                            amount,
                            state,
                            expires_at_ms: hold_expires,
                            settled: 0,
                            part_settled: 0,
                            seq: 0,
                            task: request.task.clone(),
                            service: request.service.clone(),
                            protocol: request.protocol.to_string(),
                            unknown_reason: String::new(),
                            unknown_since_ms: None,
                            created_at_ms: now_ms,
                            new_service_rule,
                            approval: hold_approval,
                        },
                    );
                    tree.open.insert((hold_expires, request.hold_id.to_string()));
                    let crossings = if crossings.is_empty() {
                        String::new()
                    } else {
                        serde_json::to_string(&crossings).unwrap_or_default()
                    };
                    tree.log(
                        tree_id,
                        LogEntry {
                            ts_ms: now_ms,
                            event: "hold".into(),
                            agent: request.agent.to_string(),
                            task: request.task.clone(),
                            service: request.service.clone(),
                            protocol: request.protocol.to_string(),
                            amount: Some(amount),
                            hold: request.hold_id.to_string(),
                            bucket: request.buckets.join(","),
                            detail: request.details.clone(),
                            counters: counters.join(","),
                            crossings,
                            approval: approval_reason.clone(),
                            approval_expires_ms: approval_expires,
                            ..LogEntry::default()
                        },
                    );
                    match approval_expires {
                        Some(expires_at_ms) => {
                            approval_remaining = room - amount;
                            HoldOutcome::Approval(ApprovalWait {
                                hold_id: request.hold_id.clone(),
                                amount: request.amount,
                                expires_at_ms,
                                reason: approval_reason,
                                state: ApprovalState::Pending,
                                by: String::new(),
                                note: String::new(),
                                replayed: false,
                            })
                        }
                        None => HoldOutcome::Granted(Grant {
                            hold_id: request.hold_id.clone(),
                            amount: request.amount,
                            remaining: money(room - amount),
                            expires_at_ms: expires_at,
                            replayed: false,
                        }),
                    }
                }
            };
            // A refused pending operation had no effect: not recorded, a retry decides afresh.
            let refused_pending = matches!(
                (&outcome, request.idempotency.as_ref().map(|i| i.mode)),
                (HoldOutcome::Refused(_), Some(IdempotencyMode::Pending { .. }))
            );
            if let (Some(key), Some(idem), false) = (idem_key, &request.idempotency, refused_pending) {
                let status = match (&outcome, idem.mode) {
                    (HoldOutcome::Granted(g), IdempotencyMode::Pending { lease_ms }) => {
                        IdemStatus::InFlight { grant: g.clone(), lease_until_ms: now_ms + lease_ms }
                    }
                    (HoldOutcome::Granted(g), IdempotencyMode::Final) => IdemStatus::Granted(g.clone()),
                    (HoldOutcome::Refused(r), _) => IdemStatus::Refused(r.clone()),
                    (HoldOutcome::Finished { response }, _) => IdemStatus::Done(response.clone()),
                    (HoldOutcome::Approval(wait), _) => {
                        IdemStatus::Approval { hold: wait.hold_id.clone(), remaining: approval_remaining }
                    }
                };
                tree.idempotency.insert(
                    key,
                    IdemRecord {
                        fingerprint: idem.fingerprint.clone(),
                        status,
                        kept_until_ms: now_ms + IDEMPOTENCY_RETENTION_MS,
                        replayed: false,
                    },
                );
            }
            Ok(outcome)
        })
    }

    pub async fn forget_unacknowledged(&self, agent: &AgentId, key: &str) -> Result<bool, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let id = (agent.to_string(), key.to_owned());
            if tree.idempotency.get(&id).is_some_and(|r| r.replayed) {
                return Ok(false);
            }
            tree.idempotency.remove(&id);
            Ok(true)
        })
    }

    pub async fn finish_idempotent(
        &self,
        agent: &AgentId,
        key: &str,
        finish: &IdempotencyFinish,
    ) -> Result<(), LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let record = tree
                .idempotency
                .get_mut(&(agent.to_string(), key.to_owned()))
                .ok_or_else(|| LedgerError::InvalidArgument("unknown idempotency key".into()))?;
            record.status = match (finish, &record.status) {
                (IdempotencyFinish::Done(response), _) => IdemStatus::Done(response.clone()),
                (IdempotencyFinish::Release, IdemStatus::InFlight { grant, .. }) => IdemStatus::Granted(grant.clone()),
                (IdempotencyFinish::Release, _) => return Ok(()),
            };
            Ok(())
        })
    }

    pub async fn idempotency_fingerprint(
        &self,
        now_ms: u64,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<String>, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let record = tree.idempotency.get(&(agent.to_string(), key.to_owned()));
            Ok(record.filter(|record| record.kept_until_ms > now_ms).map(|record| record.fingerprint.clone()))
        })
    }

    pub async fn hold_info(&self, agent: &AgentId, hold: &HoldId) -> Result<HoldInfo, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            let h = tree.holds.get(hold.as_str()).filter(|h| &h.agent == agent).ok_or(LedgerError::UnknownHold)?;
            Ok(HoldInfo {
                hold_id: hold.clone(),
                agent: agent.clone(),
                amount: money(h.amount),
                state: match h.state {
                    HoldState::PendingApproval => "pending_approval",
                    HoldState::Open => "open",
                    HoldState::Unknown => "unknown",
                    HoldState::Settled => "settled",
                    HoldState::Voided => "voided",
                    HoldState::Expired => "expired",
                }
                .to_owned(),
                expires_at_ms: h.expires_at_ms,
                settled: (h.state == HoldState::Settled).then(|| money(h.settled)),
                service: h.service.clone(),
                protocol: h.protocol.clone(),
                task: h.task.clone(),
                details: h.details.clone(),
                unknown_reason: h.unknown_reason.clone(),
                unknown_since_ms: h.unknown_since_ms,
                approved_at_ms: h
                    .approval
                    .as_ref()
                    .filter(|a| a.state == ApprovalState::Approved)
                    .and_then(|a| a.decided_at_ms),
            })
        })
    }

    #[allow(clippy::too_many_arguments)] // the ledger's settle arguments, one per FCALL argument
    pub async fn settle(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        details: &str,
        protocol: Option<Protocol>,
        presigned: Option<&ReceiptLink>,
    ) -> Result<SettleOutcome, LedgerError> {
        let (outcome, _) =
            self.settle_finishing(now_ms, agent, caller, hold, amount, details, protocol, presigned, None).await?;
        Ok(outcome)
    }

    /// [`Self::settle`], linking `presigned` when it is exactly this settle's receipt and then
    /// ending `finish`'s idempotency record (as `spendcap_settle` ARGV 8-18).
    #[allow(clippy::too_many_arguments)] // the ledger's settle arguments, one per FCALL argument
    pub async fn settle_finishing(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        details: &str,
        protocol: Option<Protocol>,
        presigned: Option<&ReceiptLink>,
        finish: Option<EndsPurchase<'_>>,
    ) -> Result<(SettleOutcome, bool), LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            tree.auth(agent, caller)?;
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            let h = tree.holds.get(hold.as_str()).filter(|h| &h.agent == agent).ok_or(LedgerError::UnknownHold)?;
            if protocol.is_some_and(|p| h.protocol != p.as_str()) {
                return Err(LedgerError::HoldProtocolMismatch);
            }
            let (state, held, expires_at, settled, seq) = (h.state, h.amount, h.expires_at_ms, h.settled, h.seq);
            let (task, service, protocol) = (h.task.clone(), h.service.clone(), h.protocol.clone());
            let hold_details = h.details.clone();
            if state == HoldState::Settled {
                if settled != amount.get() {
                    return Err(LedgerError::HoldSettled);
                }
                let facts =
                    tree.receipts.get(&seq).cloned().ok_or(LedgerError::Corrupt(format!("no receipt {seq}")))?;
                return Ok((
                    SettleOutcome {
                        seq,
                        amount,
                        released: money(held - settled),
                        replayed: true,
                        linked: false,
                        facts,
                    },
                    false,
                ));
            }
            if matches!(state, HoldState::Open | HoldState::PendingApproval) && expires_at <= now_ms {
                tree.end_hold(tree_id, hold.as_str(), (HoldState::Expired, 0), now_ms, "hold_expired", "", "");
                return Err(LedgerError::HoldExpired);
            }
            if state != HoldState::Open && state != HoldState::Unknown {
                return Err(state.error());
            }
            if amount.get() > held {
                return Err(LedgerError::AmountExceedsHold);
            }
            let seq = tree.receipts.keys().next_back().copied().unwrap_or(0) + 1;
            tree.end_hold(
                tree_id,
                hold.as_str(),
                (HoldState::Settled, amount.get()),
                now_ms,
                "",
                details,
                caller.principal(),
            );
            if let Some(h) = tree.holds.get_mut(hold.as_str()) {
                h.seq = seq;
            }
            let facts = ReceiptFacts {
                tree: tree_id.clone(),
                seq,
                hold: hold.to_string(),
                agent: agent.to_string(),
                amount: amount.get(),
                held,
                task,
                service,
                protocol,
                ts_ms: now_ms,
                details: details.to_owned(),
                hold_details,
                signed: None,
            };
            // The receipt signed ahead is linked only if it states these facts, carries this
            // sequence number and names the chain head (as `link_presigned` in spendcap.lua).
            let mut stored = facts.clone();
            let linked = presigned.is_some_and(|link| {
                let signed_facts = ReceiptFacts {
                    agent: facts.agent.clone(),
                    amount: facts.amount,
                    ts_ms: facts.ts_ms,
                    details: facts.details.clone(),
                    hold: facts.hold.clone(),
                    tree: facts.tree.clone(),
                    ..link.facts.clone()
                };
                signed_facts == facts && tree.head.seq + 1 == seq && tree.head.hash == link.prev_hash
            });
            if let (true, Some(link)) = (linked, presigned) {
                stored.signed = Some(link.signed.clone());
                tree.head = ChainHead { seq, hash: link.hash.clone() };
            }
            tree.receipts.insert(seq, stored);
            let finished =
                linked && finish.is_some_and(|f| MemoryLedger::finish_with(tree, agent, f.key, hold, Some(f.response)));
            Ok((
                SettleOutcome { seq, amount, released: money(held - amount.get()), replayed: false, linked, facts },
                finished,
            ))
        })
    }

    /// As `spendcap_settle_part`: settles `amount` of an open (or `unknown`) hold and keeps it
    /// open for the rest.
    #[allow(clippy::too_many_arguments)] // the same arguments as the Redis ledger's
    pub async fn settle_part(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        total: Micros,
        details: &str,
        protocol: Option<Protocol>,
    ) -> Result<PartSettled, LedgerError> {
        if amount.get() == 0 {
            return Err(LedgerError::InvalidArgument("amount must be greater than 0".into()));
        }
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            tree.auth(agent, caller)?;
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            let h = tree.holds.get(hold.as_str()).filter(|h| &h.agent == agent).ok_or(LedgerError::UnknownHold)?;
            if protocol.is_some_and(|p| h.protocol != p.as_str()) {
                return Err(LedgerError::HoldProtocolMismatch);
            }
            let (before, held) = (h.part_settled, h.amount);
            if total.get() <= before {
                return Ok(PartSettled { amount, remaining: money(held), part_settled: money(before), replayed: true });
            }
            if matches!(h.state, HoldState::Open) && h.expires_at_ms <= now_ms {
                tree.end_hold(tree_id, hold.as_str(), (HoldState::Expired, 0), now_ms, "hold_expired", "", "");
                return Err(LedgerError::HoldExpired);
            }
            tree.lapse_approval(tree_id, hold.as_str(), now_ms);
            let h = tree.holds.get(hold.as_str()).ok_or(LedgerError::UnknownHold)?;
            match h.state {
                HoldState::Open | HoldState::Unknown => {}
                HoldState::PendingApproval => return Err(LedgerError::HoldPendingApproval),
                other => return Err(other.error()),
            }
            if before + amount.get() != total.get() {
                return Err(LedgerError::InvalidArgument(format!(
                    "the hold has settled {before}, so an increment of {} does not reach {}",
                    amount.get(),
                    total.get()
                )));
            }
            if amount.get() > held {
                return Err(LedgerError::AmountExceedsHold);
            }
            let delta = amount.get();
            let (buckets, counters) = (h.buckets.clone(), h.counters.clone());
            let (task, service, hold_protocol) = (h.task.clone(), h.service.clone(), h.protocol.clone());
            for id in buckets {
                if let Some(bucket) = tree.buckets.get_mut(&id) {
                    bucket.held = money(bucket.held.get() - delta);
                    bucket.spent = money(bucket.spent.get() + delta);
                }
            }
            for id in counters {
                if let Some(counter) = tree.counters.get_mut(&id) {
                    counter.held -= delta;
                    counter.spent += delta;
                }
            }
            let path = tree.agents.get(agent.as_str()).map(|a| a.path.clone()).unwrap_or_default();
            for id in &path {
                if let Some(level) = tree.agents.get_mut(id.as_str()) {
                    level.record.held = money(level.record.held.get() - delta);
                    level.record.spent = money(level.record.spent.get() + delta);
                }
            }
            if let Some(h) = tree.holds.get_mut(hold.as_str()) {
                h.amount = held - delta;
                h.part_settled = total.get();
            }
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "psettle".into(),
                    agent: agent.to_string(),
                    task,
                    service,
                    protocol: hold_protocol,
                    amount: Some(delta),
                    released: Some(0),
                    hold: hold.to_string(),
                    detail: details.into(),
                    ..LogEntry::default()
                },
            );
            Ok(PartSettled { amount, remaining: money(held - delta), part_settled: total, replayed: false })
        })
    }

    #[allow(clippy::too_many_arguments)] // the same arguments as the Redis ledger's void
    pub async fn void_detailed(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        protocol: Option<Protocol>,
        detail: &str,
    ) -> Result<(Micros, bool), LedgerError> {
        let (released, replayed, _) =
            self.void_finishing(now_ms, agent, caller, hold, reason, protocol, detail, None).await?;
        Ok((released, replayed))
    }

    /// [`Self::void_detailed`] that also stores `finish`'s answer (as `spendcap_void` ARGV 8-9).
    #[allow(clippy::too_many_arguments)] // the same arguments as the Redis ledger's void
    pub async fn void_finishing(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        protocol: Option<Protocol>,
        detail: &str,
        finish: Option<EndsPurchase<'_>>,
    ) -> Result<(Micros, bool, bool), LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            tree.auth(agent, caller)?;
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            let h = tree.holds.get(hold.as_str()).filter(|h| &h.agent == agent).ok_or(LedgerError::UnknownHold)?;
            // A payment still waiting for approval has signed and sent nothing, whatever its
            // protocol: its agent may withdraw it through the generic void (and repeat that).
            let withdrawn = h.state == HoldState::PendingApproval
                || (h.state == HoldState::Voided
                    && h.approval.as_ref().is_some_and(|a| a.state == ApprovalState::Canceled));
            if protocol.is_some_and(|p| h.protocol != p.as_str()) && !withdrawn {
                return Err(LedgerError::HoldProtocolMismatch);
            }
            let (state, amount, expires_at) = (h.state, h.amount, h.expires_at_ms);
            let finish_now = |tree: &mut Tree| {
                finish.is_some_and(|f| MemoryLedger::finish_with(tree, agent, f.key, hold, Some(f.response)))
            };
            if state == HoldState::Voided {
                return Ok((money(amount), true, finish_now(tree)));
            }
            if matches!(state, HoldState::Open | HoldState::PendingApproval) && expires_at <= now_ms {
                tree.end_hold(tree_id, hold.as_str(), (HoldState::Expired, 0), now_ms, "hold_expired", "", "");
                return Err(LedgerError::HoldExpired);
            }
            if !matches!(state, HoldState::Open | HoldState::Unknown | HoldState::PendingApproval) {
                return Err(state.error());
            }
            tree.end_hold(tree_id, hold.as_str(), (HoldState::Voided, 0), now_ms, reason, detail, caller.principal());
            Ok((money(amount), false, finish_now(tree)))
        })
    }

    pub async fn approval_decide(
        &self,
        now_ms: u64,
        id: &HoldId,
        approve: bool,
        by: &str,
        note: &str,
    ) -> Result<Decided, LedgerError> {
        let tree_id = id.tree();
        self.with_tree(tree_id, |tree| {
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            if tree.holds.get(id.as_str()).is_none_or(|h| h.approval.is_none()) {
                return Err(LedgerError::ApprovalNotFound);
            }
            tree.lapse_approval(tree_id, id.as_str(), now_ms);
            let want = if approve { ApprovalState::Approved } else { ApprovalState::Denied };
            let h = tree.holds.get_mut(id.as_str()).ok_or(LedgerError::ApprovalNotFound)?;
            let Some(a) = h.approval.as_mut() else { return Err(LedgerError::ApprovalNotFound) };
            let decided = |h: &Hold, replayed| Decided {
                state: want,
                agent: h.agent.clone(),
                amount: money(h.amount),
                expires_at_ms: h.expires_at_ms,
                replayed,
            };
            match a.state {
                s if s == want => return Ok(decided(h, true)),
                ApprovalState::Expired => return Err(LedgerError::ApprovalExpired),
                ApprovalState::Pending => {}
                _ => return Err(LedgerError::ApprovalDecided),
            }
            a.by = by.to_owned();
            a.note = note.to_owned();
            a.decided_at_ms = Some(now_ms);
            let detail = serde_json::json!({ "by": by, "note": note }).to_string();
            if approve {
                a.state = ApprovalState::Approved;
                let reason = a.reason.clone();
                let old = h.expires_at_ms;
                h.expires_at_ms = now_ms + a.life_ms;
                h.state = HoldState::Open;
                let new = h.expires_at_ms;
                let entry = LogEntry {
                    ts_ms: now_ms,
                    event: "approve".into(),
                    agent: h.agent.to_string(),
                    task: h.task.clone(),
                    service: h.service.clone(),
                    protocol: h.protocol.clone(),
                    amount: Some(h.amount),
                    hold: id.to_string(),
                    approval: reason,
                    detail,
                    by: by.to_owned(),
                    ..LogEntry::default()
                };
                let out = decided(h, false);
                tree.open.remove(&(old, id.to_string()));
                tree.open.insert((new, id.to_string()));
                tree.log(tree_id, entry);
                Ok(out)
            } else {
                tree.end_hold(tree_id, id.as_str(), (HoldState::Voided, 0), now_ms, "approval_denied", &detail, by);
                let h = tree.holds.get(id.as_str()).ok_or(LedgerError::ApprovalNotFound)?;
                Ok(decided(h, false))
            }
        })
    }

    pub async fn approval(&self, now_ms: u64, id: &HoldId) -> Result<Approval, LedgerError> {
        self.with_tree(id.tree(), |tree| {
            tree.holds
                .get(id.as_str())
                .and_then(|h| h.approval_view(id.as_str(), now_ms))
                .ok_or(LedgerError::ApprovalNotFound)
        })
        .map_err(|e| if matches!(e, LedgerError::UnknownAgent) { LedgerError::ApprovalNotFound } else { e })
    }

    pub async fn approvals(&self, now_ms: u64, tree_id: &TreeId) -> Result<Vec<Approval>, LedgerError> {
        self.with_tree(tree_id, |tree| {
            Ok(tree
                .approvals
                .iter()
                .rev()
                .filter_map(|(_, id)| tree.holds.get(id).and_then(|h| h.approval_view(id, now_ms)))
                .collect())
        })
    }

    pub async fn mark_unknown(&self, now_ms: u64, hold: &HoldId, reason: &str) -> Result<MarkedUnknown, LedgerError> {
        Ok(self.mark_unknown_releasing(now_ms, hold, reason, None).await?.0)
    }

    /// [`Self::mark_unknown`] that also releases the in-flight record `key` of the hold's
    /// purchase (as `spendcap_mark_unknown` ARGV 4).
    pub async fn mark_unknown_releasing(
        &self,
        now_ms: u64,
        hold: &HoldId,
        reason: &str,
        key: Option<&str>,
    ) -> Result<(MarkedUnknown, bool), LedgerError> {
        let tree_id = hold.tree();
        self.with_tree(tree_id, |tree| {
            let h = tree.holds.get_mut(hold.as_str()).ok_or(LedgerError::UnknownHold)?;
            let marked = MarkedUnknown {
                agent: h.agent.clone(),
                amount: money(h.amount),
                replayed: h.state == HoldState::Unknown,
            };
            let release = |tree: &mut Tree, agent: &AgentId| {
                key.is_some_and(|key| MemoryLedger::finish_with(tree, agent, key, hold, None))
            };
            match h.state {
                HoldState::Unknown => {
                    let agent = marked.agent.clone();
                    return Ok((marked, release(tree, &agent)));
                }
                HoldState::Open => {}
                other => return Err(other.error()),
            }
            h.state = HoldState::Unknown;
            h.unknown_reason = reason.to_owned();
            h.unknown_since_ms = Some(now_ms);
            let entry = LogEntry {
                ts_ms: now_ms,
                event: "unknown".into(),
                agent: h.agent.to_string(),
                task: h.task.clone(),
                service: h.service.clone(),
                protocol: h.protocol.clone(),
                amount: Some(h.amount),
                hold: hold.to_string(),
                reason: reason.to_owned(),
                ..LogEntry::default()
            };
            let expires = h.expires_at_ms;
            tree.open.remove(&(expires, hold.to_string()));
            tree.unknown.insert((now_ms, hold.to_string()));
            tree.log(tree_id, entry);
            tree.expire_due(tree_id, now_ms, EXPIRE_BATCH);
            let agent = marked.agent.clone();
            Ok((marked, release(tree, &agent)))
        })
    }

    #[allow(clippy::too_many_arguments)] // the same arguments as the Redis ledger's precheck
    pub async fn precheck(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        protocol: Protocol,
        service: &str,
        task: &str,
    ) -> Result<Option<Refusal>, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let (path, forced_task) = tree.auth_live(agent, caller, now_ms)?;
            let task = forced_task.as_deref().unwrap_or(task);
            let Some((reason, by)) = tree.gate(&path, protocol, service, "", now_ms) else { return Ok(None) };
            tree.log(
                tree_id,
                LogEntry {
                    ts_ms: now_ms,
                    event: "refuse".into(),
                    agent: agent.to_string(),
                    task: task.to_owned(),
                    service: service.to_owned(),
                    protocol: protocol.to_string(),
                    amount: Some(0),
                    reason: reason.code().into(),
                    remaining: Some(0),
                    limited_by: by.clone(),
                    ..LogEntry::default()
                },
            );
            Ok(Some(Refusal {
                reason,
                requested: Micros::ZERO,
                remaining: Micros::ZERO,
                limited_by: by,
                replayed: false,
            }))
        })
    }

    pub async fn note(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        detail: &str,
    ) -> Result<(), LedgerError> {
        self.note_releasing(now_ms, agent, caller, hold, reason, detail, None).await.map(|_| ())
    }

    /// [`Self::note`] that also releases the in-flight record `key` of the hold's purchase (as
    /// `spendcap_note` ARGV 7).
    #[allow(clippy::too_many_arguments)] // the same arguments as the Redis ledger's
    pub async fn note_releasing(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        detail: &str,
        key: Option<&str>,
    ) -> Result<bool, LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            tree.auth_live(agent, caller, now_ms)?;
            let h = tree.holds.get(hold.as_str()).filter(|h| &h.agent == agent).ok_or(LedgerError::UnknownHold)?;
            let entry = LogEntry {
                ts_ms: now_ms,
                event: "note".into(),
                agent: agent.to_string(),
                task: h.task.clone(),
                service: h.service.clone(),
                protocol: h.protocol.clone(),
                amount: Some(h.amount),
                hold: hold.to_string(),
                reason: reason.into(),
                detail: detail.into(),
                ..LogEntry::default()
            };
            tree.log(tree_id, entry);
            Ok(key.is_some_and(|key| MemoryLedger::finish_with(tree, agent, key, hold, None)))
        })
    }

    pub async fn task_outcome(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        task: &str,
        task_type: &str,
        outcome: TaskOutcome,
    ) -> Result<(), LedgerError> {
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            tree.auth_live(agent, caller, now_ms)?;
            if task.is_empty() || task.len() > 128 || task_type.is_empty() || task_type.len() > 64 {
                return Err(LedgerError::InvalidArgument("task is 1 to 128 bytes and task type 1 to 64 bytes".into()));
            }
            let entry = LogEntry {
                ts_ms: now_ms,
                event: "outcome".into(),
                agent: agent.to_string(),
                task: task.into(),
                task_type: task_type.into(),
                reason: outcome.code().into(),
                by: caller.by_for(agent),
                ..LogEntry::default()
            };
            tree.log(tree_id, entry);
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)] // one per FCALL argument, as the ledger's other calls
    pub async fn create_bucket(
        &self,
        now_ms: u64,
        agent: &AgentId,
        id: &str,
        cap: Micros,
        exclusive: bool,
        label: &str,
        by: &str,
    ) -> Result<bool, LedgerError> {
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)) {
            return Err(LedgerError::InvalidArgument(
                "bucket id must be 1 to 128 characters of [A-Za-z0-9_.:-]".into(),
            ));
        }
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            if !tree.agents.contains_key(agent.as_str()) {
                return Err(LedgerError::UnknownAgent);
            }
            if let Some(existing) = tree.buckets.get(id) {
                if &existing.agent == agent && existing.cap == cap && existing.exclusive == exclusive {
                    return Ok(false);
                }
                return Err(LedgerError::BucketExists);
            }
            tree.buckets.insert(
                id.to_owned(),
                Bucket {
                    id: id.to_owned(),
                    agent: agent.clone(),
                    cap,
                    spent: Micros::ZERO,
                    held: Micros::ZERO,
                    open_holds: 0,
                    exclusive,
                    label: label.to_owned(),
                },
            );
            let entry = LogEntry {
                ts_ms: now_ms,
                event: "budget".into(),
                agent: agent.to_string(),
                cap: Some(cap.get()),
                bucket: id.to_owned(),
                detail: label.to_owned(),
                by: by.to_owned(),
                ..LogEntry::default()
            };
            tree.log(tree_id, entry);
            Ok(true)
        })
    }

    pub async fn bucket(&self, tree: &TreeId, id: &str) -> Result<Option<Bucket>, LedgerError> {
        Ok(self.lock().trees.get(tree).and_then(|t| t.buckets.get(id).cloned()))
    }

    pub async fn attr_set_once(
        &self,
        now_ms: u64,
        agent: &AgentId,
        name: &str,
        value: &str,
    ) -> Result<String, LedgerError> {
        if name.is_empty()
            || name.len() > 32
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(LedgerError::InvalidArgument("attribute names are 1 to 32 characters of [a-z0-9_]".into()));
        }
        let tree_id = agent.tree();
        self.with_tree(tree_id, |tree| {
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            if let Some(existing) = a.attrs.get(name) {
                return Ok(existing.clone());
            }
            a.attrs.insert(name.to_owned(), value.to_owned());
            let entry = LogEntry {
                ts_ms: now_ms,
                event: "attr".into(),
                agent: agent.to_string(),
                reason: name.to_owned(),
                ..LogEntry::default()
            };
            tree.log(tree_id, entry);
            Ok(value.to_owned())
        })
    }

    pub async fn attr(&self, agent: &AgentId, name: &str) -> Result<Option<String>, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            Ok(tree.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?.attrs.get(name).cloned())
        })
    }

    pub async fn expire(&self, now_ms: u64, tree_id: &TreeId) -> Result<u64, LedgerError> {
        self.with_tree(tree_id, |tree| Ok(tree.expire_due(tree_id, now_ms, EXPIRE_MAX) as u64))
    }

    pub async fn agent(&self, agent: &AgentId) -> Result<AgentRecord, LedgerError> {
        self.with_tree(agent.tree(), |tree| {
            tree.agents.get(agent.as_str()).map(|a| a.record.clone()).ok_or(LedgerError::UnknownAgent)
        })
    }

    pub async fn agent_by_handle(&self, handle: &str) -> Result<AgentId, LedgerError> {
        self.lock().handles.get(handle).cloned().ok_or(LedgerError::UnknownAgent)
    }

    pub async fn open_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        self.indexed_holds(tree, |t| &t.open).await
    }

    pub async fn unknown_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        self.indexed_holds(tree, |t| &t.unknown).await
    }

    async fn indexed_holds(
        &self,
        tree: &TreeId,
        index: impl Fn(&Tree) -> &BTreeSet<(u64, String)>,
    ) -> Result<Vec<HoldInfo>, LedgerError> {
        let ids: Vec<(String, AgentId)> = {
            let state = self.lock();
            let Some(t) = state.trees.get(tree) else { return Ok(Vec::new()) };
            index(t).iter().filter_map(|(_, id)| t.holds.get(id).map(|h| (id.clone(), h.agent.clone()))).collect()
        };
        let mut holds = Vec::with_capacity(ids.len());
        for (id, agent) in ids {
            let hold: HoldId = id.parse().map_err(|e| LedgerError::Corrupt(format!("open hold id: {e}")))?;
            holds.push(self.hold_info(&agent, &hold).await?);
        }
        Ok(holds)
    }

    pub async fn trees(&self) -> Result<Vec<TreeId>, LedgerError> {
        Ok(self.lock().trees.keys().cloned().collect())
    }

    pub async fn tree_agents(&self, tree: &TreeId) -> Result<Vec<AgentRecord>, LedgerError> {
        let state = self.lock();
        let mut agents: Vec<AgentRecord> =
            state.trees.get(tree).map(|t| t.agents.values().map(|a| a.record.clone()).collect()).unwrap_or_default();
        agents.sort_by(|a, b| (a.depth, a.created_at_ms, &a.handle).cmp(&(b.depth, b.created_at_ms, &b.handle)));
        Ok(agents)
    }

    pub async fn read_log(&self, tree: &TreeId, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let state = self.lock();
        let Some(t) = state.trees.get(tree) else { return Ok(Vec::new()) };
        let start = if after == "0" { 0 } else { t.log.iter().position(|e| e.id == after).map(|i| i + 1).unwrap_or(0) };
        Ok(t.log.iter().skip(start).take(count).cloned().collect())
    }

    pub async fn recent_log(&self, tree: &TreeId, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let state = self.lock();
        let Some(t) = state.trees.get(tree) else { return Ok(Vec::new()) };
        Ok(t.log[t.log.len().saturating_sub(count)..].to_vec())
    }

    pub async fn log_tail(&self, tree: &TreeId) -> Result<String, LedgerError> {
        let state = self.lock();
        Ok(state.trees.get(tree).and_then(|t| t.log.last()).map(|e| e.id.clone()).unwrap_or_else(|| "0".into()))
    }

    pub async fn receipt(&self, tree: &TreeId, seq: u64) -> Result<Option<ReceiptFacts>, LedgerError> {
        Ok(self.lock().trees.get(tree).and_then(|t| t.receipts.get(&seq).cloned()))
    }

    pub async fn chain_head(&self, tree: &TreeId) -> Result<ChainHead, LedgerError> {
        Ok(self.lock().trees.get(tree).map(|t| t.head.clone()).unwrap_or_default())
    }

    pub async fn receipts(&self, tree: &TreeId, from: u64, to: u64) -> Result<Vec<ReceiptFacts>, LedgerError> {
        Ok(self
            .lock()
            .trees
            .get(tree)
            .map(|t| t.receipts.range(from..=to).map(|(_, f)| f.clone()).collect())
            .unwrap_or_default())
    }

    pub async fn link_receipts(
        &self,
        tree_id: &TreeId,
        links: &[ReceiptLink],
    ) -> Result<Result<(), ChainHead>, LedgerError> {
        self.with_tree(tree_id, |tree| {
            let mut head = tree.head.clone();
            let mut pending = Vec::new();
            for link in links {
                let seq = link.facts.seq;
                if head.seq >= seq {
                    continue;
                }
                if head.seq + 1 != seq || head.hash != link.prev_hash {
                    return Ok(Err(head));
                }
                if tree.receipts.get(&seq).is_none_or(|f| f.hold != link.facts.hold) {
                    return Err(LedgerError::InvalidArgument(format!(
                        "receipt {seq} is not for hold {}",
                        link.facts.hold
                    )));
                }
                pending.push((seq, link.signed.clone()));
                head = ChainHead { seq, hash: link.hash.clone() };
            }
            for (seq, signed) in pending {
                if let Some(facts) = tree.receipts.get_mut(&seq) {
                    facts.signed = Some(signed);
                }
            }
            tree.head = head;
            Ok(Ok(()))
        })
    }
}

/// Operator tokens, as `spendcap_operator_create` / `spendcap_operator_revoke` keep them.
impl MemoryLedger {
    pub async fn create_operator(&self, now_ms: u64, operator: &NewOperator, by: &str) -> Result<(), LedgerError> {
        if operator.name.is_empty() {
            return Err(LedgerError::InvalidArgument("name and token are required".into()));
        }
        let mut state = self.lock();
        if state.operator_names.contains_key(&operator.name) {
            return Err(LedgerError::OperatorExists);
        }
        state.operator_names.insert(operator.name.clone(), operator.id.clone());
        state.operators.insert(
            operator.id.clone(),
            OperatorRecord {
                id: operator.id.clone(),
                name: operator.name.clone(),
                role: operator.role,
                tree: operator.tree.clone(),
                token_hash: operator.token_hash.clone(),
                created_at_ms: now_ms,
                created_by: by.to_owned(),
                revoked_at_ms: None,
            },
        );
        let tree = operator.tree.as_ref().map(|t| t.to_string()).unwrap_or_default();
        let fields = [("operator", operator.name.clone()), ("role", operator.role.as_str().to_owned()), ("tree", tree)];
        push_operator_entry(&mut state, now_ms, "operator_create", &fields, by);
        Ok(())
    }

    pub async fn revoke_operator(&self, now_ms: u64, name: &str, by: &str) -> Result<(u64, bool), LedgerError> {
        let mut state = self.lock();
        let id = state.operator_names.get(name).cloned().ok_or(LedgerError::UnknownOperator)?;
        let record = state.operators.get_mut(&id).ok_or(LedgerError::UnknownOperator)?;
        if let Some(at) = record.revoked_at_ms {
            return Ok((at, true));
        }
        record.revoked_at_ms = Some(now_ms);
        push_operator_entry(&mut state, now_ms, "operator_revoke", &[("operator", name.to_owned())], by);
        Ok((now_ms, false))
    }

    pub async fn operator(&self, id: &str) -> Result<Option<OperatorRecord>, LedgerError> {
        Ok(self.lock().operators.get(id).cloned())
    }

    pub async fn operators(&self) -> Result<Vec<OperatorRecord>, LedgerError> {
        let mut all: Vec<OperatorRecord> = self.lock().operators.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    pub async fn read_operator_log(&self, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let state = self.lock();
        let start = match after {
            "0" => 0,
            id => state.operator_log.iter().position(|e| e.id == id).map_or(state.operator_log.len(), |i| i + 1),
        };
        Ok(state.operator_log.iter().skip(start).take(count).cloned().collect())
    }
}

/// Appends an operator audit entry as `spendcap_operator_create`/`_revoke` write it (`fields`:
/// the stream fields besides ts, ev and by), read back as the Redis ledger reads it.
fn push_operator_entry(state: &mut State, now_ms: u64, event: &str, fields: &[(&str, String)], by: &str) {
    let id = format!("{now_ms}-{}", state.operator_log.len());
    let get = |key: &str| match key {
        "ts" => Some(now_ms.to_string()),
        "ev" => Some(event.to_owned()),
        "by" => Some(by.to_owned()),
        _ => fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()),
    };
    let entry = super::operator_log_entry(id, get);
    state.operator_log.push(entry);
}
