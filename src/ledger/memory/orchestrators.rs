//! Orchestrators in the memory ledger: the same semantics as `spendcap_create_sub_agent`,
//! `spendcap_revoke` with a caller, `spendcap_create_task_token`, `spendcap_revoke_task_token`
//! and `check_token` in `spendcap.lua`, under the one mutex.

use super::{check_setup, insert_agent, MemoryLedger, Tree, EXPIRE_MAX};
use crate::identity::{AgentId, AgentToken, TokenHash, TreeId};
use crate::ledger::controls::{listed, Period};
use crate::ledger::{AgentSetup, Caller, LedgerError, LogEntry, NewAgent, RefusalReason, TaskTokenInfo};

const MAX_SUB_AGENTS: usize = 1000;
const MAX_TASK_TOKEN_TTL_MS: u64 = 30 * 86_400_000;

/// A task-scoped token as stored.
pub(super) struct TaskTokenRec {
    agent: AgentId,
    hash: TokenHash,
    task: String,
    expires_at_ms: u64,
    created_at_ms: u64,
    by: String,
    revoked_at_ms: Option<u64>,
}

fn exceeds(bound: &str, detail: String) -> LedgerError {
    LedgerError::SubAgentExceedsParent { bound: bound.to_owned(), detail }
}

impl Tree {
    /// `check_token` of the Lua library: the agent's own token, or one of its task tokens (live
    /// at `now` when given). Returns the task a task token is for.
    pub(super) fn check_token(
        &self,
        agent: &AgentId,
        stored: &TokenHash,
        caller: &Caller,
        now: Option<u64>,
    ) -> Result<Option<String>, LedgerError> {
        let Caller::Agent(hash) = caller else { return Ok(None) };
        let Some(rest) = hash.as_str().strip_prefix('t') else {
            return if stored.matches(hash) { Ok(None) } else { Err(LedgerError::Unauthorized) };
        };
        let (id, sha) = rest.split_once(':').ok_or(LedgerError::Unauthorized)?;
        let t = self.task_tokens.get(id).ok_or(LedgerError::Unauthorized)?;
        if &t.agent != agent || !t.hash.matches(&TokenHash::of_hex(sha)) {
            return Err(LedgerError::Unauthorized);
        }
        if let Some(now) = now {
            if t.revoked_at_ms.is_some() {
                return Err(LedgerError::TokenRevoked);
            }
            if t.expires_at_ms <= now {
                return Err(LedgerError::TokenExpired);
            }
        }
        Ok(Some(t.task.clone()))
    }

    /// Revoked, suspended or expired anywhere on `path` (the first checks of `gate`).
    fn standing_refusal(&self, path: &[AgentId], now: u64) -> Option<(RefusalReason, String)> {
        let levels: Vec<_> = path.iter().filter_map(|id| self.agents.get(id.as_str())).collect();
        if let Some(l) = levels.iter().find(|l| l.record.revoked.is_some()) {
            return Some((RefusalReason::AgentRevoked, l.record.id.to_string()));
        }
        if let Some(l) = levels.iter().find(|l| l.record.suspended.is_some()) {
            return Some((RefusalReason::AgentSuspended, l.record.id.to_string()));
        }
        if let Some(l) = levels.iter().find(|l| l.record.expires_at_ms.is_some_and(|t| t <= now)) {
            return Some((RefusalReason::AgentExpired, l.record.id.to_string()));
        }
        None
    }

    /// `live_ancestor` of the Lua library: the caller authenticated by its own token and live;
    /// `target` (with its path), when given, one of its descendants.
    fn live_ancestor(
        &self,
        caller: &AgentId,
        token: &Caller,
        now: u64,
        target: Option<(&AgentId, &[AgentId])>,
    ) -> Result<Vec<AgentId>, LedgerError> {
        let a = self.agents.get(caller.as_str()).ok_or(LedgerError::UnknownAgent)?;
        if let Caller::Agent(hash) = token {
            if hash.as_str().starts_with('t') {
                return Err(LedgerError::TaskTokenNotAllowed);
            }
            if !a.token.matches(hash) {
                return Err(LedgerError::Unauthorized);
            }
        }
        if let Some((target, path)) = target {
            if !path.iter().any(|id| id == caller && id != target) {
                return Err(LedgerError::NotDescendant);
            }
        }
        if let Some((reason, by)) = self.standing_refusal(&a.path, now) {
            return Err(LedgerError::CallerNotLive { reason, by });
        }
        Ok(a.path.clone())
    }
}

impl MemoryLedger {
    pub async fn create_sub_agent(
        &self,
        now_ms: u64,
        caller: &Caller,
        new: &NewAgent,
        setup: &AgentSetup,
    ) -> Result<(), LedgerError> {
        let parent =
            new.parent.clone().ok_or_else(|| LedgerError::InvalidArgument("a sub-agent has a parent".into()))?;
        check_setup(&setup.controls, &setup.alerts)?;
        let mut state = self.lock();
        let tree_id = parent.tree().clone();
        {
            let tree = state.trees.get_mut(&tree_id).ok_or(LedgerError::UnknownAgent)?;
            let path = tree.live_ancestor(&parent, caller, now_ms, None)?;
            tree.expire_due(&tree_id, now_ms, EXPIRE_MAX);
            let (mut room, _) = tree.available(&path);
            let subs = tree.sub_agents.get(parent.as_str()).cloned().unwrap_or_default();
            if subs.len() >= MAX_SUB_AGENTS {
                return Err(LedgerError::TooManySubAgents);
            }
            for id in &subs {
                let Some(c) = tree.agents.get(id.as_str()) else { continue };
                let r = &c.record;
                let dead = r.revoked.is_some() || r.expires_at_ms.is_some_and(|t| t <= now_ms);
                if !dead {
                    room = room.saturating_sub(r.cap.get().saturating_sub(r.spent.get() + r.held.get()));
                }
            }
            let cap = new.cap.get();
            if cap > room {
                return Err(exceeds("cap", format!("the cap {cap} is above what the parent has left to give, {room}")));
            }
            let latest =
                path.iter().filter_map(|id| tree.agents.get(id.as_str()).and_then(|a| a.record.expires_at_ms)).min();
            if let (Some(latest), Some(at)) = (latest, new.expires_at_ms) {
                if at > latest {
                    return Err(exceeds("expires_at", format!("the expiry is after the parent's, {latest}")));
                }
            }
            let p = &tree.agents.get(parent.as_str()).ok_or(LedgerError::UnknownAgent)?.controls;
            let cc = &setup.controls;
            for (name, mine, theirs) in
                [("per_payment", cc.per_payment, p.per_payment), ("task", cc.task_cap, p.task_cap)]
            {
                if let (Some(mine), Some(theirs)) = (mine, theirs) {
                    if mine > theirs {
                        return Err(exceeds(name, format!("the {name} limit is above the parent's, {theirs}")));
                    }
                }
            }
            for period in Period::COUNTED {
                if let (Some(mine), Some(theirs)) = (cc.limit(period), p.limit(period)) {
                    let start = period.start_ms(now_ms);
                    let counter = format!("p:{parent}:{}:{start}", period.as_str());
                    let used = tree.counters.get(&counter).map(|c| c.spent + c.held).unwrap_or(0);
                    let left = theirs.saturating_sub(used);
                    if mine > left {
                        let name = period.as_str();
                        return Err(exceeds(
                            name,
                            format!("the {name} limit is above what is left of the parent's, {left}"),
                        ));
                    }
                }
            }
            for (name, mine, theirs) in [
                ("svc_allow", &cc.services_allow, &p.services_allow),
                ("proto_allow", &cc.protocols_allow, &p.protocols_allow),
            ] {
                if !theirs.is_empty() {
                    if let Some(out) = mine.iter().find(|n| !listed(theirs, std::slice::from_ref(*n))) {
                        return Err(exceeds(name, format!("{out} is not on the parent's {name} list")));
                    }
                }
            }
            for (name, mine, theirs) in [
                ("svc_deny", &cc.services_deny, &p.services_deny),
                ("proto_deny", &cc.protocols_deny, &p.protocols_deny),
            ] {
                if !mine.is_empty() {
                    if let Some(left_out) = theirs.iter().find(|n| !mine.contains(n)) {
                        return Err(exceeds(
                            name,
                            format!("the list leaves out {left_out}, on the parent's {name} list"),
                        ));
                    }
                }
            }
        }
        insert_agent(&mut state, now_ms, new, setup, "sub_agent", &format!("agent:{parent}"))?;
        if let Some(tree) = state.trees.get_mut(&tree_id) {
            tree.sub_agents.entry(parent.to_string()).or_default().insert(new.id.to_string());
        }
        Ok(())
    }

    pub async fn revoke_by(
        &self,
        now_ms: u64,
        by: (&AgentId, &Caller),
        agent: &AgentId,
        reason: &str,
    ) -> Result<(u64, bool), LedgerError> {
        if by.0.tree() != agent.tree() {
            return Err(LedgerError::NotDescendant);
        }
        if reason.is_empty()
            || reason.len() > 64
            || !reason.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(LedgerError::InvalidArgument("reason must be 1 to 64 characters of [A-Za-z0-9_.-]".into()));
        }
        // The check and the revocation under one lock, as in one FCALL.
        self.with_tree(agent.tree(), |tree| {
            let path = tree.agents.get(agent.as_str()).ok_or(LedgerError::UnknownAgent)?.path.clone();
            tree.live_ancestor(by.0, by.1, now_ms, Some((agent, &path)))?;
            let a = tree.agents.get_mut(agent.as_str()).ok_or(LedgerError::UnknownAgent)?;
            if let Some(at) = a.record.revoked_at_ms.filter(|_| a.record.revoked.is_some()) {
                return Ok((at, true));
            }
            a.record.revoked = Some(reason.to_owned());
            a.record.revoked_at_ms = Some(now_ms);
            tree.log(
                agent.tree(),
                LogEntry {
                    ts_ms: now_ms,
                    event: "revoke".into(),
                    agent: agent.to_string(),
                    reason: reason.into(),
                    by: format!("agent:{}", by.0),
                    ..LogEntry::default()
                },
            );
            Ok((now_ms, false))
        })
    }

    #[allow(clippy::too_many_arguments)] // one per FCALL argument, as the ledger's other calls
    pub async fn create_task_token(
        &self,
        now_ms: u64,
        by: Option<(&AgentId, &Caller)>,
        actor: &str,
        agent: &AgentId,
        token: &AgentToken,
        task: &str,
        ttl_ms: u64,
    ) -> Result<u64, LedgerError> {
        if by.is_some_and(|(caller, _)| caller.tree() != agent.tree()) {
            return Err(LedgerError::NotDescendant);
        }
        let id = token.task_token_id().ok_or_else(|| LedgerError::InvalidArgument("not a task token".into()))?;
        if task.is_empty() || task.len() > 128 {
            return Err(LedgerError::InvalidArgument("task is 1 to 128 bytes".into()));
        }
        if !(1000..=MAX_TASK_TOKEN_TTL_MS).contains(&ttl_ms) {
            return Err(LedgerError::InvalidArgument("ttl must be from 1 s to 30 days".into()));
        }
        let mut state = self.lock();
        let Some(tree) = state.trees.get_mut(agent.tree()) else {
            return Err(if by.is_some() { LedgerError::Unauthorized } else { LedgerError::UnknownAgent });
        };
        if let Some((caller, token)) = by {
            tree.live_ancestor(caller, token, now_ms, None)?;
        }
        let Some(target) = tree.agents.get(agent.as_str()) else {
            return Err(if by.is_some() { LedgerError::NotDescendant } else { LedgerError::UnknownAgent });
        };
        let path = target.path.clone();
        if by.is_some_and(|(caller, _)| !path.contains(caller)) {
            return Err(LedgerError::NotDescendant);
        }
        if let Some((reason, by)) = tree.standing_refusal(&path, now_ms) {
            return Err(LedgerError::CallerNotLive { reason, by });
        }
        if tree.task_tokens.contains_key(id) {
            return Err(LedgerError::TokenExists);
        }
        let expires_at_ms = now_ms + ttl_ms;
        let by = by.map(|(caller, _)| caller.to_string()).unwrap_or_default();
        tree.task_tokens.insert(
            id.to_owned(),
            TaskTokenRec {
                agent: agent.clone(),
                hash: token.secret_hash(),
                task: task.to_owned(),
                expires_at_ms,
                created_at_ms: now_ms,
                by: by.clone(),
                revoked_at_ms: None,
            },
        );
        tree.agent_task_tokens.entry(agent.to_string()).or_default().insert(id.to_owned());
        let detail = serde_json::json!({ "token_id": id, "expires_at_ms": expires_at_ms, "by": by }).to_string();
        tree.log(
            agent.tree(),
            LogEntry {
                ts_ms: now_ms,
                event: "token".into(),
                agent: agent.to_string(),
                task: task.to_owned(),
                reason: "created".into(),
                detail,
                by: actor_of(&by, actor),
                ..LogEntry::default()
            },
        );
        Ok(expires_at_ms)
    }

    pub async fn revoke_task_token(
        &self,
        now_ms: u64,
        by: Option<(&AgentId, &Caller)>,
        actor: &str,
        tree_id: &TreeId,
        token_id: &str,
        agent: Option<&AgentId>,
    ) -> Result<bool, LedgerError> {
        let mut state = self.lock();
        let tree = state.trees.get_mut(tree_id).ok_or(LedgerError::UnknownToken)?;
        if let Some((caller, token)) = by {
            tree.live_ancestor(caller, token, now_ms, None)?;
        }
        let t = tree.task_tokens.get(token_id).ok_or(LedgerError::UnknownToken)?;
        if agent.is_some_and(|a| a != &t.agent) {
            return Err(LedgerError::UnknownToken);
        }
        let owner = t.agent.clone();
        if let Some((caller, _)) = by {
            let path = tree.agents.get(owner.as_str()).map(|a| a.path.clone()).unwrap_or_default();
            if !path.contains(caller) {
                return Err(LedgerError::UnknownToken);
            }
        }
        let t = tree.task_tokens.get_mut(token_id).ok_or(LedgerError::UnknownToken)?;
        if t.revoked_at_ms.is_some() {
            return Ok(true);
        }
        t.revoked_at_ms = Some(now_ms);
        let task = t.task.clone();
        let by = by.map(|(caller, _)| caller.to_string()).unwrap_or_default();
        let detail = serde_json::json!({ "token_id": token_id, "by": by }).to_string();
        tree.log(
            tree_id,
            LogEntry {
                ts_ms: now_ms,
                event: "token".into(),
                agent: owner.to_string(),
                task,
                reason: "revoked".into(),
                detail,
                by: actor_of(&by, actor),
                ..LogEntry::default()
            },
        );
        Ok(false)
    }

    pub async fn task_tokens(&self, agent: &AgentId) -> Result<Vec<TaskTokenInfo>, LedgerError> {
        let state = self.lock();
        let Some(tree) = state.trees.get(agent.tree()) else { return Ok(Vec::new()) };
        let ids = tree.agent_task_tokens.get(agent.as_str()).cloned().unwrap_or_default();
        let mut tokens: Vec<TaskTokenInfo> = ids
            .iter()
            .filter_map(|id| {
                let t = tree.task_tokens.get(id)?;
                Some(TaskTokenInfo {
                    id: id.clone(),
                    agent: t.agent.clone(),
                    task: t.task.clone(),
                    expires_at_ms: t.expires_at_ms,
                    created_at_ms: t.created_at_ms,
                    by: Some(t.by.clone()).filter(|b| !b.is_empty()),
                    revoked_at_ms: t.revoked_at_ms,
                })
            })
            .collect();
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(tokens)
    }
}

/// Who a task-token change is by, for the log (as `actor_of` in the Lua library): `agent:<id>`
/// for an agent caller (`caller`, its id; "" for none), else the admin-side principal `actor`.
fn actor_of(caller: &str, actor: &str) -> String {
    if caller.is_empty() {
        actor.to_owned()
    } else {
        format!("agent:{caller}")
    }
}
