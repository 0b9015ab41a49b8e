//! An agent's effective standing: what stops its payments, counting its ancestors.
//!
//! `spendcap_hold` refuses a payment when the agent *or any ancestor* is revoked, suspended or
//! expired (its `gate`, in that order, the agent first and then up the tree). Every view of an
//! agent (the admin list and show, `/v1/me`, `/v1/me/budget`, the CLI and the dashboard through
//! them) shows the same thing, computed here once from the agent's lineage: a sub-agent of a
//! revoked agent is "revoked (via research)", with nothing available, as its next hold would be
//! refused `agent_revoked` with `limited_by` the parent.

use serde::Serialize;
use utoipa::ToSchema;

use super::AgentRecord;
use crate::identity::AgentId;

/// An agent named in a view: its id and its handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct AgentRef {
    pub id: String,
    pub handle: String,
}

impl AgentRef {
    fn of(record: &AgentRecord) -> AgentRef {
        AgentRef { id: record.id.to_string(), handle: record.handle.clone() }
    }
}

/// Whether an agent can pay, and if not why, in the hold's order of precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Active,
    Revoked,
    Suspended,
    Expired,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Revoked => "revoked",
            AgentState::Suspended => "suspended",
            AgentState::Expired => "expired",
        }
    }

    /// The code a hold is refused with in this state (`None` when active).
    pub fn refusal_code(self) -> Option<&'static str> {
        match self {
            AgentState::Active => None,
            AgentState::Revoked => Some("agent_revoked"),
            AgentState::Suspended => Some("agent_suspended"),
            AgentState::Expired => Some("agent_expired"),
        }
    }
}

/// One condition on the agent's lineage: its reason (revocation reason code, suspension cause),
/// when it was set, and the ancestor it comes from (`None`: the agent's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inherited {
    pub reason: String,
    pub at_ms: Option<u64>,
    pub via: Option<AgentRef>,
}

/// The earliest expiry on the agent's lineage, and the ancestor whose it is (`None`: its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub at_ms: u64,
    pub via: Option<AgentRef>,
}

/// What stops (or will stop) an agent's payments, counting every ancestor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// The nearest revocation on the lineage (the agent's own first).
    pub revoked: Option<Inherited>,
    /// The nearest suspension on the lineage.
    pub suspended: Option<Inherited>,
    /// The earliest expiry on the lineage, past or future.
    pub expires: Option<Expiry>,
    /// The state a hold made at `now_ms` would meet.
    pub state: AgentState,
    /// Whose state `state` is, when it is an ancestor's.
    pub via: Option<AgentRef>,
}

impl Standing {
    /// The standing of `lineage[0]` at `now_ms`, where `lineage` is the agent followed by its
    /// ancestors up to the root (as [`lineage_in`] and `Ledger::lineage` give it). Mirrors
    /// `gate` in `spendcap.lua`: revoked anywhere, then suspended anywhere, then expired
    /// anywhere (`expires_at <= now`), each looked for from the agent upwards.
    pub fn of(lineage: &[AgentRecord], now_ms: u64) -> Standing {
        let via = |index: usize| (index > 0).then(|| AgentRef::of(&lineage[index]));
        let revoked = nearest(lineage, |r| (r.revoked.as_ref(), r.revoked_at_ms));
        let suspended = nearest(lineage, |r| (r.suspended.as_ref(), r.suspended_at_ms));
        let expires = lineage
            .iter()
            .enumerate()
            .filter_map(|(index, record)| record.expires_at_ms.map(|at_ms| (at_ms, index)))
            .min_by_key(|(at_ms, index)| (*at_ms, *index))
            .map(|(at_ms, index)| Expiry { at_ms, via: via(index) });
        let (state, state_via) = if let Some(r) = &revoked {
            (AgentState::Revoked, r.via.clone())
        } else if let Some(s) = &suspended {
            (AgentState::Suspended, s.via.clone())
        } else {
            match &expires {
                Some(e) if e.at_ms <= now_ms => (AgentState::Expired, e.via.clone()),
                _ => (AgentState::Active, None),
            }
        };
        Standing { revoked, suspended, expires, state, via: state_via }
    }

    pub fn is_active(&self) -> bool {
        self.state == AgentState::Active
    }
}

/// The first condition `flag` finds (its reason and time), from the agent upwards.
fn nearest(
    lineage: &[AgentRecord],
    flag: impl Fn(&AgentRecord) -> (Option<&String>, Option<u64>),
) -> Option<Inherited> {
    lineage.iter().enumerate().find_map(|(index, record)| {
        let (reason, at_ms) = flag(record);
        reason.map(|reason| Inherited { reason: reason.clone(), at_ms, via: (index > 0).then(|| AgentRef::of(record)) })
    })
}

/// The lineage (the agent, then its ancestors up to the root) of `agent` among the agents of its
/// tree, e.g. from `Ledger::tree_agents`. Stops at an ancestor missing from `agents`.
pub fn lineage_in<'a>(agents: &'a [AgentRecord], agent: &AgentId) -> Vec<AgentRecord> {
    let by_id: std::collections::HashMap<&AgentId, &'a AgentRecord> = agents.iter().map(|a| (&a.id, a)).collect();
    let mut lineage = Vec::new();
    let mut next = by_id.get(agent).copied();
    while let Some(record) = next {
        lineage.push(record.clone());
        if lineage.len() > super::MAX_DEPTH as usize {
            break;
        }
        next = record.parent.as_ref().and_then(|parent| by_id.get(parent).copied());
    }
    lineage
}

/// The standing of every agent in `agents` (one tree's), in the same order.
pub fn standings_in(agents: &[AgentRecord], now_ms: u64) -> Vec<Standing> {
    agents.iter().map(|a| Standing::of(&lineage_in(agents, &a.id), now_ms)).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use adapters::Micros;

    use super::*;
    use crate::identity::TreeId;

    fn record(id: &AgentId, handle: &str, parent: Option<&AgentId>) -> AgentRecord {
        AgentRecord {
            id: id.clone(),
            handle: handle.into(),
            parent: parent.cloned(),
            depth: 1,
            cap: Micros::ZERO,
            spent: Micros::ZERO,
            held: Micros::ZERO,
            revoked: None,
            revoked_at_ms: None,
            expires_at_ms: None,
            created_at_ms: 0,
            labels: BTreeMap::new(),
            suspended: None,
            suspended_at_ms: None,
            task_of: None,
            archived_at_ms: None,
        }
    }

    fn tree() -> Vec<AgentRecord> {
        let tree = TreeId::generate();
        let (root, mid, leaf) = (AgentId::generate(&tree), AgentId::generate(&tree), AgentId::generate(&tree));
        vec![
            record(&root, "research", None),
            record(&mid, "research-sub", Some(&root)),
            record(&leaf, "leaf", Some(&mid)),
        ]
    }

    #[test]
    fn an_ancestors_revocation_is_inherited_with_its_handle() {
        let mut agents = tree();
        agents[0].revoked = Some("runaway_loop".into());
        agents[0].revoked_at_ms = Some(7);
        let standings = standings_in(&agents, 10);
        assert_eq!(standings[0].state, AgentState::Revoked);
        assert_eq!(standings[0].via, None);
        for standing in &standings[1..] {
            assert_eq!(standing.state, AgentState::Revoked);
            let via = standing.via.as_ref().expect("inherited");
            assert_eq!((via.id.as_str(), via.handle.as_str()), (agents[0].id.to_string().as_str(), "research"));
            let revoked = standing.revoked.as_ref().expect("revoked");
            assert_eq!((revoked.reason.as_str(), revoked.at_ms), ("runaway_loop", Some(7)));
        }
    }

    #[test]
    fn the_nearest_condition_wins_and_revocation_comes_before_suspension_and_expiry() {
        let mut agents = tree();
        agents[0].revoked = Some("root_reason".into());
        agents[1].revoked = Some("own_reason".into());
        agents[2].suspended = Some("velocity".into());
        agents[2].expires_at_ms = Some(5);
        let leaf = Standing::of(&lineage_in(&agents, &agents[2].id), 10);
        assert_eq!(leaf.state, AgentState::Revoked, "revoked anywhere comes first, as in the hold's gate");
        assert_eq!(leaf.revoked.as_ref().map(|r| r.reason.as_str()), Some("own_reason"), "the nearest revocation");
        assert_eq!(leaf.via.as_ref().map(|v| v.handle.as_str()), Some("research-sub"));
        assert_eq!(leaf.suspended.as_ref().map(|s| s.via.is_none()), Some(true));
    }

    #[test]
    fn suspension_and_expiry_are_inherited_too() {
        let mut agents = tree();
        agents[1].suspended = Some("velocity".into());
        let leaf = Standing::of(&lineage_in(&agents, &agents[2].id), 10);
        assert_eq!((leaf.state, leaf.via.map(|v| v.handle)), (AgentState::Suspended, Some("research-sub".into())));

        let mut agents = tree();
        agents[0].expires_at_ms = Some(100);
        agents[2].expires_at_ms = Some(200);
        let before = Standing::of(&lineage_in(&agents, &agents[2].id), 99);
        assert_eq!(before.state, AgentState::Active);
        assert_eq!(before.expires.as_ref().map(|e| e.at_ms), Some(100), "the earliest expiry on the lineage");
        let at = Standing::of(&lineage_in(&agents, &agents[2].id), 100);
        assert_eq!((at.state, at.via.map(|v| v.handle)), (AgentState::Expired, Some("research".into())));
        let root = Standing::of(&lineage_in(&agents, &agents[0].id), 100);
        assert_eq!((root.state, root.via), (AgentState::Expired, None));
    }
}
