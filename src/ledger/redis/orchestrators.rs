//! Orchestrators on Redis: sub-agents an agent funds itself, and task-scoped tokens (one FCALL
//! each: `spendcap_create_sub_agent`, `spendcap_revoke` with a caller, `spendcap_create_task_token`,
//! `spendcap_revoke_task_token`).

use std::collections::HashMap;

use super::{unavailable, RedisLedger};
use crate::identity::{AgentId, AgentToken, TreeId};
use crate::ledger::controls::alerts_to_wire;
use crate::ledger::{AgentSetup, Caller, LedgerError, NewAgent, TaskTokenInfo};

impl RedisLedger {
    pub async fn create_sub_agent(
        &self,
        now_ms: u64,
        caller: &Caller,
        agent: &NewAgent,
        setup: &AgentSetup,
    ) -> Result<(), LedgerError> {
        let parent =
            agent.parent.as_ref().ok_or_else(|| LedgerError::InvalidArgument("a sub-agent has a parent".into()))?;
        let handles = format!("{}:handles", self.namespace);
        let mut reserve = redis::cmd("HSETNX");
        reserve.arg(&handles).arg(&agent.handle).arg(agent.id.as_str());
        let reserved: bool = self.query(&reserve).await.map_err(unavailable)?;
        if !reserved {
            return Err(LedgerError::HandleTaken);
        }
        let labels = serde_json::to_string(&agent.labels).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
        let expires = agent.expires_at_ms.map(|t| t.to_string()).unwrap_or_default();
        let created = async {
            self.fcall(
                "spendcap_create_sub_agent",
                agent.id.tree(),
                &[
                    &now_ms.to_string(),
                    parent.as_str(),
                    caller.wire(),
                    agent.id.as_str(),
                    &agent.handle,
                    &agent.cap.to_string(),
                    &expires,
                    &labels,
                    agent.token_hash.as_str(),
                    &setup.controls.to_wire(),
                    &alerts_to_wire(&setup.alerts),
                    setup.task_of.as_deref().unwrap_or(""),
                ],
            )
            .await?
            .into_result()
        }
        .await;
        if let Err(err) = created {
            let mut release = redis::cmd("HDEL");
            release.arg(&handles).arg(&agent.handle);
            let _: Result<i64, _> = self.query(&release).await;
            return Err(err);
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
        let reply = self
            .fcall_resolving(
                "spendcap_revoke",
                agent.tree(),
                &[agent.as_str(), reason, &now_ms.to_string(), &format!("agent:{}", by.0), by.0.as_str(), by.1.wire()],
            )
            .await?
            .into_result()?;
        Ok((reply.u64("revoked_at")?, reply.get("already") == "1"))
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
        let (caller, wire) = by.map_or(("", "*"), |(id, caller)| (id.as_str(), caller.wire()));
        let reply = self
            .fcall(
                "spendcap_create_task_token",
                agent.tree(),
                &[
                    &now_ms.to_string(),
                    caller,
                    wire,
                    agent.as_str(),
                    id,
                    token.secret_hash().as_str(),
                    task,
                    &ttl_ms.to_string(),
                    actor,
                ],
            )
            .await?
            .into_result()?;
        reply.u64("expires_at")
    }

    pub async fn revoke_task_token(
        &self,
        now_ms: u64,
        by: Option<(&AgentId, &Caller)>,
        actor: &str,
        tree: &TreeId,
        token_id: &str,
        agent: Option<&AgentId>,
    ) -> Result<bool, LedgerError> {
        if !valid_token_id(token_id) {
            return Err(LedgerError::UnknownToken);
        }
        let (caller, wire) = by.map_or(("", "*"), |(id, caller)| (id.as_str(), caller.wire()));
        let reply = self
            // Safe to repeat: revoking a revoked token changes nothing.
            .fcall_resolving(
                "spendcap_revoke_task_token",
                tree,
                &[&now_ms.to_string(), caller, wire, token_id, agent.map(AgentId::as_str).unwrap_or(""), actor],
            )
            .await?
            .into_result()?;
        Ok(reply.get("already") == "1")
    }

    pub async fn task_tokens(&self, agent: &AgentId) -> Result<Vec<TaskTokenInfo>, LedgerError> {
        let prefix = self.tree_key(agent.tree());
        let mut members = redis::cmd("SMEMBERS");
        members.arg(format!("{prefix}:tts:{agent}"));
        let ids: Vec<String> = self.query(&members).await.map_err(unavailable)?;
        let mut tokens = Vec::with_capacity(ids.len());
        for id in ids {
            let mut read = redis::cmd("HGETALL");
            read.arg(format!("{prefix}:tt:{id}"));
            let fields: HashMap<String, String> = self.query(&read).await.map_err(unavailable)?;
            // Kept a week past its expiry, then gone: no longer listed.
            if fields.is_empty() {
                continue;
            }
            tokens.push(crate::ledger::task_token_from_fields(id, agent, |k| fields.get(k).cloned())?);
        }
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(tokens)
    }
}

/// A task token id as [`AgentToken::generate_task`] makes them: 16 lowercase hex.
pub(crate) fn valid_token_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
