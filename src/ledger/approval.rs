//! Approval holds: a payment that an approval rule (`Controls::approval`) matches is held like
//! any other, atomically with every cap and limit, but waits `pending_approval` until a person
//! approves it (it goes on from the same reservation, exactly once), denies it (released) or
//! its time runs out (released by the hold's own expiry, no sweeper). The approval id is the
//! waiting hold's id.

use adapters::Micros;
use serde::{Deserialize, Serialize};

use crate::identity::{AgentId, HoldId};

/// Where an approval stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    Expired,
    /// The agent voided its waiting payment.
    Canceled,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Canceled => "canceled",
        }
    }

    pub fn parse(text: &str) -> Option<ApprovalState> {
        [
            ApprovalState::Pending,
            ApprovalState::Approved,
            ApprovalState::Denied,
            ApprovalState::Expired,
            ApprovalState::Canceled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// The hold's answer for a payment that waits for (or was refused) approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalWait {
    /// The approval id: the waiting hold's id.
    pub hold_id: HoldId,
    pub amount: Micros,
    /// When the approval lapses (ms, the ledger's clock).
    pub expires_at_ms: u64,
    /// `above_amount`, `new_service`, `listed_service` or `listed_protocol`.
    pub reason: String,
    pub state: ApprovalState,
    pub by: String,
    pub note: String,
    pub replayed: bool,
}

/// An approval as stored, for the views.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub approval_id: String,
    pub agent: String,
    pub amount_micros: u64,
    pub state: ApprovalState,
    pub reason: String,
    /// When a pending approval lapses.
    pub expires_at_ms: u64,
    pub created_at_ms: u64,
    pub service: String,
    pub protocol: String,
    pub task: String,
    /// Who decided, and their note (empty while pending).
    pub by: String,
    pub note: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
}

impl Approval {
    /// The approval read from a hold's fields (`None`: the hold waited for no approval). A
    /// pending approval past its time reads as `expired` (its release is the next ledger call's).
    pub(crate) fn from_fields(id: &HoldId, now_ms: u64, get: impl Fn(&str) -> Option<String>) -> Option<Approval> {
        let reason = get("appr").filter(|r| !r.is_empty())?;
        let num = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok());
        let expires_at_ms = num("appr_exp").unwrap_or(0);
        let mut state = get("appr_state").and_then(|s| ApprovalState::parse(&s)).unwrap_or(ApprovalState::Expired);
        if state == ApprovalState::Pending && expires_at_ms <= now_ms {
            state = ApprovalState::Expired;
        }
        Some(Approval {
            approval_id: id.to_string(),
            agent: get("agent").unwrap_or_default(),
            amount_micros: num("amount").unwrap_or(0),
            state,
            reason,
            expires_at_ms,
            created_at_ms: num("created_at").unwrap_or(0),
            service: get("service").unwrap_or_default(),
            protocol: get("protocol").unwrap_or_default(),
            task: get("task").unwrap_or_default(),
            by: get("appr_by").unwrap_or_default(),
            note: get("appr_note").unwrap_or_default(),
            decided_at_ms: num("appr_at"),
        })
    }
}

/// What a decision did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub state: ApprovalState,
    pub agent: AgentId,
    pub amount: Micros,
    /// The approved hold's new expiry (approved), or the hold's last one.
    pub expires_at_ms: u64,
    /// It was already decided so; nothing changed.
    pub replayed: bool,
}
