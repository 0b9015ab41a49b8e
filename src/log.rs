//! The attributed log across every budget tree: filtering, a merged stream in time order that
//! holds only one page per tree in memory, CSV/JSONL lines, and spend summaries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::TreeId;
use crate::ledger::{Ledger, LedgerError, LogEntry};

const PAGE: usize = 512;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct LogFilter {
    /// Only this agent (id).
    pub agent: Option<String>,
    pub task: Option<String>,
    pub service: Option<String>,
    pub protocol: Option<String>,
    /// Entries at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Entries before this time.
    pub until_ms: Option<u64>,
    /// Only this budget tree (a token limited to one tree reads only its own).
    #[serde(skip)]
    pub tree: Option<TreeId>,
    /// Also the operator-token audit entries (`operator_create`, `operator_revoke`; from
    /// `<ns>:{ops}`, outside every tree): for a reader that sees every tree, and only when no
    /// agent, task, service or protocol is asked for (they name none).
    #[serde(skip)]
    pub operators: bool,
}

impl LogFilter {
    pub fn matches(&self, entry: &LogEntry) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.agent, &entry.agent)
            && eq(&self.task, &entry.task)
            && eq(&self.service, &entry.service)
            && eq(&self.protocol, &entry.protocol)
            && self.since_ms.is_none_or(|s| entry.ts_ms >= s)
            && self.until_ms.is_none_or(|u| entry.ts_ms < u)
    }
}

/// Where a cursor reads: a budget tree's log, or the operators' audit log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Tree(TreeId),
    Operators,
}

struct TreeCursor {
    source: Source,
    after: String,
    page: std::collections::VecDeque<LogEntry>,
    done: bool,
}

/// Reads the whole log in (timestamp, tree) order, one page per tree at a time.
pub struct LogReader<'a> {
    ledger: &'a Ledger,
    cursors: Vec<TreeCursor>,
    filter: LogFilter,
}

impl<'a> LogReader<'a> {
    pub async fn new(ledger: &'a Ledger, filter: LogFilter) -> Result<LogReader<'a>, LedgerError> {
        // An agent filter names its tree, so only that tree is read.
        let mut trees = match filter.agent.as_deref().and_then(|a| a.parse::<crate::identity::AgentId>().ok()) {
            Some(agent) => vec![agent.tree().clone()],
            None => ledger.trees().await?,
        };
        if let Some(only) = &filter.tree {
            trees.retain(|t| t == only);
        }
        let mut sources: Vec<Source> = trees.into_iter().map(Source::Tree).collect();
        if filter.operators && filter.tree.is_none() {
            sources.push(Source::Operators);
        }
        let cursors = sources
            .into_iter()
            .map(|source| TreeCursor { source, after: "0".into(), page: Default::default(), done: false })
            .collect();
        Ok(LogReader { ledger, cursors, filter })
    }

    async fn fill(&mut self, index: usize) -> Result<(), LedgerError> {
        let cursor = &mut self.cursors[index];
        if cursor.page.is_empty() && !cursor.done {
            let page = match &cursor.source {
                Source::Tree(tree) => self.ledger.read_log(tree, &cursor.after, PAGE).await?,
                Source::Operators => self.ledger.read_operator_log(&cursor.after, PAGE).await?,
            };
            cursor.done = page.len() < PAGE;
            if let Some(last) = page.last() {
                cursor.after = last.id.clone();
            }
            cursor.page.extend(page);
        }
        Ok(())
    }

    /// The next matching entry, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<LogEntry>, LedgerError> {
        loop {
            for index in 0..self.cursors.len() {
                self.fill(index).await?;
            }
            let next = self
                .cursors
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.page.front().map(|e| (e.ts_ms, &c.source, i)))
                .min()
                .map(|(_, _, i)| i);
            let Some(index) = next else { return Ok(None) };
            let entry = self.cursors[index].page.pop_front();
            if let Some(entry) = entry.filter(|e| self.filter.matches(e)) {
                return Ok(Some(entry));
            }
        }
    }
}

pub const CSV_HEADER: &str =
    "id,tree,ts_ms,time,event,agent,task,service,protocol,amount,released,hold,reason,cap,parent,remaining,detail,by\n";

pub fn csv_line(e: &LogEntry) -> String {
    let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    let fields = [
        e.id.clone(),
        e.tree.clone(),
        e.ts_ms.to_string(),
        crate::human::time_ms(e.ts_ms),
        e.event.clone(),
        e.agent.clone(),
        e.task.clone(),
        e.service.clone(),
        e.protocol.clone(),
        num(e.amount),
        num(e.released),
        e.hold.clone(),
        e.reason.clone(),
        num(e.cap),
        e.parent.clone(),
        num(e.remaining),
        e.detail.clone(),
        e.by.clone(),
    ];
    let mut out = String::with_capacity(160);
    crate::csv::push_row(&mut out, &fields);
    out
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Agent,
    Task,
    Service,
    Protocol,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SpendRow {
    pub key: String,
    pub spent_micros: u64,
    pub settles: u64,
    pub holds: u64,
    pub voids: u64,
    pub expiries: u64,
    pub refusals: u64,
}

/// Sums the log by agent, task, service or protocol. Memory grows with the number of groups,
/// not of entries.
pub async fn spend_summary(
    ledger: &Ledger,
    filter: LogFilter,
    group_by: GroupBy,
) -> Result<Vec<SpendRow>, LedgerError> {
    let mut reader = LogReader::new(ledger, filter).await?;
    let mut rows: BTreeMap<String, SpendRow> = BTreeMap::new();
    while let Some(entry) = reader.next().await? {
        let key = match group_by {
            GroupBy::Agent => &entry.agent,
            GroupBy::Task => &entry.task,
            GroupBy::Service => &entry.service,
            GroupBy::Protocol => &entry.protocol,
        };
        let counted = matches!(entry.event.as_str(), "hold" | "settle" | "psettle" | "void" | "expire" | "refuse");
        if !counted {
            continue;
        }
        let row = rows.entry(key.clone()).or_insert_with(|| SpendRow { key: key.clone(), ..SpendRow::default() });
        match entry.event.as_str() {
            "hold" => row.holds += 1,
            "settle" | "psettle" => {
                row.settles += 1;
                row.spent_micros += entry.amount.unwrap_or(0);
            }
            "void" => row.voids += 1,
            "expire" => row.expiries += 1,
            _ => row.refusals += 1,
        }
    }
    let mut rows: Vec<SpendRow> = rows.into_values().collect();
    rows.sort_by(|a, b| b.spent_micros.cmp(&a.spent_micros).then_with(|| a.key.cmp(&b.key)));
    Ok(rows)
}

/// An agent's balances as the log says they should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub cap: u64,
    pub spent: u64,
    pub held: u64,
    pub revoked: bool,
    /// Suspended by its runaway-loop breaker (and not reinstated since).
    pub suspended: bool,
    /// The agent and its ancestors.
    pub path: Vec<String>,
}

/// Why a log cannot be replayed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("log entry {id}: {reason}")]
pub struct ReplayError {
    pub id: String,
    pub reason: String,
}

/// A budget bucket's figures as the log says they should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayedBucket {
    pub cap: u64,
    pub spent: u64,
    pub held: u64,
    pub open_holds: u64,
}

/// A period or per-task counter's figures as the log says they should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayedCounter {
    pub spent: u64,
    pub held: u64,
}

/// Balances replayed from a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    pub agents: BTreeMap<String, Replayed>,
    pub buckets: BTreeMap<String, ReplayedBucket>,
    /// Period and per-task counters by id (`p:<agent>:<period>:<start_ms>`, `t:<agent>:<hex>`).
    pub counters: BTreeMap<String, ReplayedCounter>,
}

/// Replays log entries (in order, per tree) into balances: `create` and `cap` set caps, `hold`
/// adds to held on the agent, every ancestor and every bucket it names, `settle` moves `amount`
/// from held to spent and releases `released`, `psettle` (part of a hold, which stays open) moves
/// `amount` from held to spent, `void` and `expire` release, `revoke` marks,
/// `suspend` and `reinstate` mark and unmark, `budget` creates a bucket; the period and
/// per-task counters a hold names (`counters`) move with it like its buckets. The ledger check and the tests compare the result with the
/// stored balances.
pub fn replay<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> Result<Replay, ReplayError> {
    let mut agents: BTreeMap<String, Replayed> = BTreeMap::new();
    let mut buckets: BTreeMap<String, ReplayedBucket> = BTreeMap::new();
    let mut counters: BTreeMap<String, ReplayedCounter> = BTreeMap::new();
    let mut hold_buckets: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut hold_counters: std::collections::HashMap<String, Vec<String>> = Default::default();
    for entry in entries {
        let fail = |reason: &str| ReplayError { id: entry.id.clone(), reason: reason.to_owned() };
        let path = |agents: &BTreeMap<String, Replayed>| {
            agents.get(&entry.agent).map(|a| a.path.clone()).ok_or_else(|| fail("agent was never created"))
        };
        match entry.event.as_str() {
            "create" => {
                let mut path = vec![entry.agent.clone()];
                if !entry.parent.is_empty() {
                    let parent = agents.get(&entry.parent).ok_or_else(|| fail("parent was never created"))?;
                    path.extend(parent.path.iter().cloned());
                }
                let cap = entry.cap.ok_or_else(|| fail("create without cap"))?;
                agents.insert(entry.agent.clone(), Replayed { cap, path, ..Replayed::default() });
            }
            "cap" => {
                let cap = entry.cap.ok_or_else(|| fail("cap change without cap"))?;
                agents.get_mut(&entry.agent).ok_or_else(|| fail("agent was never created"))?.cap = cap;
            }
            "hold" => {
                let amount = entry.amount.ok_or_else(|| fail("hold without amount"))?;
                for id in path(&agents)? {
                    if let Some(a) = agents.get_mut(&id) {
                        a.held += amount;
                    }
                }
                let charged: Vec<String> =
                    entry.bucket.split(',').filter(|b| !b.is_empty()).map(str::to_owned).collect();
                for id in &charged {
                    let bucket = buckets.get_mut(id).ok_or_else(|| fail("hold on a budget that was never created"))?;
                    bucket.held += amount;
                    bucket.open_holds += 1;
                }
                hold_buckets.insert(entry.hold.clone(), charged);
                let charged: Vec<String> =
                    entry.counters.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
                for id in &charged {
                    counters.entry(id.clone()).or_default().held += amount;
                }
                hold_counters.insert(entry.hold.clone(), charged);
            }
            "budget" => {
                let cap = entry.cap.ok_or_else(|| fail("budget without cap"))?;
                buckets.insert(entry.bucket.clone(), ReplayedBucket { cap, ..ReplayedBucket::default() });
            }
            "settle" | "void" | "expire" => {
                let spent = if entry.event == "settle" {
                    entry.amount.ok_or_else(|| fail("settle without amount"))?
                } else {
                    0
                };
                let released = if entry.event == "settle" {
                    entry.released.ok_or_else(|| fail("settle without released"))?
                } else {
                    entry.amount.ok_or_else(|| fail("release without amount"))?
                };
                for id in path(&agents)? {
                    if let Some(a) = agents.get_mut(&id) {
                        a.held = a.held.checked_sub(spent + released).ok_or_else(|| fail("releases more than held"))?;
                        a.spent += spent;
                    }
                }
                for id in hold_buckets.remove(&entry.hold).unwrap_or_default() {
                    if let Some(b) = buckets.get_mut(&id) {
                        b.held = b.held.checked_sub(spent + released).ok_or_else(|| fail("releases more than held"))?;
                        b.spent += spent;
                        b.open_holds -= 1;
                    }
                }
                for id in hold_counters.remove(&entry.hold).unwrap_or_default() {
                    if let Some(c) = counters.get_mut(&id) {
                        c.held = c.held.checked_sub(spent + released).ok_or_else(|| fail("releases more than held"))?;
                        c.spent += spent;
                    }
                }
            }
            "psettle" => {
                let spent = entry.amount.ok_or_else(|| fail("psettle without amount"))?;
                for id in path(&agents)? {
                    if let Some(a) = agents.get_mut(&id) {
                        a.held = a.held.checked_sub(spent).ok_or_else(|| fail("settles more than held"))?;
                        a.spent += spent;
                    }
                }
                for id in hold_buckets.get(&entry.hold).cloned().unwrap_or_default() {
                    if let Some(b) = buckets.get_mut(&id) {
                        b.held = b.held.checked_sub(spent).ok_or_else(|| fail("settles more than held"))?;
                        b.spent += spent;
                    }
                }
                for id in hold_counters.get(&entry.hold).cloned().unwrap_or_default() {
                    if let Some(c) = counters.get_mut(&id) {
                        c.held = c.held.checked_sub(spent).ok_or_else(|| fail("settles more than held"))?;
                        c.spent += spent;
                    }
                }
            }
            // An archive revokes the agent (unless it was revoked already).
            "revoke" | "archive" => {
                agents.get_mut(&entry.agent).ok_or_else(|| fail("agent was never created"))?.revoked = true
            }
            "suspend" => agents.get_mut(&entry.agent).ok_or_else(|| fail("agent was never created"))?.suspended = true,
            "reinstate" => {
                agents.get_mut(&entry.agent).ok_or_else(|| fail("agent was never created"))?.suspended = false
            }
            _ => {}
        }
    }
    Ok(Replay { agents, buckets, counters })
}
