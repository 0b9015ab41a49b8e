//! The production ledger: the `spendcap` Redis Functions library, one FCALL per operation.
//!
//! Keys (see `spendcap.lua` for the per-tree layout): every key of a budget tree starts with
//! `<ns>:{<tree>}`, so a tree lives in one hash slot. Two keys are global and are never touched
//! by a function: `<ns>:handles` (handle → agent id) and `<ns>:trees` (the set of tree ids).

use std::time::Duration;

use adapters::{Micros, Protocol};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, ServerErrorKind, Value};

use super::controls::{alerts_from_wire, alerts_to_wire, Controls, Period};
use super::{
    agent_from_fields, bucket_from_fields, hold_from_fields, log_entry_from_fields, receipt_from_hold, AgentControls,
    AgentRecord, AgentSetup, AlertRead, Balance, Bucket, Caller, ChainHead, EndsPurchase, HoldInfo, HoldOutcome,
    HoldRequest, IdempotencyFinish, IdempotencyMode, LedgerError, LogEntry, MarkedUnknown, NewAgent, PartSettled,
    PeriodUsage, ReceiptFacts, ReceiptLink, Refusal, Reply, SettleOutcome, TaskOutcome, ALERT_GROUP,
    IDEMPOTENCY_RETENTION_MS,
};
use crate::identity::{AgentId, HoldId, TokenHash, TreeId};
use crate::operators::{NewOperator, OperatorRecord};
use crate::roles::Actor;

mod orchestrators;

/// The Lua source of the Redis Functions library, loaded with `FUNCTION LOAD REPLACE`.
pub const LIBRARY: &str = include_str!("spendcap.lua");

#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port/db`; for a cluster, any number of comma-separated node URLs.
    pub url: String,
    pub cluster: bool,
    /// The namespace every key starts with (default `sc`).
    pub namespace: String,
    /// How long one command may take before the ledger counts as unavailable.
    pub timeout: Duration,
    /// Whose clock the ledger's functions read. Always [`LedgerClock::Redis`] in the binary.
    pub clock: LedgerClock,
}

/// Whose clock decides expiry, periods and windows inside the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LedgerClock {
    /// Redis's own (`TIME` inside every function): one clock for every instance.
    #[default]
    Redis,
    /// The `now_ms` each call passes: a test seam, so that tests move time without sleeping. It
    /// loads the library with `TEST_CLOCK` set; nothing in the binary's flags or environment can
    /// select it.
    Caller,
}

impl LedgerClock {
    fn library(self) -> std::borrow::Cow<'static, str> {
        match self {
            LedgerClock::Redis => std::borrow::Cow::Borrowed(LIBRARY),
            LedgerClock::Caller => {
                std::borrow::Cow::Owned(LIBRARY.replacen("local TEST_CLOCK = false", "local TEST_CLOCK = true", 1))
            }
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisLedger {
    conn: Conn,
    namespace: String,
    clock: LedgerClock,
    timeout: Duration,
}

fn unavailable(err: RedisError) -> LedgerError {
    LedgerError::Unavailable(err.to_string())
}

/// A failed call that changes state: `Unavailable` only when it is known not to have reached
/// Redis (the connection was refused); a timeout or a connection lost after sending may have run.
fn failed(err: RedisError) -> LedgerError {
    if !err.is_connection_refusal() && (err.is_timeout() || err.is_io_error() || err.is_connection_dropped()) {
        LedgerError::OutcomeUnknown { cause: err.to_string(), retry_key: None }
    } else {
        unavailable(err)
    }
}

/// For a call that changes nothing the caller asked for (a balance read, a precheck): whatever
/// became of a timed-out call, nothing was paid, so the honest answer is `ledger_unavailable`.
fn changed_nothing(err: LedgerError) -> LedgerError {
    match err {
        LedgerError::OutcomeUnknown { cause, .. } => LedgerError::Unavailable(cause),
        other => other,
    }
}

/// Redis lost the function library (restarted empty, flushed, a new cluster node): `FCALL`
/// answers the generic `ERR` code, and the detail is the only thing that tells this case apart
/// from a script's own error, so it is matched exactly (`ERR Function not found`), never as a
/// substring of the whole message.
fn is_function_missing(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::ResponseError) && err.detail() == Some("Function not found")
}

/// `XGROUP CREATE` of a group that exists: Redis's own `BUSYGROUP` error code.
fn is_busy_group(err: &RedisError) -> bool {
    err.code() == Some("BUSYGROUP")
}

/// How many timeouts' worth of time a call whose answer was lost is re-asked for before the
/// daemon answers `ledger_outcome_unknown`.
const RESOLVE_TIMEOUTS: u32 = 3;

impl RedisLedger {
    /// Connects and loads the function library (replacing an older version of it).
    pub async fn connect(config: &RedisConfig) -> Result<RedisLedger, LedgerError> {
        let ledger = RedisLedger::connect_without_loading(config).await?;
        ledger.load_library().await?;
        Ok(ledger)
    }

    /// Connects without touching the function library: for read-only tools such as the audit.
    pub async fn connect_without_loading(config: &RedisConfig) -> Result<RedisLedger, LedgerError> {
        let conn = if config.cluster {
            let nodes: Vec<&str> = config.url.split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(config.timeout)
                .response_timeout(config.timeout)
                .build()
                .map_err(unavailable)?;
            Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
        } else {
            let client = redis::Client::open(config.url.as_str()).map_err(unavailable)?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1);
            Conn::Single(ConnectionManager::new_with_config(client, manager_config).await.map_err(unavailable)?)
        };
        Ok(RedisLedger { conn, namespace: config.namespace.clone(), clock: config.clock, timeout: config.timeout })
    }

    async fn load_library(&self) -> Result<(), LedgerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(self.clock.library().as_ref());
        let _: Value = self.query(&cmd).await.map_err(unavailable)?;
        Ok(())
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        match &self.conn {
            Conn::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Conn::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
        }
    }

    fn tree_key(&self, tree: &TreeId) -> String {
        format!("{}:{{{}}}", self.namespace, tree)
    }

    /// Calls one function of the library. If Redis lost the library (restarted empty, flushed),
    /// loads it again and retries once: the call had not run, so retrying cannot debit twice.
    async fn fcall(&self, function: &str, tree: &TreeId, args: &[&str]) -> Result<Reply, LedgerError> {
        self.fcall_at(function, &self.tree_key(tree), args).await
    }

    /// [`Self::fcall`] with any key prefix as KEYS[1] (the operators' `<ns>:{ops}`).
    async fn fcall_at(&self, function: &str, key: &str, args: &[&str]) -> Result<Reply, LedgerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function).arg(1).arg(key);
        for arg in args {
            cmd.arg(*arg);
        }
        let parts: Vec<String> = match self.query(&cmd).await {
            Ok(parts) => parts,
            Err(err) if is_function_missing(&err) => {
                tracing::warn!("the spendcap function library is missing from Redis; loading it again");
                self.load_library().await?;
                self.query(&cmd).await.map_err(failed)?
            }
            Err(err) => return Err(failed(err)),
        };
        Reply::new(parts)
    }

    /// [`Self::fcall`] for a call that is safe to repeat (a hold with an idempotency key, a
    /// settle, a void, a mark: a repeat replays the first result). When the answer is lost, asks
    /// again with the same arguments until Redis answers or a few timeouts have passed; only then
    /// is the outcome unknown.
    async fn fcall_resolving(&self, function: &str, tree: &TreeId, args: &[&str]) -> Result<Reply, LedgerError> {
        let first = self.fcall(function, tree, args).await;
        let Err(LedgerError::OutcomeUnknown { .. }) = &first else { return first };
        let deadline = tokio::time::Instant::now() + self.timeout * RESOLVE_TIMEOUTS;
        let mut last = first;
        while tokio::time::Instant::now() < deadline {
            tracing::warn!(function, "a ledger call's answer was lost; asking again with the same key");
            match self.fcall(function, tree, args).await {
                // The first call may have run: a failure to re-ask leaves the outcome unknown.
                Err(LedgerError::Unavailable(cause)) => {
                    last = Err(LedgerError::OutcomeUnknown { cause, retry_key: None });
                    tokio::time::sleep(self.timeout / 4).await;
                }
                Err(err @ LedgerError::OutcomeUnknown { .. }) => last = Err(err),
                resolved => return resolved,
            }
        }
        last
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        let _: String = self.query(&redis::cmd("PING")).await.map_err(unavailable)?;
        Ok(())
    }

    /// The source of the `spendcap` function library Redis has loaded, `None` when it has none.
    /// Read-only (`FUNCTION LIST`), for `spendcap doctor` to compare with [`LIBRARY`].
    pub async fn loaded_library(&self) -> Result<Option<String>, LedgerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LIST").arg("LIBRARYNAME").arg("spendcap").arg("WITHCODE");
        let libraries: Value = self.query(&cmd).await.map_err(unavailable)?;
        // One entry per library whose name starts with `spendcap`: a flat list of field, value
        // pairs (RESP2) or a map (RESP3).
        let Value::Array(libraries) = libraries else { return Ok(None) };
        for library in libraries {
            let pairs: Vec<(Value, Value)> = match library {
                Value::Array(flat) => {
                    let mut flat = flat.into_iter();
                    std::iter::from_fn(|| Some((flat.next()?, flat.next()?))).collect()
                }
                Value::Map(pairs) => pairs,
                _ => continue,
            };
            let text = |v: &Value| String::from_redis_value(v.clone()).ok();
            let field =
                |name: &str| pairs.iter().find(|(k, _)| text(k).as_deref() == Some(name)).and_then(|(_, v)| text(v));
            if field("library_name").as_deref() == Some("spendcap") {
                return Ok(field("library_code"));
            }
        }
        Ok(None)
    }

    /// Redis's clock (`TIME`), in milliseconds since the Unix epoch: the clock every ledger
    /// function decides by (on a cluster, the answering node's; nodes keep NTP time). `None` when
    /// the library was loaded with [`LedgerClock::Caller`]: the functions then decide by the
    /// caller's clock, which therefore cannot be off theirs.
    pub async fn server_time_ms(&self) -> Result<Option<u64>, LedgerError> {
        if self.clock == LedgerClock::Caller {
            return Ok(None);
        }
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await.map_err(unavailable)?;
        Ok(Some(secs * 1000 + micros / 1000))
    }

    pub async fn create_agent(&self, now_ms: u64, agent: &NewAgent) -> Result<(), LedgerError> {
        self.create_agent_with(now_ms, agent, &AgentSetup::default()).await
    }

    pub async fn create_agent_with(
        &self,
        now_ms: u64,
        agent: &NewAgent,
        setup: &AgentSetup,
    ) -> Result<(), LedgerError> {
        let handles = format!("{}:handles", self.namespace);
        let mut reserve = redis::cmd("HSETNX");
        reserve.arg(&handles).arg(&agent.handle).arg(agent.id.as_str());
        let reserved: bool = self.query(&reserve).await.map_err(unavailable)?;
        if !reserved {
            return Err(LedgerError::HandleTaken);
        }
        let tree = agent.id.tree();
        let mut register = redis::cmd("SADD");
        register.arg(format!("{}:trees", self.namespace)).arg(tree.as_str());
        let created = async {
            let _: i64 = self.query(&register).await.map_err(unavailable)?;
            let labels = serde_json::to_string(&agent.labels).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
            let expires = agent.expires_at_ms.map(|t| t.to_string()).unwrap_or_default();
            let parent = agent.parent.as_ref().map(AgentId::as_str).unwrap_or("");
            self.fcall(
                "spendcap_create_agent",
                tree,
                &[
                    &now_ms.to_string(),
                    agent.id.as_str(),
                    &agent.handle,
                    parent,
                    &agent.cap.to_string(),
                    &expires,
                    &labels,
                    agent.token_hash.as_str(),
                    &setup.controls.to_wire(),
                    &alerts_to_wire(&setup.alerts),
                    setup.task_of.as_deref().unwrap_or(""),
                    "",
                    &setup.by,
                ],
            )
            .await?
            .into_result()
        }
        .await;
        if let Err(err) = created {
            // Give the handle back; the tree id stays registered, which is harmless (empty).
            let mut release = redis::cmd("HDEL");
            release.arg(&handles).arg(&agent.handle);
            let _: Result<i64, _> = self.query(&release).await;
            return Err(err);
        }
        Ok(())
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
        let lower_only = if actor.tighten_only { "1" } else { "" };
        let reply = self
            .fcall(
                "spendcap_set_cap",
                agent.tree(),
                &[&now_ms.to_string(), agent.as_str(), &cap.to_string(), &actor.by, lower_only],
            )
            .await?
            .into_result()?;
        reply.micros("previous")
    }

    pub async fn set_controls(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
    ) -> Result<(), LedgerError> {
        // Safe to repeat: the same controls are set again.
        self.fcall_resolving(
            "spendcap_set_controls",
            agent.tree(),
            &[&now_ms.to_string(), agent.as_str(), &controls.controls.to_wire(), &alerts_to_wire(&controls.alerts)],
        )
        .await?
        .into_result()?;
        Ok(())
    }

    pub async fn controls(&self, agent: &AgentId) -> Result<AgentControls, LedgerError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(format!("{}:a:{}", self.tree_key(agent.tree()), agent)).arg("path").arg("ctl").arg("alerts");
        let fields: Vec<Option<String>> = self.query(&cmd).await.map_err(unavailable)?;
        if fields.first().is_none_or(Option::is_none) {
            return Err(LedgerError::UnknownAgent);
        }
        let ctl = fields.get(1).cloned().flatten().unwrap_or_default();
        let controls =
            Controls::from_wire(&ctl).ok_or_else(|| LedgerError::Corrupt(format!("agent {agent} controls {ctl:?}")))?;
        let alerts = alerts_from_wire(&fields.get(2).cloned().flatten().unwrap_or_default());
        Ok(AgentControls { controls, alerts })
    }

    pub async fn set_expiry(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
    ) -> Result<Option<u64>, LedgerError> {
        let at = expires_at_ms.map(|t| t.to_string()).unwrap_or_default();
        let reply = self
            // Safe to repeat: the same expiry is set again.
            .fcall_resolving("spendcap_set_expiry", agent.tree(), &[&now_ms.to_string(), agent.as_str(), &at])
            .await?
            .into_result()?;
        Ok(reply.opt_u64("previous"))
    }

    pub async fn reinstate(&self, now_ms: u64, agent: &AgentId) -> Result<Option<String>, LedgerError> {
        let reply = self
            .fcall("spendcap_reinstate", agent.tree(), &[agent.as_str(), &now_ms.to_string()])
            .await?
            .into_result()?;
        Ok(reply.opt_string("was"))
    }

    pub async fn periods(&self, agent: &AgentId, limit: usize) -> Result<Vec<PeriodUsage>, LedgerError> {
        let prefix = self.tree_key(agent.tree());
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(format!("{prefix}:pi:{agent}")).arg("+inf").arg("-inf").arg("BYSCORE").arg("REV").arg("LIMIT").arg(0);
        cmd.arg(limit.max(1));
        let members: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(members.len());
        for member in members {
            let Some((kind, start)) = member.split_once(':') else { continue };
            let (Some(period), Ok(start_ms)) = (Period::parse(kind), start.parse::<u64>()) else { continue };
            let fields = self.hash(format!("{prefix}:p:{agent}:{member}")).await?;
            let money = |k: &str| {
                Micros::new(fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0))
                    .map_err(|e| LedgerError::Corrupt(format!("period {member}: {e}")))
            };
            out.push(PeriodUsage {
                period,
                start_ms,
                end_ms: period.end_ms(start_ms),
                spent: money("spent")?,
                held: money("held")?,
            });
        }
        Ok(out)
    }

    pub async fn task_usage(&self, agent: &AgentId, task: &str) -> Result<Option<(Micros, Micros)>, LedgerError> {
        let key = format!("{}:t:{}:{}", self.tree_key(agent.tree()), agent, super::task_digest(task));
        let fields = self.hash(key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let money = |k: &str| {
            Micros::new(fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0))
                .map_err(|e| LedgerError::Corrupt(format!("task counter: {e}")))
        };
        Ok(Some((money("spent")?, money("held")?)))
    }

    pub async fn ensure_alert_group(&self, tree: &TreeId) -> Result<(), LedgerError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(format!("{}:log", self.tree_key(tree))).arg(ALERT_GROUP).arg("$").arg("MKSTREAM");
        match self.query::<Value>(&cmd).await {
            Ok(_) => Ok(()),
            Err(err) if is_busy_group(&err) => Ok(()),
            Err(err) => Err(unavailable(err)),
        }
    }

    pub async fn read_alerts(
        &self,
        tree: &TreeId,
        consumer: &str,
        read: AlertRead,
        count: usize,
    ) -> Result<Vec<LogEntry>, LedgerError> {
        let key = format!("{}:log", self.tree_key(tree));
        let entries: Vec<redis::streams::StreamId> = match read {
            AlertRead::New | AlertRead::Pending => {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP").arg(ALERT_GROUP).arg(consumer).arg("COUNT").arg(count).arg("STREAMS").arg(&key);
                cmd.arg(if read == AlertRead::New { ">" } else { "0" });
                let reply: Option<redis::streams::StreamReadReply> = self.query(&cmd).await.map_err(unavailable)?;
                reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default()
            }
            AlertRead::Stale { min_idle_ms } => {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&key).arg(ALERT_GROUP).arg(consumer).arg(min_idle_ms).arg("0").arg("COUNT").arg(count);
                let reply: redis::streams::StreamAutoClaimReply = self.query(&cmd).await.map_err(unavailable)?;
                reply.claimed
            }
        };
        Ok(entries
            .into_iter()
            .map(|entry| {
                let get = |k: &str| entry.get::<String>(k);
                log_entry_from_fields(tree, entry.id.clone(), get)
            })
            .collect())
    }

    pub async fn ack_alerts(&self, tree: &TreeId, ids: &[String]) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(format!("{}:log", self.tree_key(tree))).arg(ALERT_GROUP);
        for id in ids {
            cmd.arg(id);
        }
        let _: i64 = self.query(&cmd).await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn revoke(&self, now_ms: u64, agent: &AgentId, reason: &str) -> Result<(u64, bool), LedgerError> {
        let reply = self
            // Safe to repeat: revoking a revoked agent changes nothing (and says `already`).
            .fcall_resolving("spendcap_revoke", agent.tree(), &[agent.as_str(), reason, &now_ms.to_string()])
            .await?
            .into_result()?;
        Ok((reply.u64("revoked_at")?, reply.get("already") == "1"))
    }

    /// Archives `agent` (one FCALL: revoke unless revoked, mark, log), then frees its handle if it
    /// still names this agent. Only an archive removes a handle, so no other agent can have taken
    /// it between the two steps. Returns (archived_at, already, handle).
    pub async fn archive(&self, now_ms: u64, agent: &AgentId) -> Result<(u64, bool, String), LedgerError> {
        self.archive_as(now_ms, agent, &Actor::default()).await
    }

    pub async fn archive_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<(u64, bool, String), LedgerError> {
        let reply = self
            .fcall("spendcap_archive", agent.tree(), &[agent.as_str(), &now_ms.to_string(), &actor.by])
            .await?
            .into_result()?;
        let handle = reply.get("handle").to_owned();
        let handles = format!("{}:handles", self.namespace);
        let mut owner = redis::cmd("HGET");
        owner.arg(&handles).arg(&handle);
        let owner: Option<String> = self.query(&owner).await.map_err(unavailable)?;
        if owner.as_deref() == Some(agent.as_str()) {
            let mut free = redis::cmd("HDEL");
            free.arg(&handles).arg(&handle);
            let _: i64 = self.query(&free).await.map_err(unavailable)?;
        }
        Ok((reply.u64("archived_at")?, reply.get("already") == "1", handle))
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
        // Safe to repeat: the same token hash is set again.
        self.fcall_resolving(
            "spendcap_rotate_token",
            agent.tree(),
            &[&now_ms.to_string(), agent.as_str(), token_hash.as_str(), &actor.by],
        )
        .await?
        .into_result()?;
        Ok(())
    }

    pub async fn balance(&self, now_ms: u64, agent: &AgentId, caller: &Caller) -> Result<Balance, LedgerError> {
        self.fcall("spendcap_balance", agent.tree(), &[&now_ms.to_string(), agent.as_str(), caller.wire()])
            .await
            .map_err(changed_nothing)?
            .into_balance()
    }

    pub async fn hold(&self, now_ms: u64, request: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        Ok(self.hold_with_head(now_ms, request, false).await?.0)
    }

    /// [`Self::hold`], and with `want_head`, for a new grant, the tree's receipt chain head as
    /// the hold read it (`spendcap_hold` ARGV 17).
    pub async fn hold_with_head(
        &self,
        now_ms: u64,
        request: &HoldRequest,
        want_head: bool,
    ) -> Result<(HoldOutcome, Option<ChainHead>), LedgerError> {
        let (key, fingerprint, mode, lease_ms) = match &request.idempotency {
            Some(idem) => (
                idem.key.as_str(),
                idem.fingerprint.as_str(),
                match idem.mode {
                    IdempotencyMode::Final => "final",
                    IdempotencyMode::Pending { .. } => "pending",
                },
                match idem.mode {
                    IdempotencyMode::Final => 0,
                    IdempotencyMode::Pending { lease_ms } => lease_ms,
                },
            ),
            None => ("", "", "final", 0),
        };
        // Without a key a lost answer cannot be asked about: the same hold id would be refused.
        let (now, amount, expires, retention, lease) = (
            now_ms.to_string(),
            request.amount.to_string(),
            request.expires.wire(),
            IDEMPOTENCY_RETENTION_MS.to_string(),
            lease_ms.to_string(),
        );
        let buckets = request.buckets.join(",");
        let args = [
            now.as_str(),
            request.agent.as_str(),
            request.caller.wire(),
            &amount,
            request.hold_id.as_str(),
            &expires,
            &request.task,
            &request.service,
            request.protocol.as_str(),
            key,
            fingerprint,
            &request.details,
            &retention,
            mode,
            &lease,
            &buckets,
            if want_head { "1" } else { "" },
        ];
        let tree = request.agent.tree();
        // Without a key a lost answer cannot be asked about: the same hold id would be refused.
        let reply = if key.is_empty() {
            self.fcall("spendcap_hold", tree, &args).await
        } else {
            self.fcall_resolving("spendcap_hold", tree, &args).await
        };
        let reply = reply.map_err(|err| match err {
            LedgerError::OutcomeUnknown { cause, .. } => {
                LedgerError::OutcomeUnknown { cause, retry_key: request.idempotency.as_ref().map(|i| i.key.clone()) }
            }
            other => other,
        })?;
        let head = reply.opt_u64("head_seq").map(|seq| ChainHead { seq, hash: reply.get("head_hash").to_owned() });
        let outcome = reply.into_hold_outcome()?;
        let outcome = match outcome {
            // Re-asking after a lost answer replays this very request's hold: it is new to the agent.
            HoldOutcome::Granted(mut grant) if grant.hold_id == request.hold_id => {
                grant.replayed = false;
                HoldOutcome::Granted(grant)
            }
            other => other,
        };
        Ok((outcome, head))
    }

    pub async fn forget_unacknowledged(&self, agent: &AgentId, key: &str) -> Result<bool, LedgerError> {
        let reply = self
            .fcall_resolving("spendcap_idem_finish", agent.tree(), &[agent.as_str(), key, "forget", ""])
            .await?
            .into_result()?;
        Ok(reply.get("forgotten") == "1")
    }

    pub async fn finish_idempotent(
        &self,
        agent: &AgentId,
        key: &str,
        finish: &IdempotencyFinish,
    ) -> Result<(), LedgerError> {
        let (outcome, response) = match finish {
            IdempotencyFinish::Done(response) => ("done", response.as_str()),
            IdempotencyFinish::Release => ("release", ""),
        };
        self.fcall("spendcap_idem_finish", agent.tree(), &[agent.as_str(), key, outcome, response])
            .await?
            .into_result()?;
        Ok(())
    }

    pub async fn idempotency_fingerprint(
        &self,
        _now_ms: u64,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<String>, LedgerError> {
        // The record's retention is its Redis TTL: a forgotten key reads as absent.
        let mut cmd = redis::cmd("HGET");
        cmd.arg(format!("{}:i:{}:{}", self.tree_key(agent.tree()), agent, key)).arg("fp");
        self.query(&cmd).await.map_err(unavailable)
    }

    pub async fn hold_info(&self, agent: &AgentId, hold: &HoldId) -> Result<HoldInfo, LedgerError> {
        if hold.tree() != agent.tree() {
            return Err(LedgerError::UnknownHold);
        }
        let fields = self.hash(format!("{}:h:{}", self.tree_key(hold.tree()), hold)).await?;
        hold_from_fields(agent, hold, |k| fields.get(k).cloned())
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

    /// [`Self::settle`] that also stores `finish` (a purchase's idempotency key and its answer)
    /// when the presigned receipt is linked; true when it did (`spendcap_settle` ARGV 17-18).
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
        let (now, amount) = (now_ms.to_string(), amount.to_string());
        let mut args = vec![
            now.as_str(),
            agent.as_str(),
            caller.wire(),
            hold.as_str(),
            amount.as_str(),
            details,
            protocol.map(Protocol::as_str).unwrap_or(""),
        ];
        let (seq, held);
        if let Some(link) = presigned {
            (seq, held) = (link.facts.seq.to_string(), link.facts.held.to_string());
            let facts = &link.facts;
            args.extend([seq.as_str(), &link.prev_hash, &link.hash, &link.signed, held.as_str()]);
            args.extend([facts.task.as_str(), &facts.service, &facts.protocol, &facts.hold_details]);
        }
        if let Some(finish) = finish {
            args.resize(16, "");
            args.extend([finish.key, finish.response]);
        }
        if !caller.principal().is_empty() {
            args.resize(18, "");
            args.push(caller.principal());
        }
        let reply = self.fcall_resolving("spendcap_settle", agent.tree(), &args).await?;
        let finished = reply.get("finished") == "1";
        Ok((reply.into_settle_outcome(hold, agent, now_ms, details)?, finished))
    }

    #[allow(clippy::too_many_arguments)] // the ledger's void arguments, one per FCALL argument
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

    /// [`Self::void_detailed`] that also stores `finish` (a purchase's idempotency key and its
    /// answer) in the same call (`spendcap_void` ARGV 8-9): (released, replayed, finished).
    #[allow(clippy::too_many_arguments)] // the ledger's void arguments, one per FCALL argument
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
        let now = now_ms.to_string();
        let mut args = vec![
            now.as_str(),
            agent.as_str(),
            caller.wire(),
            hold.as_str(),
            reason,
            protocol.map(Protocol::as_str).unwrap_or(""),
            detail,
        ];
        if let Some(finish) = finish {
            args.extend([finish.key, finish.response]);
        }
        if !caller.principal().is_empty() {
            args.resize(9, "");
            args.push(caller.principal());
        }
        let reply = self.fcall_resolving("spendcap_void", agent.tree(), &args).await?.into_result()?;
        Ok((reply.micros("released")?, reply.get("replayed") == "1", reply.get("finished") == "1"))
    }

    #[allow(clippy::too_many_arguments)] // the ledger's arguments, one per FCALL argument
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
        let (now, amount, total) = (now_ms.to_string(), amount.get().to_string(), total.get().to_string());
        let args = [
            now.as_str(),
            agent.as_str(),
            caller.wire(),
            hold.as_str(),
            amount.as_str(),
            details,
            protocol.map(Protocol::as_str).unwrap_or(""),
            total.as_str(),
        ];
        let reply = self.fcall_resolving("spendcap_settle_part", agent.tree(), &args).await?.into_result()?;
        Ok(PartSettled {
            amount: reply.micros("amount")?,
            remaining: reply.micros("remaining")?,
            part_settled: reply.micros("part_settled")?,
            replayed: reply.get("replayed") == "1",
        })
    }

    pub async fn mark_unknown(&self, now_ms: u64, hold: &HoldId, reason: &str) -> Result<MarkedUnknown, LedgerError> {
        Ok(self.mark_unknown_releasing(now_ms, hold, reason, None).await?.0)
    }

    /// [`Self::mark_unknown`] that also releases the in-flight idempotency record `key` of the
    /// hold's purchase (`spendcap_mark_unknown` ARGV 4); true when it did.
    pub async fn mark_unknown_releasing(
        &self,
        now_ms: u64,
        hold: &HoldId,
        reason: &str,
        key: Option<&str>,
    ) -> Result<(MarkedUnknown, bool), LedgerError> {
        let now = now_ms.to_string();
        let mut args = vec![now.as_str(), hold.as_str(), reason];
        if let Some(key) = key {
            args.push(key);
        }
        let reply = self.fcall_resolving("spendcap_mark_unknown", hold.tree(), &args).await?.into_result()?;
        let marked = MarkedUnknown {
            agent: reply.get("agent").parse().map_err(|_| LedgerError::Corrupt(format!("hold {hold} agent")))?,
            amount: reply.micros("amount")?,
            replayed: reply.get("replayed") == "1",
        };
        Ok((marked, reply.get("finished") == "1"))
    }

    #[allow(clippy::too_many_arguments)] // the ledger's precheck arguments, one per FCALL argument
    pub async fn precheck(
        &self,
        now_ms: u64,
        agent: &AgentId,
        caller: &Caller,
        protocol: Protocol,
        service: &str,
        task: &str,
    ) -> Result<Option<Refusal>, LedgerError> {
        self.fcall(
            "spendcap_precheck",
            agent.tree(),
            &[&now_ms.to_string(), agent.as_str(), caller.wire(), protocol.as_str(), service, "", task],
        )
        .await
        .map_err(changed_nothing)?
        .into_precheck()
    }

    pub async fn approval_decide(
        &self,
        now_ms: u64,
        id: &HoldId,
        approve: bool,
        by: &str,
        note: &str,
    ) -> Result<super::Decided, LedgerError> {
        let decision = if approve { "approve" } else { "deny" };
        let reply = self
            .fcall_resolving(
                "spendcap_approval_decide",
                id.tree(),
                &[&now_ms.to_string(), id.as_str(), decision, by, note],
            )
            .await?
            .into_result()?;
        Ok(super::Decided {
            state: super::ApprovalState::parse(reply.get("state"))
                .ok_or_else(|| LedgerError::Corrupt("approval state".into()))?,
            agent: reply.get("agent").parse().map_err(|_| LedgerError::Corrupt(format!("approval {id} agent")))?,
            amount: reply.micros("amount")?,
            expires_at_ms: reply.u64("expires_at")?,
            replayed: reply.get("replayed") == "1",
        })
    }

    pub async fn approval(&self, now_ms: u64, id: &HoldId) -> Result<super::Approval, LedgerError> {
        let fields = self.hash(format!("{}:h:{}", self.tree_key(id.tree()), id)).await?;
        super::Approval::from_fields(id, now_ms, |k| fields.get(k).cloned()).ok_or(LedgerError::ApprovalNotFound)
    }

    pub async fn approvals(&self, now_ms: u64, tree: &TreeId) -> Result<Vec<super::Approval>, LedgerError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(format!("{}:approvals", self.tree_key(tree))).arg(0).arg(-1).arg("REV");
        let ids: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(hold) = id.parse::<HoldId>() else { continue };
            let fields = self.hash(format!("{}:h:{}", self.tree_key(tree), hold)).await?;
            // Ended holds are kept a week; an approval whose hold is gone is left out.
            if let Some(approval) = super::Approval::from_fields(&hold, now_ms, |k| fields.get(k).cloned()) {
                out.push(approval);
            }
        }
        Ok(out)
    }

    pub async fn unknown_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        self.indexed_holds(tree, "unknown").await
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

    /// [`Self::note`] that also releases the in-flight idempotency record `key` of the hold's
    /// purchase (`spendcap_note` ARGV 7); true when it did.
    #[allow(clippy::too_many_arguments)] // one per FCALL argument
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
        let now = now_ms.to_string();
        let mut args = vec![now.as_str(), agent.as_str(), caller.wire(), hold.as_str(), reason, detail];
        if let Some(key) = key {
            args.push(key);
        }
        let reply = self.fcall("spendcap_note", agent.tree(), &args).await?.into_result()?;
        Ok(reply.get("finished") == "1")
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
        self.fcall(
            "spendcap_task_outcome",
            agent.tree(),
            &[
                &now_ms.to_string(),
                agent.as_str(),
                caller.wire(),
                task,
                task_type,
                outcome.code(),
                &caller.by_for(agent),
            ],
        )
        .await?
        .into_result()?;
        Ok(())
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
        let exclusive = if exclusive { "1" } else { "0" };
        let reply = self
            .fcall(
                "spendcap_create_bucket",
                agent.tree(),
                &[&now_ms.to_string(), agent.as_str(), id, &cap.to_string(), exclusive, label, by],
            )
            .await?
            .into_result()?;
        Ok(reply.get("created") == "1")
    }

    pub async fn bucket(&self, tree: &TreeId, id: &str) -> Result<Option<Bucket>, LedgerError> {
        let fields = self.hash(format!("{}:b:{}", self.tree_key(tree), id)).await?;
        bucket_from_fields(id, |k| fields.get(k).cloned())
    }

    pub async fn attr_set_once(
        &self,
        now_ms: u64,
        agent: &AgentId,
        name: &str,
        value: &str,
    ) -> Result<String, LedgerError> {
        let reply = self
            // Safe to repeat: a second call returns the value the first one set.
            .fcall_resolving(
                "spendcap_attr_set_once",
                agent.tree(),
                &[&now_ms.to_string(), agent.as_str(), name, value],
            )
            .await?
            .into_result()?;
        Ok(reply.get("value").to_owned())
    }

    pub async fn attr(&self, agent: &AgentId, name: &str) -> Result<Option<String>, LedgerError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(format!("{}:a:{}", self.tree_key(agent.tree()), agent)).arg(format!("x:{name}"));
        self.query(&cmd).await.map_err(unavailable)
    }

    pub async fn expire(&self, now_ms: u64, tree: &TreeId) -> Result<u64, LedgerError> {
        self.fcall("spendcap_expire", tree, &[&now_ms.to_string()])
            .await
            .map_err(changed_nothing)?
            .into_result()?
            .u64("released")
    }

    async fn hash(&self, key: String) -> Result<std::collections::HashMap<String, String>, LedgerError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(key);
        self.query(&cmd).await.map_err(unavailable)
    }

    pub async fn agent(&self, agent: &AgentId) -> Result<AgentRecord, LedgerError> {
        let fields = self.hash(format!("{}:a:{}", self.tree_key(agent.tree()), agent)).await?;
        if fields.is_empty() {
            return Err(LedgerError::UnknownAgent);
        }
        agent_from_fields(agent.clone(), |k| fields.get(k).cloned())
    }

    pub async fn agent_by_handle(&self, handle: &str) -> Result<AgentId, LedgerError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(format!("{}:handles", self.namespace)).arg(handle);
        let id: Option<String> = self.query(&cmd).await.map_err(unavailable)?;
        id.and_then(|id| id.parse().ok()).ok_or(LedgerError::UnknownAgent)
    }

    pub async fn open_holds(&self, tree: &TreeId) -> Result<Vec<HoldInfo>, LedgerError> {
        self.indexed_holds(tree, "holds").await
    }

    /// The holds of one of a tree's hold indexes (`holds`: open, `unknown`), in index order.
    async fn indexed_holds(&self, tree: &TreeId, index: &str) -> Result<Vec<HoldInfo>, LedgerError> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(format!("{}:{index}", self.tree_key(tree))).arg(0).arg(-1);
        let ids: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut holds = Vec::with_capacity(ids.len());
        for id in ids {
            let hold: HoldId = id.parse().map_err(|e| LedgerError::Corrupt(format!("indexed hold id: {e}")))?;
            let fields = self.hash(format!("{}:h:{}", self.tree_key(tree), hold)).await?;
            let agent: AgentId = fields
                .get("agent")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| LedgerError::Corrupt(format!("indexed hold {hold} has no agent")))?;
            holds.push(hold_from_fields(&agent, &hold, |k| fields.get(k).cloned())?);
        }
        Ok(holds)
    }

    pub async fn trees(&self) -> Result<Vec<TreeId>, LedgerError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(format!("{}:trees", self.namespace));
        let ids: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut trees: Vec<TreeId> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        trees.sort();
        Ok(trees)
    }

    pub async fn tree_agents(&self, tree: &TreeId) -> Result<Vec<AgentRecord>, LedgerError> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(format!("{}:agents", self.tree_key(tree)));
        let ids: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut agents = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(id) = id.parse::<AgentId>() else { continue };
            agents.push(self.agent(&id).await?);
        }
        agents.sort_by(|a, b| (a.depth, a.created_at_ms, &a.handle).cmp(&(b.depth, b.created_at_ms, &b.handle)));
        Ok(agents)
    }

    pub async fn read_log(&self, tree: &TreeId, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(format!("{}:log", self.tree_key(tree))).arg(format!("({after}")).arg("+").arg("COUNT").arg(count);
        if after == "0" {
            // "(0" is not a valid exclusive start on every Redis version; "-" is the beginning.
            cmd = redis::cmd("XRANGE");
            cmd.arg(format!("{}:log", self.tree_key(tree))).arg("-").arg("+").arg("COUNT").arg(count);
        }
        let reply: redis::streams::StreamRangeReply = self.query(&cmd).await.map_err(unavailable)?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                let get = |k: &str| entry.get::<String>(k);
                log_entry_from_fields(tree, entry.id.clone(), get)
            })
            .collect())
    }

    pub async fn recent_log(&self, tree: &TreeId, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(format!("{}:log", self.tree_key(tree))).arg("+").arg("-").arg("COUNT").arg(count);
        let reply: redis::streams::StreamRangeReply = self.query(&cmd).await.map_err(unavailable)?;
        let mut entries: Vec<LogEntry> = reply
            .ids
            .into_iter()
            .map(|entry| {
                let get = |k: &str| entry.get::<String>(k);
                log_entry_from_fields(tree, entry.id.clone(), get)
            })
            .collect();
        entries.reverse();
        Ok(entries)
    }

    pub async fn log_tail(&self, tree: &TreeId) -> Result<String, LedgerError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(format!("{}:log", self.tree_key(tree))).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: redis::streams::StreamRangeReply = self.query(&cmd).await.map_err(unavailable)?;
        Ok(reply.ids.into_iter().next().map(|e| e.id).unwrap_or_else(|| "0".into()))
    }

    pub async fn receipt(&self, tree: &TreeId, seq: u64) -> Result<Option<ReceiptFacts>, LedgerError> {
        let Some(index) = seq.checked_sub(1) else { return Ok(None) };
        let mut cmd = redis::cmd("LINDEX");
        cmd.arg(format!("{}:receipts", self.tree_key(tree))).arg(index);
        let hold: Option<String> = self.query(&cmd).await.map_err(unavailable)?;
        let Some(hold) = hold else { return Ok(None) };
        let fields = self.hash(format!("{}:h:{}", self.tree_key(tree), hold)).await?;
        Ok(receipt_from_hold(tree, seq, &hold, |k| fields.get(k).cloned()))
    }

    pub async fn chain_head(&self, tree: &TreeId) -> Result<ChainHead, LedgerError> {
        let fields = self.hash(format!("{}:rhead", self.tree_key(tree))).await?;
        Ok(ChainHead {
            seq: fields.get("seq").and_then(|s| s.parse().ok()).unwrap_or(0),
            hash: fields.get("hash").cloned().unwrap_or_default(),
        })
    }

    pub async fn receipts(&self, tree: &TreeId, from: u64, to: u64) -> Result<Vec<ReceiptFacts>, LedgerError> {
        if from == 0 || to < from {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("LRANGE");
        cmd.arg(format!("{}:receipts", self.tree_key(tree))).arg(from - 1).arg(to - 1);
        let holds: Vec<String> = self.query(&cmd).await.map_err(unavailable)?;
        let mut pipe = redis::pipe();
        for hold in &holds {
            pipe.cmd("HGETALL").arg(format!("{}:h:{}", self.tree_key(tree), hold));
        }
        let hashes: Vec<std::collections::HashMap<String, String>> = match &self.conn {
            Conn::Single(conn) => pipe.query_async(&mut conn.clone()).await,
            Conn::Cluster(conn) => pipe.query_async(&mut conn.clone()).await,
        }
        .map_err(unavailable)?;
        Ok(holds
            .iter()
            .zip(hashes)
            .zip(from..)
            .filter_map(|((hold, fields), seq)| receipt_from_hold(tree, seq, hold, |k| fields.get(k).cloned()))
            .collect())
    }

    pub async fn link_receipts(
        &self,
        tree: &TreeId,
        links: &[ReceiptLink],
    ) -> Result<Result<(), ChainHead>, LedgerError> {
        let seqs: Vec<String> = links.iter().map(|l| l.facts.seq.to_string()).collect();
        let mut args: Vec<&str> = Vec::with_capacity(links.len() * 5);
        for (link, seq) in links.iter().zip(&seqs) {
            args.extend([seq.as_str(), &link.prev_hash, &link.hash, &link.signed, &link.facts.hold]);
        }
        let reply = self.fcall("spendcap_receipt_link", tree, &args).await?;
        if reply.status == "error" && reply.get("code") == "receipt_gap" {
            return Ok(Err(ChainHead { seq: reply.u64("head_seq")?, hash: reply.get("head_hash").to_owned() }));
        }
        reply.into_result()?;
        Ok(Ok(()))
    }
}

/// Admin-side changes with their actor (`by` on the log entry; tighten-only for operators), and
/// operator tokens (`<ns>:{ops}`, outside every tree).
impl RedisLedger {
    fn ops_key(&self) -> String {
        format!("{}:{{ops}}", self.namespace)
    }

    pub async fn revoke_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        reason: &str,
        actor: &Actor,
    ) -> Result<(u64, bool), LedgerError> {
        let reply = self
            // Safe to repeat: revoking a revoked agent changes nothing (and says `already`).
            .fcall_resolving("spendcap_revoke", agent.tree(), &[agent.as_str(), reason, &now_ms.to_string(), &actor.by])
            .await?
            .into_result()?;
        Ok((reply.u64("revoked_at")?, reply.get("already") == "1"))
    }

    pub async fn reinstate_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        actor: &Actor,
    ) -> Result<Option<String>, LedgerError> {
        let reply = self
            .fcall("spendcap_reinstate", agent.tree(), &[agent.as_str(), &now_ms.to_string(), &actor.by])
            .await?
            .into_result()?;
        Ok(reply.opt_string("was"))
    }

    pub async fn set_expiry_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        expires_at_ms: Option<u64>,
        actor: &Actor,
    ) -> Result<Option<u64>, LedgerError> {
        let at = expires_at_ms.map(|t| t.to_string()).unwrap_or_default();
        let earlier_only = if actor.tighten_only { "1" } else { "" };
        let reply = self
            // Safe to repeat: the same expiry is set again (and is no later than itself).
            .fcall_resolving(
                "spendcap_set_expiry",
                agent.tree(),
                &[&now_ms.to_string(), agent.as_str(), &at, &actor.by, earlier_only],
            )
            .await?
            .into_result()?;
        Ok(reply.opt_u64("previous"))
    }

    pub async fn set_controls_as(
        &self,
        now_ms: u64,
        agent: &AgentId,
        controls: &AgentControls,
        expected: Option<&Controls>,
        actor: &Actor,
    ) -> Result<(), LedgerError> {
        let expected = expected.map(|c| format!("={}", c.to_wire())).unwrap_or_default();
        self.fcall(
            "spendcap_set_controls",
            agent.tree(),
            &[
                &now_ms.to_string(),
                agent.as_str(),
                &controls.controls.to_wire(),
                &alerts_to_wire(&controls.alerts),
                &actor.by,
                &expected,
            ],
        )
        .await?
        .into_result()?;
        Ok(())
    }

    pub async fn create_operator(&self, now_ms: u64, operator: &NewOperator, by: &str) -> Result<(), LedgerError> {
        let tree = operator.tree.as_ref().map(TreeId::as_str).unwrap_or("");
        self.fcall_at(
            "spendcap_operator_create",
            &self.ops_key(),
            &[
                &now_ms.to_string(),
                &operator.id,
                &operator.name,
                operator.role.as_str(),
                tree,
                operator.token_hash.as_str(),
                by,
            ],
        )
        .await?
        .into_result()?;
        Ok(())
    }

    pub async fn revoke_operator(&self, now_ms: u64, name: &str, by: &str) -> Result<(u64, bool), LedgerError> {
        let reply = self
            // Safe to repeat: a revoked operator stays revoked (and says `already`).
            .fcall_at("spendcap_operator_revoke", &self.ops_key(), &[&now_ms.to_string(), name, by])
            .await?
            .into_result()?;
        Ok((reply.u64("revoked_at")?, reply.get("already") == "1"))
    }

    pub async fn operator(&self, id: &str) -> Result<Option<OperatorRecord>, LedgerError> {
        let fields = self.hash(format!("{}:o:{id}", self.ops_key())).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        super::operator_from_fields(id, |k| fields.get(k).cloned()).map(Some)
    }

    pub async fn read_operator_log(&self, after: &str, count: usize) -> Result<Vec<LogEntry>, LedgerError> {
        let start = if after == "0" { "-".to_owned() } else { format!("({after}") };
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(format!("{}:log", self.ops_key())).arg(start).arg("+").arg("COUNT").arg(count);
        let reply: redis::streams::StreamRangeReply = self.query(&cmd).await.map_err(unavailable)?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| super::operator_log_entry(entry.id.clone(), |k| entry.get::<String>(k)))
            .collect())
    }

    pub async fn operators(&self) -> Result<Vec<OperatorRecord>, LedgerError> {
        let names = self.hash(format!("{}:names", self.ops_key())).await?;
        let mut out = Vec::with_capacity(names.len());
        for id in names.values() {
            if let Some(record) = self.operator(id).await? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
