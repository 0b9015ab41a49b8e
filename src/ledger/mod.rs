//! The ledger: agents, caps, holds, revocation and the attributed log, behind one interface.
//!
//! Two implementations of the same operations: [`RedisLedger`] (production; every operation is
//! one FCALL of the `spendcap` Redis Functions library in `spendcap.lua`) and [`MemoryLedger`]
//! (`serve --dev` and tests; one mutex). One conformance suite (`tests/it/ledger.rs`) runs
//! against both. They are a closed set, so [`Ledger`] is an enum, not a trait object.
//!
//! Architecture invariant: only this module talks to Redis.

pub mod approval;
pub mod controls;
mod memory;
pub mod nodes;
mod redis;
pub mod standing;

use std::collections::BTreeMap;

use adapters::{Micros, Protocol};
use serde::Serialize;

use crate::identity::{AgentId, HoldId, TokenHash, TreeId};
use crate::roles::Actor;

pub use self::approval::{Approval, ApprovalState, ApprovalWait, Decided};
pub use self::controls::{Controls, ControlsError, Crossing, Period};
pub use self::memory::MemoryLedger;
pub use self::redis::{LedgerClock, RedisConfig, RedisLedger, LIBRARY};
pub use self::standing::{AgentRef, AgentState, Standing};

/// How deep a budget tree may be: an agent and at most 7 ancestors.
pub const MAX_DEPTH: u32 = 8;

/// How long idempotency keys are kept.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Who is calling an agent-scoped operation. Agents are authenticated inside the ledger's atomic
/// step by their token's hash, so a rotated token stops working at once on every instance.
#[derive(Clone, Debug)]
pub enum Caller {
    Agent(TokenHash),
    /// The daemon acts on its own (it has checked whatever needed checking).
    Admin,
    /// An admin-side principal the daemon authenticated (the bootstrap admin token or an
    /// operator token), by its name: the ledger treats it as [`Caller::Admin`] and names it as
    /// `by` on the log entries of the changes it makes (an admin resolving a hold, say).
    Principal(String),
}

impl Caller {
    fn wire(&self) -> &str {
        match self {
            Caller::Agent(hash) => hash.as_str(),
            Caller::Admin | Caller::Principal(_) => "*",
        }
    }

    /// The admin-side principal's name, for the log's `by` ("" for the others).
    fn principal(&self) -> &str {
        match self {
            Caller::Principal(name) => name,
            Caller::Agent(_) | Caller::Admin => "",
        }
    }

    /// Who a change made by this caller about `agent` (its own, or one an agent makes as an
    /// orchestrator) is `by` on the log: `agent:<id>` for an agent token, the principal's name.
    pub fn by_for(&self, agent: &AgentId) -> String {
        match self {
            Caller::Agent(_) => format!("agent:{agent}"),
            Caller::Principal(name) => name.clone(),
            Caller::Admin => String::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewAgent {
    pub id: AgentId,
    pub handle: String,
    pub parent: Option<AgentId>,
    pub cap: Micros,
    pub expires_at_ms: Option<u64>,
    /// Free-form labels, stored and logged as one JSON object.
    pub labels: BTreeMap<String, String>,
    pub token_hash: TokenHash,
}

/// Whether a hold is the whole operation (`Final`) or the first step of one the caller finishes
/// later (`Pending`: x402, ACP and AP2 payments, where a duplicate arriving meanwhile must wait).
/// A pending operation holds a lease; a duplicate that arrives after it ran out (the first
/// caller died) takes it over and gets the same hold back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdempotencyMode {
    Final,
    Pending { lease_ms: u64 },
}

/// How a `Pending` operation ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyFinish {
    /// Finished: duplicates get this response.
    Done(String),
    /// Outcome unknown (a provider's answer was lost): duplicates get the hold back at once, to
    /// finish the same purchase rather than start another.
    Release,
}

/// A purchase's idempotency record, ended by the same call that ends its hold (a settle or a
/// void), so that finishing a purchase is one FCALL: `response` is what duplicates get.
#[derive(Clone, Copy, Debug)]
pub struct EndsPurchase<'a> {
    pub key: &'a str,
    pub response: &'a str,
}

/// A hold as stored, for adapters that resume a purchase (same hold, same authorization).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldInfo {
    pub hold_id: HoldId,
    pub agent: AgentId,
    pub amount: Micros,
    /// `open`, `unknown` (its payment may have moved money; counted until resolved, never
    /// expires), `settled`, `voided` or `expired`.
    pub state: String,
    pub expires_at_ms: u64,
    pub settled: Option<Micros>,
    pub service: String,
    pub protocol: String,
    pub task: String,
    /// The JSON object the hold was made with.
    pub details: String,
    /// Why the outcome is unknown, for an `unknown` hold ('' otherwise).
    pub unknown_reason: String,
    /// When the hold was marked `unknown`.
    pub unknown_since_ms: Option<u64>,
    /// When a person approved the payment, for a hold that waited for approval (its
    /// authorization's validity starts then, not when it was held).
    pub approved_at_ms: Option<u64>,
}

/// What [`Ledger::mark_unknown`] marked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkedUnknown {
    pub agent: AgentId,
    pub amount: Micros,
    /// The hold was already `unknown`; nothing changed.
    pub replayed: bool,
}

#[derive(Clone, Debug)]
pub struct Idempotency {
    pub key: String,
    /// A digest of the request, so that the same key with another request is a conflict.
    pub fingerprint: String,
    pub mode: IdempotencyMode,
}

/// When a hold lapses if nobody settles or voids it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldExpiry {
    /// At this time (ms since the Unix epoch): for a hold tied to something the daemon signed
    /// with a time in it (an x402 `validBefore`, a mandate's `exp`, a delegated token's expiry),
    /// which must outlive exactly that. The daemon signs by its own clock, which the clock guard
    /// keeps within `SPENDCAP_MAX_CLOCK_SKEW_MS` of the ledger's.
    At(u64),
    /// This many milliseconds after the ledger grants it, by the ledger's own clock (a generic
    /// hold's `ttl_secs`, a keyed-API call's timeout): no instance's clock lengthens or
    /// shortens it.
    After(u64),
}

impl HoldExpiry {
    /// The time this expiry falls on when the ledger's clock reads `now_ms`.
    pub fn at(self, now_ms: u64) -> u64 {
        match self {
            HoldExpiry::At(at) => at,
            HoldExpiry::After(ms) => now_ms.saturating_add(ms),
        }
    }

    /// The function library's form: `<ms>` for an absolute time, `+<ms>` for a lifetime.
    pub fn wire(self) -> String {
        match self {
            HoldExpiry::At(at) => at.to_string(),
            HoldExpiry::After(ms) => format!("+{ms}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HoldRequest {
    pub agent: AgentId,
    pub caller: Caller,
    pub hold_id: HoldId,
    pub amount: Micros,
    pub expires: HoldExpiry,
    pub task: String,
    pub service: String,
    pub protocol: Protocol,
    pub idempotency: Option<Idempotency>,
    /// Protocol facts for the log line and receipt, as a JSON object (empty string for none).
    pub details: String,
    /// Extra budgets (see [`Ledger::create_bucket`]) this hold is charged against as well.
    pub buckets: Vec<String>,
}

/// An extra budget that holds can be charged against, atomically with the agent's caps: an AP2
/// open mandate's `payment.budget`, say. `exclusive` allows one open hold at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub id: String,
    pub agent: AgentId,
    pub cap: Micros,
    pub spent: Micros,
    pub held: Micros,
    pub open_holds: u64,
    pub exclusive: bool,
    pub label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    CapExceeded,
    AgentRevoked,
    AgentExpired,
    /// An extra budget (bucket) the hold was charged against has too little left.
    BudgetExceeded,
    /// An exclusive budget already has an open hold.
    BudgetBusy,
    /// The agent (or an ancestor) is suspended: its runaway-loop breaker tripped.
    AgentSuspended,
    /// The protocol is on a deny list or off an allow list of the agent or an ancestor.
    ProtocolDenied,
    /// The service (or payee) is on a deny list or off an allow list.
    ServiceDenied,
    /// The hold is above a per-payment limit.
    PerPaymentLimitExceeded,
    DailyLimitExceeded,
    WeeklyLimitExceeded,
    MonthlyLimitExceeded,
    AllTimeLimitExceeded,
    /// The task's spend + held would pass a per-task cap.
    TaskCapExceeded,
}

impl RefusalReason {
    pub fn code(self) -> &'static str {
        match self {
            RefusalReason::CapExceeded => "cap_exceeded",
            RefusalReason::AgentRevoked => "agent_revoked",
            RefusalReason::AgentExpired => "agent_expired",
            RefusalReason::BudgetExceeded => "budget_exceeded",
            RefusalReason::BudgetBusy => "budget_busy",
            RefusalReason::AgentSuspended => "agent_suspended",
            RefusalReason::ProtocolDenied => "protocol_denied",
            RefusalReason::ServiceDenied => "service_denied",
            RefusalReason::PerPaymentLimitExceeded => "per_payment_limit_exceeded",
            RefusalReason::DailyLimitExceeded => "daily_limit_exceeded",
            RefusalReason::WeeklyLimitExceeded => "weekly_limit_exceeded",
            RefusalReason::MonthlyLimitExceeded => "monthly_limit_exceeded",
            RefusalReason::AllTimeLimitExceeded => "all_time_limit_exceeded",
            RefusalReason::TaskCapExceeded => "task_cap_exceeded",
        }
    }

    /// The refusal a period's limit gives.
    pub fn of_period(period: Period) -> RefusalReason {
        match period {
            Period::PerPayment => RefusalReason::PerPaymentLimitExceeded,
            Period::Daily => RefusalReason::DailyLimitExceeded,
            Period::Weekly => RefusalReason::WeeklyLimitExceeded,
            Period::Monthly => RefusalReason::MonthlyLimitExceeded,
            Period::AllTime => RefusalReason::AllTimeLimitExceeded,
        }
    }

    pub const ALL: [RefusalReason; 14] = [
        RefusalReason::CapExceeded,
        RefusalReason::AgentRevoked,
        RefusalReason::AgentExpired,
        RefusalReason::BudgetExceeded,
        RefusalReason::BudgetBusy,
        RefusalReason::AgentSuspended,
        RefusalReason::ProtocolDenied,
        RefusalReason::ServiceDenied,
        RefusalReason::PerPaymentLimitExceeded,
        RefusalReason::DailyLimitExceeded,
        RefusalReason::WeeklyLimitExceeded,
        RefusalReason::MonthlyLimitExceeded,
        RefusalReason::AllTimeLimitExceeded,
        RefusalReason::TaskCapExceeded,
    ];

    pub fn from_code(code: &str) -> Option<RefusalReason> {
        RefusalReason::ALL.into_iter().find(|r| r.code() == code)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub hold_id: HoldId,
    pub amount: Micros,
    /// What the agent can still hold after this one, counting every ancestor.
    pub remaining: Micros,
    pub expires_at_ms: u64,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub requested: Micros,
    pub remaining: Micros,
    /// The agent (itself or an ancestor) whose cap, revocation or expiry refused the hold.
    pub limited_by: String,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldOutcome {
    Granted(Grant),
    Refused(Refusal),
    /// A `Pending` operation with this idempotency key has finished; this is its stored response.
    Finished {
        response: String,
    },
    /// The payment waits for a person's approval (held, nothing sent), or was denied or lapsed.
    Approval(ApprovalWait),
}

/// The receipt chain head of a tree: the last linked receipt's sequence number and hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

/// What a settle of part of a hold did ([`Ledger::settle_part`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartSettled {
    /// The increment settled by this call.
    pub amount: Micros,
    /// What the hold still holds.
    pub remaining: Micros,
    /// The hold's increments so far, this one included.
    pub part_settled: Micros,
    /// This total was already reached (a retry): nothing moved.
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleOutcome {
    pub seq: u64,
    pub amount: Micros,
    pub released: Micros,
    pub replayed: bool,
    /// The receipt signed before the settle (see [`Ledger::settle_presigned`]) was linked by it.
    pub linked: bool,
    /// What the receipt says, as the settle recorded it.
    pub facts: ReceiptFacts,
}

/// What the ledger recorded about a settle, from which the receipt is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptFacts {
    pub tree: TreeId,
    pub seq: u64,
    pub hold: String,
    pub agent: String,
    pub amount: u64,
    pub held: u64,
    pub task: String,
    pub service: String,
    pub protocol: String,
    pub ts_ms: u64,
    /// The settle's details (settlement transaction, order id, ...), a JSON object or empty.
    pub details: String,
    /// The hold's details (payee, network, session id, ...), a JSON object or empty.
    pub hold_details: String,
    /// The signed receipt JSON, once linked into the chain.
    pub signed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    pub cap: Micros,
    pub spent: Micros,
    pub held: Micros,
    pub remaining: Micros,
    pub available: Micros,
    pub limited_by: String,
    pub revoked: Option<String>,
    pub revoked_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    /// Why the agent is suspended (`velocity`, `repeat`), if it is.
    pub suspended: Option<String>,
    pub suspended_at_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: AgentId,
    pub handle: String,
    pub parent: Option<AgentId>,
    pub depth: u32,
    pub cap: Micros,
    pub spent: Micros,
    pub held: Micros,
    pub revoked: Option<String>,
    pub revoked_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    pub created_at_ms: u64,
    pub labels: BTreeMap<String, String>,
    pub suspended: Option<String>,
    pub suspended_at_ms: Option<u64>,
    /// The parent's task this sub-agent was created for (its holds spend that task's budget).
    pub task_of: Option<String>,
    /// When it was archived (revoked for good, its handle freed; its history kept).
    pub archived_at_ms: Option<u64>,
}

/// What an agent is created with besides [`NewAgent`]: its spending controls and alert
/// thresholds, and the parent's task it works on (if any). The default is none of them, as for
/// an agent created by a raw `FCALL`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSetup {
    /// Who creates it, named as `by` on its `create` log entry (an operator's name or `admin`).
    pub by: String,
    pub controls: Controls,
    /// Alert thresholds in percent of each limit, ascending (e.g. 50, 80, 100).
    pub alerts: Vec<u8>,
    /// A sub-agent created for this task of its parent spends the parent's per-task budget of
    /// it: whatever remains of it, live.
    pub task_of: Option<String>,
}

/// A task-scoped token as stored (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskTokenInfo {
    pub id: String,
    pub agent: AgentId,
    pub task: String,
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    /// The agent that made it (`None`: the admin).
    pub by: Option<String>,
    pub revoked_at_ms: Option<u64>,
}

/// An agent's controls as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentControls {
    pub controls: Controls,
    pub alerts: Vec<u8>,
}

/// Spend in one calendar period of an agent (with the limit configured now, if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodUsage {
    pub period: Period,
    pub start_ms: u64,
    /// `None` for `all_time`.
    pub end_ms: Option<u64>,
    pub spent: Micros,
    pub held: Micros,
}

/// Which entries of a tree's log to read through the `alerts` consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertRead {
    /// Entries never delivered to any consumer (`XREADGROUP ... >`).
    New,
    /// Entries delivered to this consumer and not acknowledged (after a restart).
    Pending,
    /// Entries delivered to any consumer and not acknowledged for at least this long: their
    /// consumer died (`XAUTOCLAIM`).
    Stale { min_idle_ms: u64 },
}

/// The consumer group the daemon's alert consumers share on every tree's log.
pub const ALERT_GROUP: &str = "alerts";

/// One line of the attributed log, as stored. Fields that an event does not use are empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    /// The stream entry id (`<ms>-<seq>`), unique within a tree.
    pub id: String,
    pub tree: String,
    pub ts_ms: u64,
    pub event: String,
    pub agent: String,
    pub task: String,
    pub service: String,
    pub protocol: String,
    pub amount: Option<u64>,
    pub released: Option<u64>,
    pub hold: String,
    pub reason: String,
    pub cap: Option<u64>,
    pub parent: String,
    pub remaining: Option<u64>,
    /// The budget buckets a hold was charged against (comma-separated), or the bucket created.
    pub bucket: String,
    pub detail: String,
    /// The period and per-task counters a hold was charged against (comma-separated ids).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub counters: String,
    /// The alert thresholds a hold crossed: a JSON array of [`Crossing`]s, or empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub crossings: String,
    /// Who refused a hold (an agent or a bucket id).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub limited_by: String,
    /// An `outcome` entry's task type (its outcome is in `reason`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub task_type: String,
    /// A hold that waits for approval (or an `approve` entry): why it needs one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub approval: String,
    /// A hold that waits for approval: when the approval lapses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_expires_ms: Option<u64>,
    /// Who made an admin-side change: an operator's name, or `admin` (the bootstrap token).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub by: String,
}

/// How a task ended, as its agent or orchestrator reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Success,
    Failed,
    Abandoned,
}

impl TaskOutcome {
    pub fn code(self) -> &'static str {
        match self {
            TaskOutcome::Success => "success",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Abandoned => "abandoned",
        }
    }

    pub fn from_code(code: &str) -> Option<TaskOutcome> {
        [TaskOutcome::Success, TaskOutcome::Failed, TaskOutcome::Abandoned].into_iter().find(|o| o.code() == code)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("no such agent")]
    UnknownAgent,
    #[error("token does not match the agent")]
    Unauthorized,
    #[error("the parent agent does not exist in its tree")]
    UnknownParent,
    #[error("an agent with this id already exists")]
    AgentExists,
    #[error("the handle is already taken")]
    HandleTaken,
    #[error("a budget tree is at most {MAX_DEPTH} levels deep")]
    TreeTooDeep,
    #[error("no such hold")]
    UnknownHold,
    #[error("the hold was already settled (for a different amount)")]
    HoldSettled,
    #[error("the hold expired before it was settled; its money was released")]
    HoldExpired,
    #[error("the hold was voided")]
    HoldVoided,
    #[error("the settle amount exceeds the held amount")]
    AmountExceedsHold,
    #[error("the hold belongs to another protocol's payment; only that endpoint can end it")]
    HoldProtocolMismatch,
    #[error("this idempotency key was used with a different request")]
    IdempotencyConflict,
    #[error("a request with this idempotency key is still in progress")]
    IdempotencyInFlight,
    #[error("the cap is below what is already spent + held ({committed} micros)")]
    CapBelowCommitted { committed: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no such budget for this agent")]
    UnknownBucket,
    #[error("a budget with this id exists with other terms")]
    BucketExists,
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
    /// A call that changes state was sent but its answer did not come within the timeout (nor
    /// within the short bound of re-asking): it may or may not have run. `retry_key` is the
    /// idempotency key a retry of the same request resolves it with (a hold's).
    #[error("the ledger did not answer in time; the call may have run: {cause}")]
    OutcomeUnknown { cause: String, retry_key: Option<String> },
    #[error("the ledger answered something unexpected: {0}")]
    Corrupt(String),
    /// The operator token's role does not allow this change (e.g. raising a cap).
    #[error("{0}")]
    RoleForbidden(String),
    /// A compare-and-set found the value changed since it was read.
    #[error("the value changed since it was read; read it again")]
    ChangedMeanwhile,
    #[error("an operator with this name exists (or existed)")]
    OperatorExists,
    #[error("no such operator")]
    UnknownOperator,
    /// This instance's clock is further from the ledger's than `SPENDCAP_MAX_CLOCK_SKEW_MS`: what
    /// it signs (x402 `validBefore`, AP2 `exp`) would not match the ledger's expiry, so it pays
    /// nothing until the clocks agree again.
    #[error(
        "this instance's clock is {offset_ms} ms off the ledger's (at most {max_ms} ms allowed); nothing was paid"
    )]
    ClockSkew { offset_ms: i64, max_ms: u64 },
    /// A sub-agent an agent asked for would be looser than the agent itself (`bound` names which:
    /// `cap`, `expires_at`, a limit or a list). Nothing was created.
    #[error("the sub-agent would exceed its parent ({bound}): {detail}")]
    SubAgentExceedsParent { bound: String, detail: String },
    #[error("an agent creates at most 1000 sub-agents")]
    TooManySubAgents,
    #[error("a task token can pay, but not manage agents or tokens; use the agent's own token")]
    TaskTokenNotAllowed,
    /// The agent named is not a descendant of the calling agent (or does not exist).
    #[error("no such agent under the calling agent")]
    NotDescendant,
    /// The calling agent (or an ancestor, `by`) is revoked, suspended or expired: it manages
    /// nothing. Nothing changed.
    #[error("the calling agent cannot do this while {by} is {}", reason.code().trim_start_matches("agent_"))]
    CallerNotLive { reason: RefusalReason, by: String },
    #[error("this task token has expired")]
    TokenExpired,
    #[error("this task token was revoked")]
    TokenRevoked,
    #[error("no such task token")]
    UnknownToken,
    #[error("a task token with this id exists")]
    TokenExists,
    #[error("no such approval")]
    ApprovalNotFound,
    #[error("the approval's time ran out; its money was released")]
    ApprovalExpired,
    #[error("the approval was already decided otherwise")]
    ApprovalDecided,
    #[error("the hold waits for approval")]
    HoldPendingApproval,
}

impl LedgerError {
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::UnknownAgent => "unknown_agent",
            LedgerError::Unauthorized => "unauthorized",
            LedgerError::UnknownParent => "unknown_parent",
            LedgerError::AgentExists => "agent_exists",
            LedgerError::HandleTaken => "handle_taken",
            LedgerError::TreeTooDeep => "tree_too_deep",
            LedgerError::UnknownHold => "unknown_hold",
            LedgerError::HoldSettled => "hold_settled",
            LedgerError::HoldExpired => "hold_expired",
            LedgerError::HoldVoided => "hold_voided",
            LedgerError::AmountExceedsHold => "amount_exceeds_hold",
            LedgerError::HoldProtocolMismatch => "hold_protocol_mismatch",
            LedgerError::IdempotencyConflict => "idempotency_conflict",
            LedgerError::IdempotencyInFlight => "idempotency_in_flight",
            LedgerError::CapBelowCommitted { .. } => "cap_below_committed",
            LedgerError::InvalidArgument(_) => "invalid_argument",
            LedgerError::UnknownBucket => "unknown_bucket",
            LedgerError::BucketExists => "bucket_exists",
            LedgerError::Unavailable(_) => "ledger_unavailable",
            LedgerError::OutcomeUnknown { .. } => "ledger_outcome_unknown",
            LedgerError::Corrupt(_) => "ledger_corrupt",
            LedgerError::RoleForbidden(_) => "role_forbidden",
            LedgerError::ChangedMeanwhile => "changed_meanwhile",
            LedgerError::OperatorExists => "operator_exists",
            LedgerError::UnknownOperator => "unknown_operator",
            LedgerError::ClockSkew { .. } => "clock_skew",
            LedgerError::SubAgentExceedsParent { .. } => "sub_agent_exceeds_parent",
            LedgerError::TooManySubAgents => "too_many_sub_agents",
            LedgerError::TaskTokenNotAllowed => "task_token_not_allowed",
            LedgerError::NotDescendant => "unknown_agent",
            LedgerError::CallerNotLive { reason, .. } => reason.code(),
            LedgerError::TokenExpired => "token_expired",
            LedgerError::TokenRevoked => "token_revoked",
            LedgerError::UnknownToken => "unknown_token",
            LedgerError::TokenExists => "token_exists",
            LedgerError::ApprovalNotFound => "approval_not_found",
            LedgerError::ApprovalExpired => "approval_expired",
            LedgerError::ApprovalDecided => "approval_decided",
            LedgerError::HoldPendingApproval => "hold_pending_approval",
        }
    }

    /// Maps an `error` reply of the Lua library (or the memory ledger) to the error.
    fn from_code(code: &str, detail: &str) -> LedgerError {
        match code {
            "unknown_agent" => LedgerError::UnknownAgent,
            "unauthorized" => LedgerError::Unauthorized,
            "unknown_parent" => LedgerError::UnknownParent,
            "agent_exists" => LedgerError::AgentExists,
            "tree_too_deep" => LedgerError::TreeTooDeep,
            "unknown_hold" => LedgerError::UnknownHold,
            "hold_settled" => LedgerError::HoldSettled,
            "hold_expired" => LedgerError::HoldExpired,
            "hold_voided" => LedgerError::HoldVoided,
            "amount_exceeds_hold" => LedgerError::AmountExceedsHold,
            "hold_protocol_mismatch" => LedgerError::HoldProtocolMismatch,
            "idempotency_conflict" => LedgerError::IdempotencyConflict,
            "idempotency_in_flight" => LedgerError::IdempotencyInFlight,
            "cap_below_committed" => LedgerError::CapBelowCommitted {
                committed: detail.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0),
            },
            "invalid_argument" | "hold_exists" | "part_out_of_order" => LedgerError::InvalidArgument(detail.to_owned()),
            "unknown_bucket" => LedgerError::UnknownBucket,
            "bucket_exists" => LedgerError::BucketExists,
            "sub_agent_exceeds_parent" => {
                let (bound, detail) = detail.split_once(": ").unwrap_or(("cap", detail));
                LedgerError::SubAgentExceedsParent { bound: bound.to_owned(), detail: detail.to_owned() }
            }
            "too_many_sub_agents" => LedgerError::TooManySubAgents,
            "task_token_not_allowed" => LedgerError::TaskTokenNotAllowed,
            "not_descendant" => LedgerError::NotDescendant,
            "agent_revoked" | "agent_suspended" | "agent_expired" => LedgerError::CallerNotLive {
                reason: RefusalReason::from_code(code).unwrap_or(RefusalReason::AgentRevoked),
                by: detail.to_owned(),
            },
            "token_expired" => LedgerError::TokenExpired,
            "token_revoked" => LedgerError::TokenRevoked,
            "unknown_token" => LedgerError::UnknownToken,
            "token_exists" => LedgerError::TokenExists,
            "approval_not_found" => LedgerError::ApprovalNotFound,
            "approval_expired" => LedgerError::ApprovalExpired,
            "approval_decided" => LedgerError::ApprovalDecided,
            "hold_pending_approval" => LedgerError::HoldPendingApproval,
            "role_forbidden" => LedgerError::RoleForbidden(detail.to_owned()),
            "changed_meanwhile" => LedgerError::ChangedMeanwhile,
            "operator_exists" => LedgerError::OperatorExists,
            "unknown_operator" => LedgerError::UnknownOperator,
            other => LedgerError::Corrupt(format!("unknown error code {other}: {detail}")),
        }
    }
}

/// The ledger the daemon runs on.
pub enum Ledger {
    Redis(RedisLedger),
    Memory(MemoryLedger),
}

/// Dispatches one method call to whichever ledger this is.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Ledger::Redis(l) => l.$method($($arg),*).await,
            Ledger::Memory(l) => l.$method($($arg),*).await,
        }
    };
}

impl Ledger {
    pub fn kind(&self) -> &'static str {
        match self {
            Ledger::Redis(_) => "redis",
            Ledger::Memory(_) => "memory",
        }
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        dispatch!(self.ping())
    }

    /// The ledger's own clock when it has one apart from this process (Redis's `TIME`); `None` for
    /// the in-process ledger, whose clock is this process's.
    pub async fn server_time_ms(&self) -> Result<Option<u64>, LedgerError> {
        match self {
            Ledger::Redis(ledger) => ledger.server_time_ms().await,
            Ledger::Memory(_) => Ok(None),
        }
    }

    /// Creates an agent; reserves its handle first (handles are unique across the ledger).
    pub async fn create_agent(&self, now_ms: u64, agent: &NewAgent) -> Result<(), LedgerError> {
        dispatch!(self.create_agent(now_ms, agent))
    }

    /// Creates an agent with spending controls, alert thresholds and a parent's task, in the
    /// same atomic step.
    pub async fn create_agent_with(
        &self,
        now_ms: u64,
        agent: &NewAgent,
        setup: &AgentSetup,
    ) -> Result<(), LedgerError> {
        dispatch!(self.create_agent_with(now_ms, agent, setup))
    }

    pub async fn set_cap(&self, now_ms: u64, agent: &AgentId, cap: Micros) -> Result<Micros, LedgerError> {
        dispatch!(self.set_cap(now_ms, agent, cap))
    }

    /// An agent (`agent.parent`, authenticated by `caller`) creates a sub-agent under itself,
    /// funded from what it has; refused unless the sub-agent is at most as loose as the caller
    /// (see `spendcap_create_sub_agent`). One atomic step (plus the handle reservation).
    pub async fn create_sub_agent(
        &self,
        now_ms: u64,
        caller: &Caller,
        agent: &NewAgent,
        setup: &AgentSetup,
    ) -> Result<(), LedgerError> {
        dispatch!(self.create_sub_agent(now_ms, caller, agent, setup))
    }

    /// Revokes `agent` on behalf of `by`, which must be one of its ancestors (else `NotDescendant`).
    pub async fn revoke_by(
        &self,
        now_ms: u64,
        by: (&AgentId, &Caller),
        agent: &AgentId,
        reason: &str,
    ) -> Result<(u64, bool), LedgerError> {
        dispatch!(self.revoke_by(now_ms, by, agent, reason))
    }

    /// Stores a task-scoped token of `agent` (by the admin: `by` is `None` and `actor` names the
    /// admin-side principal for the log; or by the agent itself or an ancestor, logged as
    /// `agent:<id>`). Returns its expiry (ms, the ledger's clock).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_task_token(
        &self,
        now_ms: u64,
        by: Option<(&AgentId, &Caller)>,
        actor: &str,
        agent: &AgentId,
        token: &crate::identity::AgentToken,
        task: &str,
        ttl_ms: u64,
    ) -> Result<u64, LedgerError> {
        dispatch!(self.create_task_token(now_ms, by, actor, agent, token, task, ttl_ms))
    }

    /// Revokes a task token (of `agent` when given; by the admin, named `actor` for the log, or
    /// an ancestor-or-self `by`). Returns whether it was revoked already.
    pub async fn revoke_task_token(
        &self,
        now_ms: u64,
        by: Option<(&AgentId, &Caller)>,
        actor: &str,
        tree: &TreeId,
        token_id: &str,
        agent: Option<&AgentId>,
    ) -> Result<bool, LedgerError> {
        dispatch!(self.revoke_task_token(now_ms, by, actor, tree, token_id, agent))
    }

    /// The task tokens of one agent, as stored (a read, not a decision).
    pub async fn task_tokens(&self, agent: &AgentId) -> Result<Vec<TaskTokenInfo>, LedgerError> {
        dispatch!(self.task_tokens(agent))
    }

    /// Replaces the agent's spending controls and alert thresholds (a `controls` log entry).
    pub async fn set_controls(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
    ) -> Result<(), LedgerError> {
        dispatch!(self.set_controls(now_ms, agent, controls))
    }

    pub async fn controls(&self, agent: &AgentId) -> Result<AgentControls, LedgerError> {
        dispatch!(self.controls(agent))
    }

    /// Changes (or, with `None`, removes) the agent's expiry; returns the previous one.
    pub async fn set_expiry(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
    ) -> Result<Option<u64>, LedgerError> {
        dispatch!(self.set_expiry(now_ms, agent, expires_at_ms))
    }

    /// Lifts a suspension; returns the lifted reason (`None`: the agent was not suspended).
    pub async fn reinstate(&self, now_ms: u64, agent: &AgentId) -> Result<Option<String>, LedgerError> {
        dispatch!(self.reinstate(now_ms, agent))
    }

    /// Every calendar period the agent has spent in, newest first, at most `limit`.
    pub async fn periods(&self, agent: &AgentId, limit: usize) -> Result<Vec<PeriodUsage>, LedgerError> {
        dispatch!(self.periods(agent, limit))
    }

    /// Spent and held of the agent's per-task counter for `task` (charged only while the agent
    /// or, through `task_of`, a sub-agent has a per-task cap).
    pub async fn task_usage(&self, agent: &AgentId, task: &str) -> Result<Option<(Micros, Micros)>, LedgerError> {
        dispatch!(self.task_usage(agent, task))
    }

    /// Makes sure the tree's log has the `alerts` consumer group (new trees get it at creation;
    /// an older tree's group starts at its current end).
    pub async fn ensure_alert_group(&self, tree: &TreeId) -> Result<(), LedgerError> {
        dispatch!(self.ensure_alert_group(tree))
    }

    /// Reads log entries through the `alerts` consumer group as `consumer`.
    pub async fn read_alerts(
        &self,
        tree: &TreeId,
        consumer: &str,
        read: AlertRead,
        count: usize,
    ) -> Result<Vec<LogEntry>, LedgerError> {
        dispatch!(self.read_alerts(tree, consumer, read, count))
    }

    /// Acknowledges entries read through the `alerts` group: their alerts were delivered.
    pub async fn ack_alerts(&self, tree: &TreeId, ids: &[String]) -> Result<(), LedgerError> {
        dispatch!(self.ack_alerts(tree, ids))
    }

    pub async fn revoke(&self, now_ms: u64, agent: &AgentId, reason: &str) -> Result<(u64, bool), LedgerError> {
        dispatch!(self.revoke(now_ms, agent, reason))
    }

    /// Archives an agent: revoked for good (reason `archived` unless it was revoked), its handle
    /// freed for a new agent, its history kept. Returns (archived_at, already archived, handle).
    pub async fn archive(&self, now_ms: u64, agent: &AgentId) -> Result<(u64, bool, String), LedgerError> {
        dispatch!(self.archive(now_ms, agent))
    }

    pub async fn rotate_token(&self, now_ms: u64, agent: &AgentId, token_hash: &TokenHash) -> Result<(), LedgerError> {
        dispatch!(self.rotate_token(now_ms, agent, token_hash))
    }

    pub async fn balance(&self, now_ms: u64, agent: &AgentId, caller: &Caller) -> Result<Balance, LedgerError> {
        dispatch!(self.balance(now_ms, agent, caller))
    }

    pub async fn hold(&self, now_ms: u64, request: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        dispatch!(self.hold(now_ms, request))
    }

    /// Decides a waiting payment, exactly once (`spendcap_approval_decide`): approve opens its
    /// hold for the agent's repeated request; deny releases it. `by` and `note` are logged.
    pub async fn approval_decide(
        &self,
        now_ms: u64,
        id: &HoldId,
        approve: bool,
        by: &str,
        note: &str,
    ) -> Result<Decided, LedgerError> {
        dispatch!(self.approval_decide(now_ms, id, approve, by, note))
    }

    /// One approval (a read).
    pub async fn approval(&self, now_ms: u64, id: &HoldId) -> Result<Approval, LedgerError> {
        dispatch!(self.approval(now_ms, id))
    }

    /// A tree's approvals of the last week, newest first (a read).
    pub async fn approvals(&self, now_ms: u64, tree: &TreeId) -> Result<Vec<Approval>, LedgerError> {
        dispatch!(self.approvals(now_ms, tree))
    }

    /// Deletes the idempotency record of `key` unless a duplicate already got its answer: for a
    /// hold whose grant never reached the agent (`unacked.rs`), before voiding it. True: forgotten
    /// (or none), so a retry with the key runs afresh and the hold may be voided; false: a retry
    /// got the hold, which is the agent's now.
    pub async fn forget_unacknowledged(&self, agent: &AgentId, key: &str) -> Result<bool, LedgerError> {
        dispatch!(self.forget_unacknowledged(agent, key))
    }

    pub async fn finish_idempotent(
        &self,
        agent: &AgentId,
        key: &str,
        finish: &IdempotencyFinish,
    ) -> Result<(), LedgerError> {
        dispatch!(self.finish_idempotent(agent, key, finish))
    }

    /// The request fingerprint an idempotency key of `agent` was first used with (`None`: unused
    /// or forgotten), so that a flow can refuse another request under the key before it calls
    /// anyone. A read only: the hold itself decides, atomically.
    pub async fn idempotency_fingerprint(
        &self,
        now_ms: u64,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<String>, LedgerError> {
        dispatch!(self.idempotency_fingerprint(now_ms, agent, key))
    }

    /// The stored hold, if it exists and belongs to `agent`.
    pub async fn hold_info(&self, agent: &AgentId, hold: &HoldId) -> Result<HoldInfo, LedgerError> {
        dispatch!(self.hold_info(agent, hold))
    }

    pub async fn settle(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        details: &str,
    ) -> Result<SettleOutcome, LedgerError> {
        dispatch!(self.settle(now_ms, agent, caller, hold, amount, details, None, None))
    }

    /// Settles `amount` of an open (or `unknown`) hold and keeps it open for the rest: the money
    /// moves from held to spent wherever the hold was charged, the hold holds that much less, and
    /// one `psettle` log entry records it (`spendcap_settle_part`). `total` is the hold's
    /// settled-so-far once this increment is in: a retry naming a total already reached changes
    /// nothing (`replayed`), and one that does not follow on is refused. An MPP session settles
    /// each voucher's increment this way; ending the hold later moves only what is still held.
    /// Like a settle, it is not stopped by a revocation: it is for a charge already made.
    #[allow(clippy::too_many_arguments)]
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
        dispatch!(self.settle_part(now_ms, agent, caller, hold, amount, total, details, protocol))
    }

    /// [`Ledger::settle`], only if the hold was made under `protocol` when one is given (the
    /// generic API must not settle a hold an adapter still answers for: an x402 authorization in
    /// flight, say), that also links `presigned`, a receipt signed before the settle, if it is
    /// exactly this settle's receipt:
    /// the same facts, the sequence number the settle assigns, and the chain head as its
    /// predecessor. Then [`SettleOutcome::linked`] is true and no link call is needed. Any other
    /// receipt is ignored. The in-memory ledger links it by the same rule.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle_presigned(
        &self,
        protocol: Option<Protocol>,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        details: &str,
        presigned: Option<&ReceiptLink>,
    ) -> Result<SettleOutcome, LedgerError> {
        dispatch!(self.settle(now_ms, agent, caller, hold, amount, details, protocol, presigned))
    }

    /// [`Ledger::hold`], and with `want_head`, for a new grant, the tree's receipt chain head as
    /// the hold read it (so that the daemon can sign the hold's receipt ahead even for a tree it
    /// has not linked a receipt of yet; asked only then, since the read costs every hold).
    pub async fn hold_with_head(
        &self,
        now_ms: u64,
        request: &HoldRequest,
        want_head: bool,
    ) -> Result<(HoldOutcome, Option<ChainHead>), LedgerError> {
        dispatch!(self.hold_with_head(now_ms, request, want_head))
    }

    /// [`Ledger::settle_presigned`] that also ends the purchase's idempotency record with
    /// `finish` in the same call when the presigned receipt is linked (the answer names that
    /// receipt, so it is stored only when it is the receipt). The flag says whether it was; if
    /// not, the caller finishes with [`Ledger::finish_idempotent`] as before.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle_finishing(
        &self,
        protocol: Option<Protocol>,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        amount: Micros,
        details: &str,
        presigned: Option<&ReceiptLink>,
        finish: Option<EndsPurchase<'_>>,
    ) -> Result<(SettleOutcome, bool), LedgerError> {
        dispatch!(self.settle_finishing(now_ms, agent, caller, hold, amount, details, protocol, presigned, finish))
    }

    /// [`Ledger::void`] that also ends the purchase's idempotency record with `finish` in the
    /// same call: (released, replayed, finished).
    pub async fn void_finishing(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        finish: Option<EndsPurchase<'_>>,
    ) -> Result<(Micros, bool, bool), LedgerError> {
        dispatch!(self.void_finishing(now_ms, agent, caller, hold, reason, None, "", finish))
    }

    /// [`Ledger::mark_unknown`] that also releases the purchase's in-flight idempotency record
    /// `key` (as [`IdempotencyFinish::Release`]) in the same call; true when it did.
    pub async fn mark_unknown_releasing(
        &self,
        now_ms: u64,
        hold: &HoldId,
        reason: &str,
        key: Option<&str>,
    ) -> Result<(MarkedUnknown, bool), LedgerError> {
        dispatch!(self.mark_unknown_releasing(now_ms, hold, reason, key))
    }

    pub async fn void(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
    ) -> Result<(Micros, bool), LedgerError> {
        dispatch!(self.void_detailed(now_ms, agent, caller, hold, reason, None, ""))
    }

    /// [`Ledger::void`], only if the hold was made under `protocol`.
    pub async fn void_as(
        &self,
        protocol: Protocol,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
    ) -> Result<(Micros, bool), LedgerError> {
        dispatch!(self.void_detailed(now_ms, agent, caller, hold, reason, Some(protocol), ""))
    }

    /// [`Ledger::void`] with a detail JSON object for the log line ('' for none): an admin's
    /// resolution of an `unknown` hold, say.
    #[allow(clippy::too_many_arguments)]
    pub async fn void_detailed(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        detail: &str,
    ) -> Result<(Micros, bool), LedgerError> {
        dispatch!(self.void_detailed(now_ms, agent, caller, hold, reason, None, detail))
    }

    /// Marks an open hold `unknown`: its payment may have moved money (the provider's answer was
    /// lost). It stays counted wherever it was charged and never expires, until a settle or a
    /// void resolves it; one `unknown` log entry records `reason`. Idempotent.
    pub async fn mark_unknown(&self, now_ms: u64, hold: &HoldId, reason: &str) -> Result<MarkedUnknown, LedgerError> {
        dispatch!(self.mark_unknown(now_ms, hold, reason))
    }

    /// The checks of a hold that need no amount — revoked, suspended or expired at any level of
    /// the agent's tree, protocol and service lists — before anything is sent on its behalf.
    /// A refusal is logged (`refuse`, amount 0) exactly as a refused hold is; a pass writes
    /// nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn precheck(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        protocol: Protocol,
        service: &str,
        task: &str,
    ) -> Result<Option<Refusal>, LedgerError> {
        dispatch!(self.precheck(now_ms, agent, caller, protocol, service, task))
    }

    /// Every hold of a tree whose outcome is unknown, oldest first.
    pub async fn unknown_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        dispatch!(self.unknown_holds(tree))
    }

    /// Appends a `note` log entry about a hold without changing any balance.
    pub async fn note(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        hold: &HoldId,
        reason: &str,
        detail: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.note(now_ms, agent, caller, hold, reason, detail))
    }

    /// [`Ledger::note`] that also releases the purchase's in-flight idempotency record `key` (as
    /// [`IdempotencyFinish::Release`]) in the same call; true when it did.
    #[allow(clippy::too_many_arguments)] // one per ledger argument
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
        dispatch!(self.note_releasing(now_ms, agent, caller, hold, reason, detail, key))
    }

    /// Records how a task ended (an `outcome` log entry; no balance changes), for the reports.
    pub async fn task_outcome(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        task: &str,
        task_type: &str,
        outcome: TaskOutcome,
    ) -> Result<(), LedgerError> {
        dispatch!(self.task_outcome(now_ms, agent, caller, task, task_type, outcome))
    }

    /// Creates a budget bucket owned by `agent` (idempotent for identical terms; `Ok(false)`).
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
        dispatch!(self.create_bucket(now_ms, agent, id, cap, exclusive, label, by))
    }

    pub async fn bucket(&self, tree: &TreeId, id: &str) -> Result<Option<Bucket>, LedgerError> {
        dispatch!(self.bucket(tree, id))
    }

    /// Stores `value` as the agent's attribute `name` unless one is set; returns the stored one.
    pub async fn attr_set_once(
        &self,
        now_ms: u64,
        agent: &AgentId,
        name: &str,
        value: &str,
    ) -> Result<String, LedgerError> {
        dispatch!(self.attr_set_once(now_ms, agent, name, value))
    }

    pub async fn attr(&self, agent: &AgentId, name: &str) -> Result<Option<String>, LedgerError> {
        dispatch!(self.attr(agent, name))
    }

    /// Releases due holds of one tree (the optional sweeper; nothing depends on it).
    pub async fn expire(&self, now_ms: u64, tree: &TreeId) -> Result<u64, LedgerError> {
        dispatch!(self.expire(now_ms, tree))
    }

    pub async fn agent(&self, agent: &AgentId) -> Result<AgentRecord, LedgerError> {
        dispatch!(self.agent(agent))
    }

    /// The agent followed by its ancestors up to the root (at most `MAX_DEPTH` records), for
    /// [`Standing::of`]. Several reads, not one atomic step: a view, never a decision.
    pub async fn lineage(&self, agent: &AgentId) -> Result<Vec<AgentRecord>, LedgerError> {
        let mut lineage = vec![self.agent(agent).await?];
        while let Some(parent) = lineage.last().and_then(|r| r.parent.clone()) {
            if lineage.len() >= MAX_DEPTH as usize {
                break;
            }
            lineage.push(self.agent(&parent).await?);
        }
        Ok(lineage)
    }

    /// The agent's effective standing at `now_ms` (its ancestors' revocation, suspension and
    /// expiry counted), with its lineage.
    pub async fn standing(&self, now_ms: u64, agent: &AgentId) -> Result<(Vec<AgentRecord>, Standing), LedgerError> {
        let lineage = self.lineage(agent).await?;
        let standing = Standing::of(&lineage, now_ms);
        Ok((lineage, standing))
    }

    pub async fn agent_by_handle(&self, handle: &str) -> Result<AgentId, LedgerError> {
        dispatch!(self.agent_by_handle(handle))
    }

    /// Every open hold of a tree, as stored (for the audit).
    pub async fn open_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        dispatch!(self.open_holds(tree))
    }

    pub async fn trees(&self) -> Result<Vec<TreeId>, LedgerError> {
        dispatch!(self.trees())
    }

    pub async fn tree_agents(&self, tree: &TreeId) -> Result<Vec<AgentRecord>, LedgerError> {
        dispatch!(self.tree_agents(tree))
    }

    /// Up to `count` log entries of one tree with ids after `after` ("0" for the start).
    pub async fn read_log(&self, tree: &TreeId, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        dispatch!(self.read_log(tree, after, count))
    }

    /// The last `count` entries of one tree's log, oldest first (the dashboard's backfill).
    pub async fn recent_log(&self, tree: &TreeId, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        dispatch!(self.recent_log(tree, count))
    }

    /// The id of the tree's latest log entry ("0" for an empty log): where a live reader starts.
    pub async fn log_tail(&self, tree: &TreeId) -> Result<String, LedgerError> {
        dispatch!(self.log_tail(tree))
    }

    pub async fn receipt(&self, tree: &TreeId, seq: u64) -> Result<Option<ReceiptFacts>, LedgerError> {
        dispatch!(self.receipt(tree, seq))
    }

    pub async fn chain_head(&self, tree: &TreeId) -> Result<ChainHead, LedgerError> {
        dispatch!(self.chain_head(tree))
    }

    /// Links signed receipts (consecutive, in order, of one tree) into the chain in one step.
    /// Receipts already linked are skipped; `Err(head)` if the head is not where the first new
    /// one expects it.
    pub async fn link_receipts(
        &self,
        tree: &TreeId,
        links: &[ReceiptLink],
    ) -> Result<Result<(), ChainHead>, LedgerError> {
        dispatch!(self.link_receipts(tree, links))
    }

    /// The receipts `from..=to` of a tree, in order (fewer if some do not exist).
    pub async fn receipts(&self, tree: &TreeId, from: u64, to: u64) -> Result<Vec<ReceiptFacts>, LedgerError> {
        dispatch!(self.receipts(tree, from, to))
    }
}

/// The key segment of a per-task counter: the task label in lowercase hex.
pub(crate) fn task_digest(task: &str) -> String {
    hex::encode(task.as_bytes())
}

/// Parses a flat `[status, k1, v1, k2, v2, ...]` reply into its status and fields.
pub(crate) struct Reply {
    pub status: String,
    fields: Vec<(String, String)>,
}

impl Reply {
    fn new(mut parts: Vec<String>) -> Result<Reply, LedgerError> {
        if parts.is_empty() || parts.len().is_multiple_of(2) {
            return Err(LedgerError::Corrupt(format!("reply of {} parts", parts.len())));
        }
        let status = parts.remove(0);
        let mut fields = Vec::with_capacity(parts.len() / 2);
        let mut iter = parts.into_iter();
        while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
            fields.push((k, v));
        }
        Ok(Reply { status, fields })
    }

    fn get(&self, key: &str) -> &str {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("")
    }

    fn u64(&self, key: &str) -> Result<u64, LedgerError> {
        self.get(key)
            .parse()
            .map_err(|_| LedgerError::Corrupt(format!("field {key} = {:?} is not a number", self.get(key))))
    }

    fn micros(&self, key: &str) -> Result<Micros, LedgerError> {
        Micros::new(self.u64(key)?).map_err(|e| LedgerError::Corrupt(format!("field {key}: {e}")))
    }

    fn opt_u64(&self, key: &str) -> Option<u64> {
        self.get(key).parse().ok()
    }

    fn opt_string(&self, key: &str) -> Option<String> {
        Some(self.get(key)).filter(|v| !v.is_empty()).map(str::to_owned)
    }

    /// Turns an `error` reply into the error; passes any other reply through.
    fn into_result(self) -> Result<Reply, LedgerError> {
        if self.status == "error" {
            return Err(LedgerError::from_code(self.get("code"), self.get("detail")));
        }
        Ok(self)
    }

    fn into_hold_outcome(self) -> Result<HoldOutcome, LedgerError> {
        let reply = self.into_result()?;
        let replayed = reply.get("replayed") == "1";
        match reply.status.as_str() {
            "ok" => Ok(HoldOutcome::Granted(Grant {
                hold_id: reply.get("hold").parse().map_err(|e| LedgerError::Corrupt(format!("hold id: {e}")))?,
                amount: reply.micros("amount")?,
                remaining: reply.micros("remaining")?,
                expires_at_ms: reply.u64("expires_at")?,
                replayed,
            })),
            "refused" => Ok(HoldOutcome::Refused(Refusal {
                reason: RefusalReason::from_code(reply.get("code"))
                    .ok_or_else(|| LedgerError::Corrupt(format!("refusal {:?}", reply.get("code"))))?,
                requested: reply.micros("amount")?,
                remaining: reply.micros("remaining")?,
                limited_by: reply.get("limited_by").to_owned(),
                replayed,
            })),
            "done" => Ok(HoldOutcome::Finished { response: reply.get("response").to_owned() }),
            "approval" => Ok(HoldOutcome::Approval(ApprovalWait {
                hold_id: reply.get("hold").parse().map_err(|e| LedgerError::Corrupt(format!("hold id: {e}")))?,
                amount: reply.micros("amount")?,
                expires_at_ms: reply.opt_u64("expires_at").unwrap_or(0),
                reason: reply.get("reason").to_owned(),
                state: ApprovalState::parse(reply.get("state"))
                    .ok_or_else(|| LedgerError::Corrupt(format!("approval state {:?}", reply.get("state"))))?,
                by: reply.get("by").to_owned(),
                note: reply.get("note").to_owned(),
                replayed,
            })),
            other => Err(LedgerError::Corrupt(format!("hold status {other}"))),
        }
    }

    /// A precheck's reply: `ok` (pass) or `refused`.
    fn into_precheck(self) -> Result<Option<Refusal>, LedgerError> {
        if self.status == "ok" {
            return Ok(None);
        }
        match self.into_hold_outcome()? {
            HoldOutcome::Refused(refusal) => Ok(Some(refusal)),
            _ => Err(LedgerError::Corrupt("precheck reply".into())),
        }
    }

    /// A settle's reply; `hold`, `agent`, `now_ms` and `details` are the settle's own arguments
    /// (a replay's reply brings the first settle's time and details).
    fn into_settle_outcome(
        self,
        hold: &HoldId,
        agent: &AgentId,
        now_ms: u64,
        details: &str,
    ) -> Result<SettleOutcome, LedgerError> {
        let reply = self.into_result()?;
        let seq = reply.u64("seq")?;
        let amount = reply.micros("amount")?;
        let replayed = reply.get("replayed") == "1";
        Ok(SettleOutcome {
            seq,
            amount,
            released: reply.micros("released")?,
            replayed,
            linked: reply.get("linked") == "1",
            facts: ReceiptFacts {
                tree: agent.tree().clone(),
                seq,
                hold: hold.to_string(),
                agent: agent.to_string(),
                amount: amount.get(),
                held: reply.u64("held")?,
                task: reply.get("task").to_owned(),
                service: reply.get("service").to_owned(),
                protocol: reply.get("protocol").to_owned(),
                ts_ms: if replayed { reply.u64("ts")? } else { now_ms },
                details: if replayed { reply.get("sdetails") } else { details }.to_owned(),
                hold_details: reply.get("hdetails").to_owned(),
                signed: None,
            },
        })
    }

    fn into_balance(self) -> Result<Balance, LedgerError> {
        let reply = self.into_result()?;
        Ok(Balance {
            cap: reply.micros("cap")?,
            spent: reply.micros("spent")?,
            held: reply.micros("held")?,
            remaining: reply.micros("remaining")?,
            available: reply.micros("available")?,
            limited_by: reply.get("limited_by").to_owned(),
            revoked: reply.opt_string("revoked"),
            revoked_at_ms: reply.opt_u64("revoked_at"),
            expires_at_ms: reply.opt_u64("expires_at"),
            suspended: reply.opt_string("suspended"),
            suspended_at_ms: reply.opt_u64("suspended_at"),
        })
    }
}

/// Builds an agent record from the fields of its hash (Redis) or map (memory).
fn agent_from_fields(id: AgentId, get: impl Fn(&str) -> Option<String>) -> Result<AgentRecord, LedgerError> {
    let num = |key: &str| -> Result<u64, LedgerError> {
        get(key).unwrap_or_default().parse().map_err(|_| LedgerError::Corrupt(format!("agent {id} field {key}")))
    };
    let money = |key: &str| Micros::new(num(key)?).map_err(|e| LedgerError::Corrupt(e.to_string()));
    let nonempty = |key: &str| get(key).filter(|v| !v.is_empty());
    Ok(AgentRecord {
        handle: get("handle").unwrap_or_default(),
        parent: nonempty("parent").and_then(|p| p.parse().ok()),
        depth: num("depth")? as u32,
        cap: money("cap")?,
        spent: money("spent")?,
        held: money("held")?,
        revoked: nonempty("revoked"),
        revoked_at_ms: nonempty("revoked_at").and_then(|v| v.parse().ok()),
        expires_at_ms: nonempty("expires_at").and_then(|v| v.parse().ok()),
        created_at_ms: num("created_at")?,
        labels: nonempty("labels").and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default(),
        suspended: nonempty("suspended"),
        suspended_at_ms: nonempty("suspended_at").and_then(|v| v.parse().ok()),
        task_of: nonempty("task_of"),
        archived_at_ms: nonempty("archived").and_then(|v| v.parse().ok()),
        id,
    })
}

/// Builds a log entry from the fields of a stream entry.
fn log_entry_from_fields(tree: &TreeId, id: String, get: impl Fn(&str) -> Option<String>) -> LogEntry {
    let text = |key: &str| get(key).unwrap_or_default();
    let num = |key: &str| get(key).and_then(|v| v.parse().ok());
    LogEntry {
        id,
        tree: tree.to_string(),
        ts_ms: num("ts").unwrap_or(0),
        event: text("ev"),
        agent: text("agent"),
        task: text("task"),
        service: text("svc"),
        protocol: text("proto"),
        amount: num("amt"),
        released: num("rel"),
        hold: text("hold"),
        reason: text("reason"),
        cap: num("cap"),
        parent: text("parent"),
        remaining: num("remaining"),
        bucket: text("bk"),
        detail: text("detail"),
        counters: text("ctr"),
        crossings: text("cross"),
        limited_by: text("limited_by"),
        task_type: text("tt"),
        approval: text("appr"),
        approval_expires_ms: num("aexp"),
        by: text("by"),
    }
}

fn hold_from_fields(
    agent: &AgentId,
    hold: &HoldId,
    get: impl Fn(&str) -> Option<String>,
) -> Result<HoldInfo, LedgerError> {
    if get("agent").as_deref() != Some(agent.as_str()) {
        return Err(LedgerError::UnknownHold);
    }
    let num = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok());
    let money = |key: &str| num(key).and_then(|v| Micros::new(v).ok());
    Ok(HoldInfo {
        hold_id: hold.clone(),
        agent: agent.clone(),
        amount: money("amount").ok_or_else(|| LedgerError::Corrupt(format!("hold {hold} amount")))?,
        state: get("state").unwrap_or_default(),
        expires_at_ms: num("expires_at").unwrap_or(0),
        settled: money("settled").filter(|_| get("state").as_deref() == Some("settled")),
        service: get("service").unwrap_or_default(),
        protocol: get("protocol").unwrap_or_default(),
        task: get("task").unwrap_or_default(),
        details: get("details").unwrap_or_default(),
        unknown_reason: get("unknown_reason").unwrap_or_default(),
        unknown_since_ms: num("unknown_at"),
        approved_at_ms: num("appr_at").filter(|_| get("appr_state").as_deref() == Some("approved")),
    })
}

fn bucket_from_fields(id: &str, get: impl Fn(&str) -> Option<String>) -> Result<Option<Bucket>, LedgerError> {
    let Some(agent) = get("agent") else { return Ok(None) };
    let num = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let money = |key: &str| Micros::new(num(key)).map_err(|e| LedgerError::Corrupt(format!("bucket {id}: {e}")));
    Ok(Some(Bucket {
        id: id.to_owned(),
        agent: agent.parse().map_err(|_| LedgerError::Corrupt(format!("bucket {id} owner")))?,
        cap: money("cap")?,
        spent: money("spent")?,
        held: money("held")?,
        open_holds: num("open"),
        exclusive: get("exclusive").as_deref() == Some("1"),
        label: get("label").unwrap_or_default(),
    }))
}

/// One signed receipt to link: its facts, the hash it names, its own hash and its JSON.
#[derive(Clone, Debug)]
pub struct ReceiptLink {
    pub facts: ReceiptFacts,
    pub prev_hash: String,
    pub hash: String,
    pub signed: String,
}

/// A receipt's facts from the fields of its settled hold.
fn receipt_from_hold(
    tree: &TreeId,
    seq: u64,
    hold: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Option<ReceiptFacts> {
    let num = |key: &str| get(key).and_then(|v| v.parse().ok());
    Some(ReceiptFacts {
        tree: tree.clone(),
        seq,
        hold: hold.to_owned(),
        agent: get("agent")?,
        amount: num("settled")?,
        held: num("amount")?,
        task: get("task").unwrap_or_default(),
        service: get("service").unwrap_or_default(),
        protocol: get("protocol").unwrap_or_default(),
        ts_ms: num("ended_at")?,
        details: get("sdetails").unwrap_or_default(),
        hold_details: get("details").unwrap_or_default(),
        signed: get("receipt").filter(|s| !s.is_empty()),
    })
}

/// Builds a task token's record from the fields of its hash (Redis) or map (memory).
fn task_token_from_fields(
    id: String,
    agent: &AgentId,
    get: impl Fn(&str) -> Option<String>,
) -> Result<TaskTokenInfo, LedgerError> {
    let num = |key: &str| -> Result<u64, LedgerError> {
        get(key).unwrap_or_default().parse().map_err(|_| LedgerError::Corrupt(format!("task token {id} field {key}")))
    };
    Ok(TaskTokenInfo {
        agent: agent.clone(),
        task: get("task").unwrap_or_default(),
        expires_at_ms: num("expires_at")?,
        created_at_ms: num("created_at")?,
        by: get("by").filter(|b| !b.is_empty()),
        revoked_at_ms: get("revoked").and_then(|r| r.parse().ok()),
        id,
    })
}
/// An operator's record from its hash fields.
fn operator_from_fields(
    id: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<crate::operators::OperatorRecord, LedgerError> {
    let text = |k: &str| get(k).unwrap_or_default();
    let role = text("role").parse().map_err(|_| LedgerError::Corrupt(format!("operator {id} role")))?;
    let tree = match text("tree").as_str() {
        "" => None,
        t => Some(t.parse().map_err(|_| LedgerError::Corrupt(format!("operator {id} tree")))?),
    };
    Ok(crate::operators::OperatorRecord {
        id: id.to_owned(),
        name: text("name"),
        role,
        tree,
        token_hash: TokenHash::from_stored(text("token")),
        created_at_ms: text("created_at").parse().unwrap_or(0),
        created_by: text("created_by"),
        revoked_at_ms: text("revoked_at").parse().ok(),
    })
}

/// Admin-side changes with their actor, and operator tokens.
impl Ledger {
    /// [`Ledger::set_cap`] by `actor`: `by` on the log entry; tighten-only refuses a raise
    /// (`role_forbidden`) inside the same atomic step.
    pub async fn set_cap_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        cap: Micros,
        actor: &Actor,
    ) -> Result<Micros, LedgerError> {
        dispatch!(self.set_cap_as(now_ms, agent, cap, actor))
    }

    pub async fn revoke_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        reason: &str,
        actor: &Actor,
    ) -> Result<(u64, bool), LedgerError> {
        dispatch!(self.revoke_as(now_ms, agent, reason, actor))
    }

    pub async fn reinstate_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<Option<String>, LedgerError> {
        dispatch!(self.reinstate_as(now_ms, agent, actor))
    }

    /// [`Ledger::set_expiry`] by `actor`; tighten-only: set, and no later than the current one.
    pub async fn set_expiry_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
        actor: &Actor,
    ) -> Result<Option<u64>, LedgerError> {
        dispatch!(self.set_expiry_as(now_ms, agent, expires_at_ms, actor))
    }

    /// [`Ledger::set_controls`] by `actor`; with `expected`, a compare-and-set: the stored
    /// controls must still be `expected` (else `changed_meanwhile`, nothing changed).
    pub async fn set_controls_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
        expected: Option<&controls::Controls>,
        actor: &Actor,
    ) -> Result<(), LedgerError> {
        dispatch!(self.set_controls_as(now_ms, agent, controls, expected, actor))
    }

    /// [`Ledger::archive`] by `actor` (`by` on the `archive` entry).
    pub async fn archive_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<(u64, bool, String), LedgerError> {
        dispatch!(self.archive_as(now_ms, agent, actor))
    }

    /// [`Ledger::rotate_token`] by `actor` (`by` on the `rotate` entry).
    pub async fn rotate_token_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        token_hash: &TokenHash,
        actor: &Actor,
    ) -> Result<(), LedgerError> {
        dispatch!(self.rotate_token_as(now_ms, agent, token_hash, actor))
    }

    /// Stores a new operator (its token's hash only). Names are unique, also after a revocation.
    pub async fn create_operator(
        &self,
        now_ms: u64,
        operator: &crate::operators::NewOperator,
        by: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.create_operator(now_ms, operator, by))
    }

    /// Revokes an operator's token by name; returns (revoked_at, already revoked).
    pub async fn revoke_operator(&self, now_ms: u64, name: &str, by: &str) -> Result<(u64, bool), LedgerError> {
        dispatch!(self.revoke_operator(now_ms, name, by))
    }

    /// The operator with this id (from its token), revoked or not.
    pub async fn operator(&self, id: &str) -> Result<Option<crate::operators::OperatorRecord>, LedgerError> {
        dispatch!(self.operator(id))
    }

    /// Every operator, by name.
    pub async fn operators(&self) -> Result<Vec<crate::operators::OperatorRecord>, LedgerError> {
        dispatch!(self.operators())
    }

    /// Up to `count` entries of the operators' audit log (`operator_create`, `operator_revoke`)
    /// with ids after `after` ("0" for the start), as log entries: no tree, the operator, its
    /// role and tree in `detail` (`{"operator", "role", "tree"}`), the actor in `by`.
    pub async fn read_operator_log(&self, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        dispatch!(self.read_operator_log(after, count))
    }
}

/// An operator audit entry from its stream fields (`spendcap_operator_create`/`_revoke`: ts ev
/// operator role tree by): the operator, role and tree limit go in `detail` (role and tree
/// `null` on a revocation, which does not repeat them).
fn operator_log_entry(id: String, get: impl Fn(&str) -> Option<String>) -> LogEntry {
    let text = |key: &str| get(key).filter(|v| !v.is_empty());
    let detail = serde_json::json!({ "operator": text("operator"), "role": text("role"), "tree": text("tree") });
    LogEntry {
        id,
        ts_ms: text("ts").and_then(|v| v.parse().ok()).unwrap_or(0),
        event: text("ev").unwrap_or_default(),
        reason: text("role").unwrap_or_default(),
        detail: detail.to_string(),
        by: text("by").unwrap_or_default(),
        ..LogEntry::default()
    }
}
