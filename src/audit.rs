//! The ledger audit (`spendcap ledger check`): replays every tree's log and compares it with the
//! stored balances, budgets and open holds, and checks the cap invariant at every level.
//!
//! The log and the balances are written in the same atomic step, so at any instant they must
//! agree exactly; any difference is a bug or tampering, and is reported with where it is.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ledger::{Ledger, LedgerError};
use crate::log::replay;

#[derive(Debug, Default, Serialize)]
pub struct AuditReport {
    pub trees: usize,
    pub agents: usize,
    pub budgets: usize,
    pub open_holds: usize,
    /// Holds whose outcome is unknown (counted as held until an admin or a flow resolves them).
    pub unknown_holds: usize,
    pub log_entries: usize,
    /// One line per difference found; empty when the ledger is consistent.
    pub differences: Vec<String>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

const PAGE: usize = 2_000;

/// Audits every tree. Holds one tree's log in memory at a time.
pub async fn check(ledger: &Ledger) -> Result<AuditReport, LedgerError> {
    let mut report = AuditReport::default();
    for tree in ledger.trees().await? {
        let mut entries = Vec::new();
        let mut after = "0".to_owned();
        loop {
            let page = ledger.read_log(&tree, &after, PAGE).await?;
            let done = page.len() < PAGE;
            if let Some(last) = page.last() {
                after = last.id.clone();
            }
            entries.extend(page);
            if done {
                break;
            }
        }
        report.trees += 1;
        report.log_entries += entries.len();
        let mut differ = |what: String| report.differences.push(format!("tree {tree}: {what}"));
        let replayed = match replay(&entries) {
            Ok(replayed) => replayed,
            Err(e) => {
                differ(format!("the log does not replay: {e}"));
                continue;
            }
        };

        // Open holds according to the log, to compare with the stored ones.
        let mut open_in_log: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for entry in &entries {
            match entry.event.as_str() {
                "hold" => {
                    open_in_log.insert(entry.hold.clone(), (entry.agent.clone(), entry.amount.unwrap_or(0)));
                }
                // A settle of part of a hold keeps it open, holding that much less.
                "psettle" => match open_in_log.get_mut(&entry.hold) {
                    Some((_, amount)) => *amount = amount.saturating_sub(entry.amount.unwrap_or(0)),
                    None => differ(format!("psettle of hold {} that the log never opened", entry.hold)),
                },
                "settle" | "void" | "expire" if open_in_log.remove(&entry.hold).is_none() => {
                    differ(format!("{} of hold {} that the log never opened", entry.event, entry.hold));
                }
                _ => {}
            }
        }

        let agents = ledger.tree_agents(&tree).await?;
        report.agents += agents.len();
        for agent in &agents {
            let id = agent.id.to_string();
            let (cap, spent, held) = (agent.cap.get(), agent.spent.get(), agent.held.get());
            if spent + held > cap {
                differ(format!("agent {id}: spent {spent} + held {held} exceeds cap {cap}"));
            }
            match replayed.agents.get(&id) {
                None => differ(format!("agent {id} is stored but was never created in the log")),
                Some(r) => {
                    if (r.cap, r.spent, r.held) != (cap, spent, held) {
                        differ(format!(
                            "agent {id}: stored cap/spent/held {cap}/{spent}/{held}, log says {}/{}/{}",
                            r.cap, r.spent, r.held
                        ));
                    }
                    if r.revoked != agent.revoked.is_some() {
                        differ(format!(
                            "agent {id}: stored revoked = {}, log says {}",
                            agent.revoked.is_some(),
                            r.revoked
                        ));
                    }
                }
            }
        }
        for id in replayed.agents.keys() {
            if !agents.iter().any(|a| a.id.as_str() == id) {
                differ(format!("agent {id} was created in the log but is not stored"));
            }
        }

        for (id, r) in &replayed.buckets {
            report.budgets += 1;
            match ledger.bucket(&tree, id).await? {
                None => differ(format!("budget {id} was created in the log but is not stored")),
                Some(b) => {
                    let stored = (b.cap.get(), b.spent.get(), b.held.get(), b.open_holds);
                    if stored != (r.cap, r.spent, r.held, r.open_holds) {
                        differ(format!(
                            "budget {id}: stored cap/spent/held/open {stored:?}, log says {:?}",
                            (r.cap, r.spent, r.held, r.open_holds)
                        ));
                    }
                    if b.spent.get() + b.held.get() > b.cap.get() {
                        differ(format!("budget {id}: spent + held exceeds its cap"));
                    }
                }
            }
        }

        let stored_open = ledger.open_holds(&tree).await?;
        report.open_holds += stored_open.len();
        for hold in &stored_open {
            let id = hold.hold_id.to_string();
            if hold.state != "open" {
                differ(format!("hold {id} is indexed as open but its state is {}", hold.state));
            }
            match open_in_log.remove(&id) {
                None => differ(format!("hold {id} is open but the log has no open hold {id}")),
                Some((agent, amount)) => {
                    if agent != hold.agent.as_str() || amount != hold.amount.get() {
                        differ(format!("hold {id}: stored {} {} vs log {agent} {amount}", hold.agent, hold.amount));
                    }
                }
            }
        }
        let stored_unknown = ledger.unknown_holds(&tree).await?;
        report.unknown_holds += stored_unknown.len();
        for hold in &stored_unknown {
            let id = hold.hold_id.to_string();
            if hold.state != "unknown" {
                differ(format!("hold {id} is indexed as unknown but its state is {}", hold.state));
            }
            match open_in_log.remove(&id) {
                None => differ(format!("hold {id} is unknown but the log has no unresolved hold {id}")),
                Some((agent, amount)) => {
                    if agent != hold.agent.as_str() || amount != hold.amount.get() {
                        differ(format!("hold {id}: stored {} {} vs log {agent} {amount}", hold.agent, hold.amount));
                    }
                }
            }
        }
        for id in open_in_log.keys() {
            differ(format!("hold {id} is open in the log but not stored as open (a leaked or lost hold)"));
        }
    }
    Ok(report)
}
