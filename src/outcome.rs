//! How the core and the protocol flows say that something did not happen: a [`Failure`] — a
//! stable snake_case `code`, a `detail` for people, optional extra fields for machines (a
//! refusal's amounts, the hold to retry), and its [`Kind`], the family it belongs to.
//!
//! Nothing here knows HTTP or MCP. Each face maps a failure once: the HTTP face turns its kind
//! into a status code in one table (`api::status`), the MCP face into a tool result.

use serde_json::{json, Value};

use crate::ledger::{LedgerError, Refusal, RefusalReason};
use crate::receipt::ReceiptError;

/// The families of failure. A closed set: a face has one answer per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request cannot be read at all (bad syntax, a bad header).
    Malformed,
    /// No valid agent (or admin) credentials.
    Unauthenticated,
    /// The caller is known but may not do this (a revoked agent writing, an agent on an admin
    /// route, a destination that is not allowed).
    Forbidden,
    /// A thing the request names does not exist.
    NotFound,
    /// The operation does not take that method.
    MethodNotAllowed,
    /// The state of a thing forbids the operation now (in flight, already settled, busy, ...).
    Conflict,
    /// The request body is larger than allowed.
    TooLarge,
    /// The body is not the content type the operation reads.
    UnsupportedMediaType,
    /// The request reads but says something invalid (amounts, labels, idempotency conflicts).
    Invalid,
    /// Refused before any money moved: a budget, cap, control or the payment policy said no.
    Refused,
    /// A provider answered with something unusable, or failed.
    Provider,
    /// A provider did not answer in time.
    ProviderTimeout,
    /// A dependency of the daemon (the ledger, a protocol's configuration, the clock) is not
    /// available now.
    Unavailable,
    /// A fault of the daemon; the cause is logged, never shown.
    Internal,
    /// Held, but a person must approve the payment before it goes out; nothing was sent. The
    /// agent repeats its request (same idempotency key) to resume once approved.
    ApprovalRequired,
}

impl Kind {
    /// Every kind, for the faces' tables and their tests.
    pub const ALL: [Kind; 15] = [
        Kind::Malformed,
        Kind::Unauthenticated,
        Kind::Forbidden,
        Kind::NotFound,
        Kind::MethodNotAllowed,
        Kind::Conflict,
        Kind::TooLarge,
        Kind::UnsupportedMediaType,
        Kind::Invalid,
        Kind::Refused,
        Kind::Provider,
        Kind::ProviderTimeout,
        Kind::Unavailable,
        Kind::Internal,
        Kind::ApprovalRequired,
    ];

    /// The kind's stable name (the README's table and stored answers use it).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Malformed => "malformed",
            Kind::Unauthenticated => "unauthenticated",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not_found",
            Kind::MethodNotAllowed => "method_not_allowed",
            Kind::Conflict => "conflict",
            Kind::TooLarge => "too_large",
            Kind::UnsupportedMediaType => "unsupported_media_type",
            Kind::Invalid => "invalid",
            Kind::Refused => "refused",
            Kind::Provider => "provider",
            Kind::ProviderTimeout => "provider_timeout",
            Kind::Unavailable => "unavailable",
            Kind::Internal => "internal",
            Kind::ApprovalRequired => "approval_required",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// Something the core or a flow did not do, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    pub code: &'static str,
    pub detail: String,
    /// Extra fields for the answer's body (a refusal's amounts, say).
    pub extra: Option<Value>,
}

impl Failure {
    pub fn new(kind: Kind, code: &'static str, detail: impl Into<String>) -> Failure {
        Failure { kind, code, detail: detail.into(), extra: None }
    }

    pub fn malformed(code: &'static str, detail: impl Into<String>) -> Failure {
        Failure::new(Kind::Malformed, code, detail)
    }

    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Failure {
        Failure::new(Kind::Invalid, code, detail)
    }

    pub fn unauthorized() -> Failure {
        Failure::new(Kind::Unauthenticated, "invalid_token", "missing, malformed or unknown bearer token")
    }

    /// A fault of the daemon: the cause is logged here, and only `internal` is shown.
    pub fn internal(cause: impl std::fmt::Display) -> Failure {
        tracing::error!(error = %cause, "internal error");
        Failure::new(Kind::Internal, "internal", "internal error")
    }

    pub fn with_extra(mut self, extra: Value) -> Failure {
        self.extra = Some(extra);
        self
    }

    /// Adds fields to the extra ones (the checkout session, the hold, ...).
    pub fn with_fields(mut self, fields: Value) -> Failure {
        match (&mut self.extra, fields) {
            (Some(Value::Object(extra)), Value::Object(fields)) => extra.extend(fields),
            (extra, fields) => *extra = Some(fields),
        }
        self
    }

    /// The `{code, detail, ...extra}` body every face shows for a failure.
    pub fn body(&self) -> Value {
        let mut body = json!({ "code": self.code, "detail": self.detail });
        if let (Some(Value::Object(extra)), Value::Object(map)) = (&self.extra, &mut body) {
            map.extend(extra.clone());
        }
        body
    }

    /// A budget refusal: the hold (or the precheck) said no; nothing was held or sent.
    pub fn refused(refusal: &Refusal) -> Failure {
        Failure::new(Kind::Refused, refusal.reason.code(), refusal_detail(refusal.reason)).with_extra(json!({
            "requested_micros": refusal.requested.get(),
            "remaining_micros": refusal.remaining.get(),
            "limited_by": refusal.limited_by,
        }))
    }

    /// The ledger's answer for an agent-authenticated call: an unknown agent or a token that does
    /// not match are the same thing to the caller, an invalid token.
    pub fn agent_scoped(err: LedgerError) -> Failure {
        match err {
            LedgerError::UnknownAgent | LedgerError::Unauthorized => Failure::unauthorized(),
            other => other.into(),
        }
    }
}

impl Failure {
    /// A payment that waits for (or was refused) a person's approval: `approval_required`
    /// (202, held, nothing sent), `approval_denied` or `approval_expired` (403, released), with
    /// the approval's facts and the idempotency key that resumes it.
    pub fn approval(wait: &crate::ledger::ApprovalWait, idempotency_key: Option<&str>) -> Failure {
        use crate::ledger::ApprovalState;
        let (kind, code, detail) = match wait.state {
            ApprovalState::Pending | ApprovalState::Approved => (
                Kind::ApprovalRequired,
                "approval_required",
                "the payment is held and waits for a person's approval; nothing was sent. Repeat the same \
                 request with the same idempotency key once approved (GET /v1/me/approvals/{approval_id}?wait_secs=30 waits for the decision)",
            ),
            ApprovalState::Denied => {
                (Kind::Forbidden, "approval_denied", "a person denied the payment; its money was released")
            }
            ApprovalState::Expired => (
                Kind::Forbidden,
                "approval_expired",
                "nobody approved the payment in time; its money was released",
            ),
            ApprovalState::Canceled => {
                (Kind::Conflict, "hold_voided", "the payment waiting for approval was voided")
            }
        };
        Failure::new(kind, code, detail).with_extra(json!({
            "approval_id": wait.hold_id.to_string(),
            "amount_micros": wait.amount.get(),
            "reason": wait.reason,
            "state": wait.state,
            "expires_at_ms": wait.expires_at_ms,
            "expires_at": adapters::acp::rfc3339_utc(wait.expires_at_ms).unwrap_or_default(),
            "decided_by": wait.by,
            "note": wait.note,
            "idempotency_key": idempotency_key,
        }))
    }
}

/// What each budget refusal means, for the agent.
fn refusal_detail(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::CapExceeded => "the payment would take the agent or an ancestor over its cap",
        RefusalReason::AgentRevoked => "the agent (or an ancestor) is revoked",
        RefusalReason::AgentExpired => "the agent (or an ancestor) has expired",
        RefusalReason::BudgetExceeded => "the payment would pass a budget it is charged against",
        RefusalReason::BudgetBusy => "the budget allows one outstanding payment and has one",
        RefusalReason::AgentSuspended => {
            "the agent (or an ancestor) is suspended by its runaway-loop breaker; an admin can reinstate it"
        }
        RefusalReason::ProtocolDenied => "the agent (or an ancestor) may not pay with this protocol",
        RefusalReason::ServiceDenied => "the agent (or an ancestor) may not pay this service",
        RefusalReason::PerPaymentLimitExceeded => "the payment is above a per-payment limit",
        RefusalReason::DailyLimitExceeded => "the payment would pass a daily limit (UTC day)",
        RefusalReason::WeeklyLimitExceeded => "the payment would pass a weekly limit (ISO week, UTC)",
        RefusalReason::MonthlyLimitExceeded => "the payment would pass a monthly limit (UTC month)",
        RefusalReason::AllTimeLimitExceeded => "the payment would pass an all-time limit",
        RefusalReason::TaskCapExceeded => "the payment would pass the per-task cap of this task",
    }
}

impl From<LedgerError> for Failure {
    fn from(err: LedgerError) -> Failure {
        let kind = match &err {
            LedgerError::UnknownAgent | LedgerError::UnknownHold | LedgerError::UnknownBucket => Kind::NotFound,
            LedgerError::Unauthorized => return Failure::unauthorized(),
            LedgerError::UnknownParent
            | LedgerError::TreeTooDeep
            | LedgerError::AmountExceedsHold
            | LedgerError::IdempotencyConflict => Kind::Invalid,
            LedgerError::AgentExists
            | LedgerError::HandleTaken
            | LedgerError::HoldSettled
            | LedgerError::HoldExpired
            | LedgerError::HoldVoided
            | LedgerError::IdempotencyInFlight
            | LedgerError::HoldProtocolMismatch
            | LedgerError::BucketExists
            | LedgerError::CapBelowCommitted { .. }
            | LedgerError::ApprovalExpired
            | LedgerError::ApprovalDecided
            | LedgerError::HoldPendingApproval => Kind::Conflict,
            LedgerError::ApprovalNotFound => Kind::NotFound,
            LedgerError::InvalidArgument(_) => Kind::Malformed,
            LedgerError::RoleForbidden(_) => Kind::Forbidden,
            LedgerError::ChangedMeanwhile | LedgerError::OperatorExists => Kind::Conflict,
            LedgerError::UnknownOperator => Kind::NotFound,
            LedgerError::Unavailable(cause) => {
                tracing::error!(error = %cause, "ledger unavailable; refusing (fail closed)");
                return Failure::new(
                    Kind::Unavailable,
                    "ledger_unavailable",
                    "the ledger is unavailable; nothing was paid",
                );
            }
            LedgerError::OutcomeUnknown { cause, retry_key } => {
                tracing::error!(error = %cause, "ledger call outcome unknown");
                let failure = Failure::new(
                    Kind::Unavailable,
                    "ledger_outcome_unknown",
                    "the ledger did not answer in time and the call may have run; retry the same request \
                     (with this idempotency_key for a hold) to learn its outcome",
                );
                return match retry_key {
                    Some(key) => failure.with_extra(json!({ "idempotency_key": key })),
                    None => failure,
                };
            }
            LedgerError::Corrupt(_) => return Failure::internal(err),
            LedgerError::ClockSkew { .. } => Kind::Unavailable,
            LedgerError::SubAgentExceedsParent { bound, .. } => {
                let bound = bound.clone();
                return Failure::new(Kind::Forbidden, err.code(), err.to_string())
                    .with_extra(json!({ "bound": bound }));
            }
            LedgerError::TooManySubAgents | LedgerError::TaskTokenNotAllowed | LedgerError::CallerNotLive { .. } => {
                Kind::Forbidden
            }
            LedgerError::NotDescendant | LedgerError::UnknownToken => Kind::NotFound,
            LedgerError::TokenExpired | LedgerError::TokenRevoked => Kind::Unauthenticated,
            LedgerError::TokenExists => Kind::Conflict,
        };
        Failure::new(kind, err.code(), err.to_string())
    }
}

impl From<ReceiptError> for Failure {
    fn from(err: ReceiptError) -> Failure {
        match err {
            ReceiptError::Ledger(ledger) => ledger.into(),
            other => Failure::internal(other),
        }
    }
}

/// Checks a label (task, service, reason) from outside: bounded length, no control characters.
pub fn label(field: &'static str, value: &str, max: usize) -> Result<String, Failure> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(Failure::invalid(
            "invalid_label",
            format!("{field} must be at most {max} bytes without control characters"),
        ));
    }
    Ok(value.to_owned())
}

/// How idempotency records written before answers were stored by kind name their failure: the
/// HTTP status (`{"status": 409, "body": …}`), which the release before the faces/core split
/// stored for ACP and AP2 purchases. Read only, so that such a record still replays after an
/// upgrade; frozen (`api::status`'s tests check it agrees with the HTTP face's table).
pub const STORED_STATUS: [(u16, Kind); 14] = [
    (400, Kind::Malformed),
    (401, Kind::Unauthenticated),
    (402, Kind::Refused),
    (403, Kind::Forbidden),
    (404, Kind::NotFound),
    (405, Kind::MethodNotAllowed),
    (409, Kind::Conflict),
    (413, Kind::TooLarge),
    (415, Kind::UnsupportedMediaType),
    (422, Kind::Invalid),
    (500, Kind::Internal),
    (502, Kind::Provider),
    (503, Kind::Unavailable),
    (504, Kind::ProviderTimeout),
];

/// A whole answer a flow decided, kept with an idempotency key so that a duplicate request gets
/// it back (ACP and AP2 purchases): its JSON body, and the kind of failure when it is one.
#[derive(Debug)]
pub struct Reply {
    /// `None`: the operation succeeded.
    pub failure: Option<Kind>,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply { failure: None, body }
    }

    /// The answer a failure becomes: the body every face shows for it.
    pub fn error(failure: &Failure) -> Reply {
        Reply { failure: Some(failure.kind), body: failure.body() }
    }

    /// The form kept in the idempotency record.
    pub fn stored(&self) -> String {
        json!({ "failure": self.failure.map(Kind::as_str), "body": self.body }).to_string()
    }

    /// A stored answer, marked `replayed`.
    pub fn replay(stored: &str) -> Result<Reply, Failure> {
        let value: Value = serde_json::from_str(stored).map_err(Failure::internal)?;
        let failure = match &value["failure"] {
            Value::Null if value.get("failure").is_some() => None,
            Value::String(name) => {
                Some(Kind::from_name(name).ok_or_else(|| Failure::internal(format!("a stored answer's kind {name}")))?)
            }
            // A record the release before this one wrote: its HTTP status, not its kind.
            _ => match value["status"].as_u64() {
                Some(status) if (200..300).contains(&status) => None,
                Some(status) => Some(
                    STORED_STATUS
                        .iter()
                        .find(|(stored, _)| u64::from(*stored) == status)
                        .map(|(_, kind)| *kind)
                        .ok_or_else(|| Failure::internal(format!("a stored answer's status {status}")))?,
                ),
                None => return Err(Failure::internal("a stored answer has no outcome")),
            },
        };
        let mut body = value["body"].clone();
        if let Value::Object(map) = &mut body {
            map.insert("replayed".into(), Value::Bool(true));
        }
        Ok(Reply { failure, body })
    }
}
