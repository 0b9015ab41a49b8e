//! Who may do what: the roles of operator tokens, the actions of the admin side, and the one
//! table Role × Action. No HTTP here: the HTTP face maps each route to one [`Action`]
//! (`api/operators.rs`, `ROUTES`) and asks [`Role::grant`].
//!
//! - `viewer` reads everything and changes nothing;
//! - `operator` stops and tightens: revoke, reinstate, record task outcomes, decide approvals,
//!   lower a cap, make an expiry earlier, tighten controls — never create agents, never raise a
//!   cap or loosen a limit, never move money (resolving an unknown hold settles or releases
//!   money: admin only), never rotate tokens or manage operators;
//! - `admin` does everything.
//!
//! "Tighten only" is decided inside the ledger (see [`Grant::TightenOnly`]), not here.

use std::fmt;
use std::str::FromStr;

use crate::ledger::controls::{ApprovalRule, Controls};

/// An operator token's role.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// What this role may do with `action`: the one table.
    pub fn grant(self, action: Action) -> Grant {
        use Action::*;
        match (self, action) {
            (Role::Admin, _) => Grant::Full,
            (Role::Viewer | Role::Operator, Read) => Grant::Full,
            (Role::Viewer | Role::Operator, ReadFleet) => Grant::Full,
            (Role::Operator, Revoke | Reinstate | RecordOutcome | DecideApproval) => Grant::Full,
            (Role::Operator, SetCap | SetControls | SetExpiry) => Grant::TightenOnly,
            (
                Role::Operator,
                CreateAgent | Archive | RotateToken | MintTaskToken | ResolveHold | RegisterMandates | ManageOperators,
            ) => Grant::No,
            (Role::Viewer, _) => Grant::No,
        }
    }

    /// The actions this role may take at all (fully or tighten-only), in [`Action::ALL`]'s order.
    pub fn actions(self) -> Vec<Action> {
        Action::ALL.into_iter().filter(|a| self.grant(*a) != Grant::No).collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ();
    fn from_str(text: &str) -> Result<Role, ()> {
        Role::ALL.into_iter().find(|r| r.as_str() == text).ok_or(())
    }
}

/// Everything done on the admin side, as the role table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Read agents, controls, periods, holds, the log, spend, receipts, reports, events.
    Read,
    /// Read what spans every tree and no tree in particular (metrics, the operator list, the
    /// spend series): refused to a token limited to one tree.
    ReadFleet,
    CreateAgent,
    /// Change a cap (tighten only: lower it).
    SetCap,
    /// Change controls (tighten only: no looser than the current ones).
    SetControls,
    /// Change the expiry (tighten only: earlier, never removed).
    SetExpiry,
    Revoke,
    Reinstate,
    Archive,
    RotateToken,
    /// Mint a short-lived, task-scoped token for an agent (`POST /v1/agents/{agent}/tokens`):
    /// a new credential, so admin only; revoking one is [`Action::Revoke`].
    MintTaskToken,
    /// Record a task outcome.
    RecordOutcome,
    /// Settle or void a hold whose outcome is unknown.
    ResolveHold,
    /// Approve or deny a payment waiting for a person (approval holds, issue 18): the held money
    /// stays within every cap either way.
    DecideApproval,
    /// Register AP2 open mandates for an agent (its owner's surface).
    RegisterMandates,
    /// Create, list the secrets of, and revoke operator tokens.
    ManageOperators,
}

impl Action {
    pub const ALL: [Action; 16] = [
        Action::Read,
        Action::ReadFleet,
        Action::CreateAgent,
        Action::SetCap,
        Action::SetControls,
        Action::SetExpiry,
        Action::Revoke,
        Action::Reinstate,
        Action::Archive,
        Action::RotateToken,
        Action::MintTaskToken,
        Action::RecordOutcome,
        Action::ResolveHold,
        Action::DecideApproval,
        Action::RegisterMandates,
        Action::ManageOperators,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::ReadFleet => "read_fleet",
            Action::CreateAgent => "create_agent",
            Action::SetCap => "set_cap",
            Action::SetControls => "set_controls",
            Action::SetExpiry => "set_expiry",
            Action::Revoke => "revoke",
            Action::Reinstate => "reinstate",
            Action::Archive => "archive",
            Action::RotateToken => "rotate_token",
            Action::MintTaskToken => "mint_task_token",
            Action::RecordOutcome => "record_outcome",
            Action::ResolveHold => "resolve_hold",
            Action::DecideApproval => "decide_approval",
            Action::RegisterMandates => "register_mandates",
            Action::ManageOperators => "manage_operators",
        }
    }
}

/// How far a role may take an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    Full,
    /// Only in the tightening direction; the ledger decides, atomically, against the current value.
    TightenOnly,
    No,
}

/// Whoever acts on the admin side: the bootstrap admin token, or a named operator token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The operator's name; `admin` for the bootstrap token.
    pub name: String,
    pub role: Role,
    /// The one budget tree the token is limited to, if any.
    pub tree: Option<crate::identity::TreeId>,
}

impl Principal {
    /// The bootstrap admin token (`SPENDCAP_ADMIN_TOKEN`): admin over every tree.
    pub fn bootstrap() -> Principal {
        Principal { name: "admin".into(), role: Role::Admin, tree: None }
    }

    /// Whether this principal may see and act on agents of `tree`.
    pub fn sees(&self, tree: &crate::identity::TreeId) -> bool {
        self.tree.as_ref().is_none_or(|own| own == tree)
    }

    /// What the ledger needs to know about the actor of a change: its name for the log, and
    /// whether the change must tighten.
    pub fn actor(&self, action: Action) -> Actor {
        Actor { by: self.name.clone(), tighten_only: self.role.grant(action) == Grant::TightenOnly }
    }
}

/// The actor of one admin-side ledger change: recorded as `by` on its log entry; with
/// `tighten_only`, the ledger refuses (`role_forbidden`) a change that loosens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actor {
    pub by: String,
    pub tighten_only: bool,
}

impl Controls {
    /// Whether these controls (`self`, the new ones) are at least as strict as `old`: every limit
    /// present in `old` is present and lower or equal; an allow-list present in `old` is present
    /// and a subset of it (a new allow-list where `old` had none narrows too); every deny-list
    /// entry of `old` is still denied; every breaker setting of `old` is kept at least as strict
    /// (counts lower or equal, windows longer or equal); an approval rule of `old` is kept and
    /// asks at least as often (a threshold no higher, `new_service` kept, its services and
    /// protocols still listed; how long a payment waits may change).
    pub fn no_looser_than(&self, old: &Controls) -> bool {
        fn limit<T: PartialOrd + Copy>(new: Option<T>, old: Option<T>) -> bool {
            match (new, old) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(n), Some(o)) => n <= o,
            }
        }
        fn window(new: Option<u64>, old: Option<u64>) -> bool {
            match (new, old) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(n), Some(o)) => n >= o,
            }
        }
        fn allow(new: &[String], old: &[String]) -> bool {
            old.is_empty() || (!new.is_empty() && new.iter().all(|n| old.contains(n)))
        }
        fn deny(new: &[String], old: &[String]) -> bool {
            old.iter().all(|o| new.contains(o))
        }
        fn approval(new: Option<&ApprovalRule>, old: Option<&ApprovalRule>) -> bool {
            match (new, old) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some(n), Some(o)) => {
                    limit(n.above, o.above)
                        && (n.new_service || !o.new_service)
                        && deny(&n.services, &o.services)
                        && deny(&n.protocols, &o.protocols)
                }
            }
        }
        limit(self.task_cap, old.task_cap)
            && limit(self.per_payment, old.per_payment)
            && limit(self.daily, old.daily)
            && limit(self.weekly, old.weekly)
            && limit(self.monthly, old.monthly)
            && limit(self.all_time, old.all_time)
            && allow(&self.services_allow, &old.services_allow)
            && deny(&self.services_deny, &old.services_deny)
            && allow(&self.protocols_allow, &old.protocols_allow)
            && deny(&self.protocols_deny, &old.protocols_deny)
            && limit(self.max_holds, old.max_holds)
            && window(self.window_ms, old.window_ms)
            && limit(self.max_spend, old.max_spend)
            && window(self.spend_window_ms, old.spend_window_ms)
            && limit(self.max_repeats, old.max_repeats)
            && approval(self.approval.as_ref(), old.approval.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_change_nothing_and_operators_never_create_or_loosen() {
        for action in Action::ALL {
            assert_eq!(Role::Admin.grant(action), Grant::Full, "{action:?}");
            let viewer = Role::Viewer.grant(action);
            assert_eq!(viewer == Grant::No, !matches!(action, Action::Read | Action::ReadFleet), "{action:?}");
        }
        for action in [
            Action::CreateAgent,
            Action::ManageOperators,
            Action::ResolveHold,
            Action::RotateToken,
            Action::MintTaskToken,
        ] {
            assert_eq!(Role::Operator.grant(action), Grant::No, "{action:?}");
        }
        for action in [Action::SetCap, Action::SetControls, Action::SetExpiry] {
            assert_eq!(Role::Operator.grant(action), Grant::TightenOnly, "{action:?}");
        }
        assert_eq!(Role::Operator.grant(Action::Revoke), Grant::Full);
    }

    #[test]
    fn tighter_controls_are_no_looser_and_looser_ones_are() {
        let old = Controls {
            daily: Some(100),
            services_allow: vec!["a.com".into(), "b.com".into()],
            protocols_deny: vec!["acp".into()],
            max_holds: Some(10),
            window_ms: Some(60_000),
            ..Controls::default()
        };
        let tighter = Controls {
            daily: Some(50),
            per_payment: Some(5),
            services_allow: vec!["a.com".into()],
            protocols_deny: vec!["acp".into(), "ap2".into()],
            max_holds: Some(5),
            window_ms: Some(120_000),
            ..Controls::default()
        };
        assert!(tighter.no_looser_than(&old));
        assert!(old.no_looser_than(&old));
        let raised = Controls { daily: Some(101), ..tighter.clone() };
        assert!(!raised.no_looser_than(&old));
        let dropped = Controls { daily: None, ..tighter.clone() };
        assert!(!dropped.no_looser_than(&old));
        let widened = Controls { services_allow: vec!["a.com".into(), "c.com".into()], ..tighter.clone() };
        assert!(!widened.no_looser_than(&old));
        let all_services = Controls { services_allow: vec![], ..tighter.clone() };
        assert!(!all_services.no_looser_than(&old));
        let undenied = Controls { protocols_deny: vec![], ..tighter.clone() };
        assert!(!undenied.no_looser_than(&old));
        let shorter_window = Controls { window_ms: Some(1_000), ..tighter };
        assert!(!shorter_window.no_looser_than(&old));
    }

    #[test]
    fn an_approval_rule_may_be_added_or_tightened_but_not_dropped_or_loosened() {
        let rule = ApprovalRule {
            above: Some(1_000),
            new_service: true,
            services: vec!["a.com".into()],
            protocols: vec![],
            ttl_ms: 60_000,
        };
        let old = Controls { approval: Some(rule.clone()), ..Controls::default() };
        let with = |rule: ApprovalRule| Controls { approval: Some(rule), ..Controls::default() };
        assert!(old.no_looser_than(&Controls::default()), "a new rule tightens");
        assert!(with(ApprovalRule { above: Some(500), ttl_ms: 1_000, ..rule.clone() }).no_looser_than(&old));
        assert!(with(ApprovalRule { protocols: vec!["acp".into()], ..rule.clone() }).no_looser_than(&old));
        assert!(!Controls::default().no_looser_than(&old), "dropping the rule");
        assert!(!with(ApprovalRule { above: Some(2_000), ..rule.clone() }).no_looser_than(&old));
        assert!(!with(ApprovalRule { above: None, ..rule.clone() }).no_looser_than(&old));
        assert!(!with(ApprovalRule { new_service: false, ..rule.clone() }).no_looser_than(&old));
        assert!(!with(ApprovalRule { services: vec![], ..rule }).no_looser_than(&old));
    }
}
