//! Cost reports over the attributed log: cost per successful task and per failed or abandoned
//! run by task type, the spread of task costs (with a flag for unusual variance), a suggested
//! per-task cap, spend by agent, service and protocol, and refusals by reason.
//!
//! Everything here is a pure function of log entries ([`ReportBuilder::add`], then
//! [`ReportBuilder::finish`]), so the figures are tested on fixture logs; [`report`] feeds it
//! from the ledger page by page. Memory grows with the number of tasks and groups, not entries.
//!
//! A task is identified by its label within a budget tree: its cost is what every hold with that
//! label settled (sub-agents included); its outcome and type come from the latest `outcome`
//! entry for it. Money stays in integer micro-USD; only the coefficient of variation, a ratio,
//! is a float.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ledger::{Ledger, LedgerError, LogEntry, TaskOutcome};
use crate::log::{LogFilter, LogReader};

/// The suggested cap, as a fraction: 5/2 = 2.5 × the median successful task cost.
const SUGGESTED_CAP_NUMERATOR: u64 = 5;
const SUGGESTED_CAP_DENOMINATOR: u64 = 2;
/// A task type's cost spread is unusual when its coefficient of variation is at least this
/// (the standard deviation is as large as the mean) ...
pub const UNUSUAL_CV: f64 = 1.0;
/// ... over at least this many ended tasks.
pub const UNUSUAL_MIN_TASKS: u64 = 3;

pub const SUGGESTED_CAP_RULE: &str = "suggested cap = 2.5 x the median cost of a successful task of the type \
     (nearest-rank median), rounded up to the micro-USD";
pub const UNUSUAL_VARIANCE_RULE: &str = "variance is unusual when at least 3 tasks of the type ended and the \
     coefficient of variation (population standard deviation / mean, over every ended task of the type) is at least 1.0";
pub const PERCENTILE_RULE: &str = "median and p90 are nearest-rank percentiles (always an observed task cost)";
pub const CAP_IN_FORCE_RULE: &str =
    "cap in force = the per-task cap (task_cap_micros) of the agents that ran the type; the largest if they differ";

/// Summary statistics of a set of task costs, in micro-USD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CostStats {
    pub count: u64,
    pub total_micros: u64,
    /// Rounded half up to the micro.
    pub mean_micros: u64,
    pub median_micros: u64,
    pub p90_micros: u64,
    pub min_micros: u64,
    pub max_micros: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskTypeRow {
    pub task_type: String,
    /// Tasks of this type that ended (any outcome).
    pub tasks: u64,
    pub successes: u64,
    pub failed: u64,
    pub abandoned: u64,
    pub spent_micros: u64,
    /// Cost per successful task.
    pub success_cost: Option<CostStats>,
    /// Cost per failed or abandoned run.
    pub unsuccessful_cost: Option<CostStats>,
    /// Population variance of the cost of every ended task of the type (micro-USD squared,
    /// rounded to the nearest integer).
    #[schema(value_type = u64)]
    pub variance_micros2: u128,
    /// Population standard deviation (micro-USD, rounded down).
    pub stddev_micros: u64,
    /// Coefficient of variation (stddev / mean), 3 decimals; `None` when the mean is 0.
    pub cv: Option<f64>,
    pub unusual_variance: bool,
    /// See [`SUGGESTED_CAP_RULE`]; `None` without a successful task.
    pub suggested_cap_micros: Option<u64>,
    /// See [`CAP_IN_FORCE_RULE`]; `None` when no agent of the type has a per-task cap.
    pub cap_in_force_micros: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentRow {
    pub agent: String,
    /// The agent's handle, when the agent still exists (the log names agents by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    pub spent_micros: u64,
    pub settles: u64,
    pub refusals: u64,
    /// Tasks whose outcome this agent reported.
    pub tasks: u64,
    pub successes: u64,
    pub unsuccessful: u64,
    /// Mean cost of its successful tasks (rounded half up); `None` without one.
    pub mean_success_micros: Option<u64>,
}

/// Spend of one service or protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpendRow {
    pub key: String,
    pub spent_micros: u64,
    pub settles: u64,
    pub refusals: u64,
}

/// Keyed-API spend (protocol `api`) of one service and model, with the tokens the settles
/// reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiModelRow {
    pub service: String,
    /// The model the calls named; empty for APIs priced per request or by a cost header.
    pub model: String,
    pub calls: u64,
    pub spent_micros: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Calls settled at their whole hold because their cost could not be known.
    pub cost_unknown: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RefusalRow {
    pub reason: String,
    pub count: u64,
    /// What the refused holds asked for, together.
    pub requested_micros: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rules {
    pub suggested_cap: String,
    pub unusual_variance: String,
    pub percentiles: String,
    pub cap_in_force: String,
}

impl Rules {
    fn current() -> Rules {
        Rules {
            suggested_cap: SUGGESTED_CAP_RULE.into(),
            unusual_variance: UNUSUAL_VARIANCE_RULE.into(),
            percentiles: PERCENTILE_RULE.into(),
            cap_in_force: CAP_IN_FORCE_RULE.into(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Log entries read.
    pub entries: u64,
    /// Everything settled in the range.
    pub spent_micros: u64,
    /// Tasks that spent but have no outcome (yet).
    pub unfinished_tasks: u64,
    pub rules: Rules,
    /// By task type, in name order.
    pub task_types: Vec<TaskTypeRow>,
    /// By spend, highest first.
    pub agents: Vec<AgentRow>,
    pub services: Vec<SpendRow>,
    pub protocols: Vec<SpendRow>,
    /// By count, highest first.
    pub refusals: Vec<RefusalRow>,
    /// Keyed-API spend by service and model, highest spend first.
    #[serde(default)]
    pub api_models: Vec<ApiModelRow>,
}

#[derive(Default)]
struct TaskAcc {
    cost: u64,
    /// The latest outcome: (outcome, task type, reporting agent).
    outcome: Option<(TaskOutcome, String, String)>,
}

/// Accumulates log entries (in log order) into a [`Report`].
#[derive(Default)]
pub struct ReportBuilder {
    entries: u64,
    spent: u64,
    tasks: BTreeMap<(String, String), TaskAcc>,
    agents: BTreeMap<String, AgentRow>,
    services: BTreeMap<String, SpendRow>,
    protocols: BTreeMap<String, SpendRow>,
    refusals: BTreeMap<String, RefusalRow>,
    api_models: BTreeMap<(String, String), ApiModelRow>,
}

fn spend_row<'a>(rows: &'a mut BTreeMap<String, SpendRow>, key: &str) -> &'a mut SpendRow {
    rows.entry(key.to_owned()).or_insert_with(|| SpendRow { key: key.to_owned(), ..SpendRow::default() })
}

impl ReportBuilder {
    pub fn add(&mut self, entry: &LogEntry) {
        self.entries += 1;
        match entry.event.as_str() {
            // A settle of part of a hold (an MPP session's voucher) is spend like a settle.
            "settle" | "psettle" => {
                let amount = entry.amount.unwrap_or(0);
                self.spent += amount;
                if !entry.task.is_empty() {
                    self.tasks.entry((entry.tree.clone(), entry.task.clone())).or_default().cost += amount;
                }
                let agent = self.agent(&entry.agent);
                agent.spent_micros += amount;
                agent.settles += 1;
                for row in
                    [spend_row(&mut self.services, &entry.service), spend_row(&mut self.protocols, &entry.protocol)]
                {
                    row.spent_micros += amount;
                    row.settles += 1;
                }
                if entry.protocol == "api" {
                    self.add_api_call(entry, amount);
                }
            }
            "refuse" => {
                self.agent(&entry.agent).refusals += 1;
                spend_row(&mut self.services, &entry.service).refusals += 1;
                spend_row(&mut self.protocols, &entry.protocol).refusals += 1;
                let row = self
                    .refusals
                    .entry(entry.reason.clone())
                    .or_insert_with(|| RefusalRow { reason: entry.reason.clone(), ..RefusalRow::default() });
                row.count += 1;
                row.requested_micros += entry.amount.unwrap_or(0);
            }
            "outcome" => {
                let Some(outcome) = TaskOutcome::from_code(&entry.reason) else { return };
                self.agent(&entry.agent);
                self.tasks.entry((entry.tree.clone(), entry.task.clone())).or_default().outcome =
                    Some((outcome, entry.task_type.clone(), entry.agent.clone()));
            }
            _ => {}
        }
    }

    /// A keyed-API settle: its model and token counts are in the settle's details.
    fn add_api_call(&mut self, entry: &LogEntry, amount: u64) {
        let detail: serde_json::Value = serde_json::from_str(&entry.detail).unwrap_or_default();
        let text = |key: &str| detail.get(key).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        let count = |key: &str| text(key).parse::<u64>().unwrap_or(0);
        let model = text("model");
        let row = self.api_models.entry((entry.service.clone(), model.clone())).or_insert_with(|| ApiModelRow {
            service: entry.service.clone(),
            model,
            ..ApiModelRow::default()
        });
        row.calls += 1;
        row.spent_micros += amount;
        row.input_tokens += count("input_tokens");
        row.output_tokens += count("output_tokens");
        if detail.get("cost_unknown").is_some() {
            row.cost_unknown += 1;
        }
    }

    fn agent(&mut self, agent: &str) -> &mut AgentRow {
        self.agents
            .entry(agent.to_owned())
            .or_insert_with(|| AgentRow { agent: agent.to_owned(), ..AgentRow::default() })
    }

    /// The agents that reported outcomes, by task type (to look up the caps in force).
    pub fn agents_by_task_type(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (_, agent_type, agent) in self.tasks.values().filter_map(|t| t.outcome.as_ref()) {
            out.entry(agent_type.clone()).or_default().insert(agent.clone());
        }
        out
    }

    /// The report. `caps` maps a task type to its cap in force (see [`CAP_IN_FORCE_RULE`]).
    pub fn finish(self, filter: &LogFilter, caps: &BTreeMap<String, u64>) -> Report {
        let mut by_type: BTreeMap<String, Vec<(TaskOutcome, u64)>> = BTreeMap::new();
        let mut agents = self.agents;
        let mut agent_success: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut unfinished_tasks = 0;
        for task in self.tasks.into_values() {
            let Some((outcome, task_type, agent)) = task.outcome else {
                unfinished_tasks += 1;
                continue;
            };
            by_type.entry(task_type).or_default().push((outcome, task.cost));
            if let Some(row) = agents.get_mut(&agent) {
                row.tasks += 1;
                if outcome == TaskOutcome::Success {
                    row.successes += 1;
                    let acc = agent_success.entry(agent).or_default();
                    acc.0 += task.cost;
                    acc.1 += 1;
                } else {
                    row.unsuccessful += 1;
                }
            }
        }
        for (agent, (sum, n)) in agent_success {
            if let Some(row) = agents.get_mut(&agent) {
                row.mean_success_micros = Some(mean(u128::from(sum), n));
            }
        }
        let task_types = by_type.into_iter().map(|(task_type, tasks)| task_type_row(task_type, &tasks, caps)).collect();
        let mut agents: Vec<AgentRow> = agents.into_values().collect();
        agents.sort_by(|a, b| b.spent_micros.cmp(&a.spent_micros).then_with(|| a.agent.cmp(&b.agent)));
        let by_spend = |rows: BTreeMap<String, SpendRow>| {
            let mut rows: Vec<SpendRow> = rows.into_values().collect();
            rows.sort_by(|a, b| b.spent_micros.cmp(&a.spent_micros).then_with(|| a.key.cmp(&b.key)));
            rows
        };
        let mut api_models: Vec<ApiModelRow> = self.api_models.into_values().collect();
        api_models.sort_by(|a, b| {
            b.spent_micros.cmp(&a.spent_micros).then_with(|| (&a.service, &a.model).cmp(&(&b.service, &b.model)))
        });
        let mut refusals: Vec<RefusalRow> = self.refusals.into_values().collect();
        refusals.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
        Report {
            since_ms: filter.since_ms,
            until_ms: filter.until_ms,
            entries: self.entries,
            spent_micros: self.spent,
            unfinished_tasks,
            rules: Rules::current(),
            task_types,
            agents,
            services: by_spend(self.services),
            protocols: by_spend(self.protocols),
            refusals,
            api_models,
        }
    }
}

/// `sum / n` rounded half up (`n` > 0).
fn mean(sum: u128, n: u64) -> u64 {
    let n = u128::from(n.max(1));
    u64::try_from((2 * sum + n) / (2 * n)).unwrap_or(u64::MAX)
}

/// The nearest-rank `percent` percentile of sorted, non-empty `costs`.
fn nearest_rank(sorted: &[u64], percent: u64) -> u64 {
    let n = sorted.len() as u64;
    let rank = (percent * n).div_ceil(100).max(1);
    sorted[(rank - 1) as usize]
}

/// Statistics of `costs`, or `None` when there are none.
pub fn cost_stats(costs: &[u64]) -> Option<CostStats> {
    let mut sorted = costs.to_vec();
    sorted.sort_unstable();
    let (first, last) = (*sorted.first()?, *sorted.last()?);
    let total: u128 = sorted.iter().map(|&c| u128::from(c)).sum();
    Some(CostStats {
        count: sorted.len() as u64,
        total_micros: u64::try_from(total).unwrap_or(u64::MAX),
        mean_micros: mean(total, sorted.len() as u64),
        median_micros: nearest_rank(&sorted, 50),
        p90_micros: nearest_rank(&sorted, 90),
        min_micros: first,
        max_micros: last,
    })
}

/// Population variance (rounded to nearest), standard deviation (rounded down) and coefficient
/// of variation of `costs`, computed exactly in integers: variance = (n Σx² − (Σx)²) / n².
pub fn spread(costs: &[u64]) -> (u128, u64, Option<f64>) {
    let n = costs.len() as u128;
    if n == 0 {
        return (0, 0, None);
    }
    let sum: u128 = costs.iter().map(|&c| u128::from(c)).sum();
    let squares: u128 = costs.iter().map(|&c| u128::from(c) * u128::from(c)).sum();
    let numerator = (n * squares).saturating_sub(sum * sum);
    let variance = (2 * numerator + n * n) / (2 * n * n);
    // stddev = sqrt(numerator) / n; cv = stddev / mean = sqrt(numerator) / sum.
    let root = numerator.isqrt();
    let stddev = u64::try_from(root / n).unwrap_or(u64::MAX);
    let cv = (sum > 0).then(|| (((numerator as f64).sqrt() / sum as f64) * 1000.0).round() / 1000.0);
    (variance, stddev, cv)
}

/// 2.5 × `median`, rounded up.
pub fn suggested_cap(median: u64) -> u64 {
    let scaled = u128::from(median) * u128::from(SUGGESTED_CAP_NUMERATOR);
    u64::try_from(scaled.div_ceil(u128::from(SUGGESTED_CAP_DENOMINATOR))).unwrap_or(u64::MAX)
}

fn task_type_row(task_type: String, tasks: &[(TaskOutcome, u64)], caps: &BTreeMap<String, u64>) -> TaskTypeRow {
    let of = |want: &dyn Fn(TaskOutcome) -> bool| -> Vec<u64> {
        tasks.iter().filter(|(o, _)| want(*o)).map(|(_, c)| *c).collect()
    };
    let successes = of(&|o| o == TaskOutcome::Success);
    let unsuccessful = of(&|o| o != TaskOutcome::Success);
    let all = of(&|_| true);
    let (variance, stddev, cv) = spread(&all);
    let success_cost = cost_stats(&successes);
    TaskTypeRow {
        tasks: all.len() as u64,
        successes: successes.len() as u64,
        failed: tasks.iter().filter(|(o, _)| *o == TaskOutcome::Failed).count() as u64,
        abandoned: tasks.iter().filter(|(o, _)| *o == TaskOutcome::Abandoned).count() as u64,
        spent_micros: all.iter().sum(),
        suggested_cap_micros: success_cost.as_ref().map(|s| suggested_cap(s.median_micros)),
        success_cost,
        unsuccessful_cost: cost_stats(&unsuccessful),
        variance_micros2: variance,
        stddev_micros: stddev,
        unusual_variance: all.len() as u64 >= UNUSUAL_MIN_TASKS && cv.is_some_and(|cv| cv >= UNUSUAL_CV),
        cv,
        cap_in_force_micros: caps.get(&task_type).copied(),
        task_type,
    }
}

/// Builds the report for `filter` from the ledger, streaming the log; looks up the per-task cap
/// in force of each agent that ran a task type.
pub async fn report(ledger: &Ledger, filter: LogFilter) -> Result<Report, LedgerError> {
    let mut reader = LogReader::new(ledger, filter.clone()).await?;
    let mut builder = ReportBuilder::default();
    while let Some(entry) = reader.next().await? {
        builder.add(&entry);
    }
    let mut caps = BTreeMap::new();
    let mut agent_caps: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for (task_type, agents) in builder.agents_by_task_type() {
        for agent in agents {
            let cap = match agent_caps.get(&agent) {
                Some(cap) => *cap,
                None => {
                    let cap = match agent.parse() {
                        Ok(id) => match ledger.controls(&id).await {
                            Ok(controls) => controls.controls.task_cap,
                            Err(LedgerError::UnknownAgent) => None,
                            Err(e) => return Err(e),
                        },
                        Err(_) => None,
                    };
                    agent_caps.insert(agent, cap);
                    cap
                }
            };
            if let Some(cap) = cap {
                let entry = caps.entry(task_type.clone()).or_insert(cap);
                *entry = (*entry).max(cap);
            }
        }
    }
    let mut report = builder.finish(&filter, &caps);
    for row in &mut report.agents {
        if let Ok(id) = row.agent.parse() {
            match ledger.agent(&id).await {
                Ok(record) => row.handle = Some(record.handle),
                Err(LedgerError::UnknownAgent) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(report)
}

fn usd(micros: u64) -> String {
    crate::human::usd(micros)
}

fn opt_usd(micros: Option<u64>) -> String {
    micros.map(usd).unwrap_or_else(|| "-".into())
}

/// The range a report covers, for people: `from … until …` in UTC.
fn range(report: &Report) -> String {
    match (report.since_ms, report.until_ms) {
        (None, None) => "the whole log".to_owned(),
        (Some(since), None) => format!("the log from {}", crate::human::time(since)),
        (None, Some(until)) => format!("the log until {}", crate::human::time(until)),
        (Some(since), Some(until)) => {
            format!("the log from {} until {}", crate::human::time(since), crate::human::time(until))
        }
    }
}

/// The report as tables for people. A section with nothing to show says why instead of printing
/// a bare header; every figure is one the log's entries add up to (see the module comment).
pub fn table(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Spent {} over {} ({} log entries); {} task(s) spent without an outcome reported.\n",
        usd(report.spent_micros),
        range(report),
        report.entries,
        report.unfinished_tasks
    );
    let _ = writeln!(out, "COST PER TASK TYPE");
    if report.task_types.is_empty() {
        let _ = writeln!(
            out,
            "  no task ended in this range: a task counts once its outcome is reported \
             (`spendcap task-outcome`, POST /v1/tasks/{{task}}/outcome){}",
            if report.unfinished_tasks > 0 {
                format!("; {} task(s) spent without one", report.unfinished_tasks)
            } else {
                String::new()
            }
        );
    } else {
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>4} {:>4} {:>4} {:>12} {:>12} {:>12} {:>12} {:>7} {:>12} {:>12}",
            "TYPE",
            "TASKS",
            "OK",
            "FAIL",
            "ABND",
            "MEAN OK",
            "MEDIAN OK",
            "P90 OK",
            "MEAN FAIL",
            "CV",
            "SUGGESTED",
            "CAP"
        );
        for row in &report.task_types {
            let cv = row.cv.map(|cv| format!("{cv:.3}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<18} {:>5} {:>4} {:>4} {:>4} {:>12} {:>12} {:>12} {:>12} {:>7} {:>12} {:>12}{}",
                row.task_type,
                row.tasks,
                row.successes,
                row.failed,
                row.abandoned,
                opt_usd(row.success_cost.as_ref().map(|s| s.mean_micros)),
                opt_usd(row.success_cost.as_ref().map(|s| s.median_micros)),
                opt_usd(row.success_cost.as_ref().map(|s| s.p90_micros)),
                opt_usd(row.unsuccessful_cost.as_ref().map(|s| s.mean_micros)),
                cv,
                opt_usd(row.suggested_cap_micros),
                opt_usd(row.cap_in_force_micros),
                if row.unusual_variance { "  ! unusual variance" } else { "" }
            );
        }
        let _ = writeln!(out, "  a task's cost is what every hold carrying its label settled (sub-agents included)");
        let _ = writeln!(out, "  rule: {}", report.rules.suggested_cap);
        let _ = writeln!(out, "  rule: {}", report.rules.unusual_variance);
        let _ = writeln!(out, "  rule: {}", report.rules.percentiles);
    }
    let _ = writeln!(out, "\nBY AGENT");
    if report.agents.is_empty() {
        let _ = writeln!(out, "  no agent paid, was refused or reported a task outcome in this range");
    } else {
        let _ = writeln!(
            out,
            "{:<16} {:<38} {:>14} {:>8} {:>6} {:>4} {:>5} {:>14}",
            "HANDLE", "AGENT", "SPENT", "SETTLES", "TASKS", "OK", "NOTOK", "MEAN OK"
        );
        for row in &report.agents {
            let _ = writeln!(
                out,
                "{:<16} {:<38} {:>14} {:>8} {:>6} {:>4} {:>5} {:>14}",
                row.handle.as_deref().unwrap_or("-"),
                row.agent,
                usd(row.spent_micros),
                row.settles,
                row.tasks,
                row.successes,
                row.unsuccessful,
                opt_usd(row.mean_success_micros)
            );
        }
    }
    for (title, what, rows) in
        [("TOP SERVICES", "service", &report.services), ("TOP PROTOCOLS", "protocol", &report.protocols)]
    {
        let _ = writeln!(out, "\n{title}");
        if rows.is_empty() {
            let _ = writeln!(out, "  nothing was settled or refused in this range, so no {what} has figures");
            continue;
        }
        let _ = writeln!(out, "{:<40} {:>14} {:>8} {:>8}", what.to_uppercase(), "SPENT", "SETTLES", "REFUSED");
        for row in rows.iter().take(10) {
            let key = if row.key.is_empty() { "(none given)" } else { row.key.as_str() };
            let _ = writeln!(out, "{:<40} {:>14} {:>8} {:>8}", key, usd(row.spent_micros), row.settles, row.refusals);
        }
        if rows.len() > 10 {
            let _ = writeln!(out, "  … and {} more (--csv or --json lists every one)", rows.len() - 10);
        }
    }
    if !report.api_models.is_empty() {
        let _ = writeln!(out, "\nAPI CALLS BY SERVICE AND MODEL");
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:>8} {:>14} {:>12} {:>12}",
            "SERVICE", "MODEL", "CALLS", "SPENT", "TOKENS IN", "TOKENS OUT"
        );
        for row in &report.api_models {
            let model = if row.model.is_empty() { "-" } else { row.model.as_str() };
            let _ = writeln!(
                out,
                "{:<16} {:<28} {:>8} {:>14} {:>12} {:>12}",
                row.service,
                model,
                row.calls,
                usd(row.spent_micros),
                row.input_tokens,
                row.output_tokens
            );
        }
    }
    let _ = writeln!(out, "\nREFUSALS BY REASON");
    if report.refusals.is_empty() {
        let _ = writeln!(out, "  no payment was refused in this range");
    } else {
        let _ = writeln!(out, "{:<28} {:>8} {:>14}", "REASON", "COUNT", "REQUESTED");
        for row in &report.refusals {
            let _ = writeln!(out, "{:<28} {:>8} {:>14}", row.reason, row.count, usd(row.requested_micros));
        }
    }
    out
}

pub const CSV_HEADER: &str = "section,key,tasks,successes,failed,abandoned,spent_micros,\
mean_success_micros,median_success_micros,p90_success_micros,mean_unsuccessful_micros,\
variance_micros2,stddev_micros,cv,unusual_variance,suggested_cap_micros,cap_in_force_micros,settles,refusals\n";

/// The report as CSV: one row per task type, agent, service, protocol and refusal reason, told
/// apart by the `section` column; fields a section does not have are empty.
pub fn csv(report: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    let mut row = |fields: [String; 19]| crate::csv::push_row(&mut out, &fields);
    let e = String::new;
    for t in &report.task_types {
        row([
            "task_type".into(),
            t.task_type.clone(),
            t.tasks.to_string(),
            t.successes.to_string(),
            t.failed.to_string(),
            t.abandoned.to_string(),
            t.spent_micros.to_string(),
            num(t.success_cost.as_ref().map(|s| s.mean_micros)),
            num(t.success_cost.as_ref().map(|s| s.median_micros)),
            num(t.success_cost.as_ref().map(|s| s.p90_micros)),
            num(t.unsuccessful_cost.as_ref().map(|s| s.mean_micros)),
            t.variance_micros2.to_string(),
            t.stddev_micros.to_string(),
            t.cv.map(|cv| format!("{cv:.3}")).unwrap_or_default(),
            t.unusual_variance.to_string(),
            num(t.suggested_cap_micros),
            num(t.cap_in_force_micros),
            e(),
            e(),
        ]);
    }
    for a in &report.agents {
        row([
            "agent".into(),
            a.agent.clone(),
            a.tasks.to_string(),
            a.successes.to_string(),
            a.unsuccessful.to_string(),
            e(),
            a.spent_micros.to_string(),
            num(a.mean_success_micros),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            a.settles.to_string(),
            a.refusals.to_string(),
        ]);
    }
    for (section, rows) in [("service", &report.services), ("protocol", &report.protocols)] {
        for s in rows {
            row([
                section.into(),
                s.key.clone(),
                e(),
                e(),
                e(),
                e(),
                s.spent_micros.to_string(),
                e(),
                e(),
                e(),
                e(),
                e(),
                e(),
                e(),
                e(),
                e(),
                e(),
                s.settles.to_string(),
                s.refusals.to_string(),
            ]);
        }
    }
    for r in &report.refusals {
        row([
            "refusal".into(),
            r.reason.clone(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            e(),
            r.count.to_string(),
        ]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture log line.
    fn entry(event: &str, agent: &str, task: &str, amount: u64) -> LogEntry {
        LogEntry {
            id: "1-1".into(),
            tree: "t1".into(),
            ts_ms: 1,
            event: event.into(),
            agent: agent.into(),
            task: task.into(),
            service: "api.example.com".into(),
            protocol: "generic".into(),
            amount: Some(amount),
            ..LogEntry::default()
        }
    }

    fn outcome(agent: &str, task: &str, task_type: &str, outcome: &str) -> LogEntry {
        LogEntry {
            event: "outcome".into(),
            task_type: task_type.into(),
            reason: outcome.into(),
            amount: None,
            service: String::new(),
            protocol: String::new(),
            ..entry("outcome", agent, task, 0)
        }
    }

    fn build(entries: &[LogEntry]) -> Report {
        let mut builder = ReportBuilder::default();
        for e in entries {
            builder.add(e);
        }
        builder.finish(&LogFilter::default(), &BTreeMap::new())
    }

    fn row<'a>(report: &'a Report, task_type: &str) -> &'a TaskTypeRow {
        report.task_types.iter().find(|r| r.task_type == task_type).expect("task type row")
    }

    #[test]
    fn empty_log() {
        let report = build(&[]);
        assert_eq!(report.entries, 0);
        assert_eq!(report.spent_micros, 0);
        assert_eq!(report.unfinished_tasks, 0);
        assert!(report.task_types.is_empty() && report.agents.is_empty() && report.refusals.is_empty());
        assert!(report.rules.suggested_cap.contains("2.5 x the median"));
        let text = table(&report);
        assert!(text.contains("Spent $0.00 over the whole log"), "{text}");
        // Every section says why it is empty instead of printing a bare header.
        for why in [
            "no task ended in this range",
            "no agent paid, was refused or reported a task outcome",
            "no service has figures",
            "no protocol has figures",
            "no payment was refused in this range",
        ] {
            assert!(text.contains(why), "{why}: {text}");
        }
        for header in ["TYPE ", "HANDLE ", "REASON "] {
            assert!(!text.contains(header), "a bare header {header:?}: {text}");
        }
        assert_eq!(csv(&report), CSV_HEADER);
    }

    #[test]
    fn api_spend_is_grouped_by_service_and_model_with_tokens() {
        let api = |model: &str, amount: u64, detail: &str| LogEntry {
            service: "openai".into(),
            protocol: "api".into(),
            detail: detail.replace("MODEL", model),
            ..entry("settle", "ag_t1_1", "r1", amount)
        };
        let report = build(&[
            api("gpt-4o", 300, r#"{"model":"MODEL","input_tokens":"100","output_tokens":"10"}"#),
            api("gpt-4o", 200, r#"{"model":"MODEL","input_tokens":"50","output_tokens":"5"}"#),
            api("gpt-4o-mini", 900, r#"{"model":"MODEL","cost_unknown":"stream_cut"}"#),
            entry("settle", "ag_t1_1", "r1", 7),
        ]);
        let rows: Vec<(&str, u64, u64, u64, u64, u64)> = report
            .api_models
            .iter()
            .map(|r| (r.model.as_str(), r.calls, r.spent_micros, r.input_tokens, r.output_tokens, r.cost_unknown))
            .collect();
        assert_eq!(rows, vec![("gpt-4o-mini", 1, 900, 0, 0, 1), ("gpt-4o", 2, 500, 150, 15, 0)]);
        assert!(table(&report).contains("API CALLS BY SERVICE AND MODEL"), "{}", table(&report));
    }

    #[test]
    fn single_task() {
        let report = build(&[
            entry("hold", "ag_t1_1", "r1", 400),
            entry("settle", "ag_t1_1", "r1", 333),
            outcome("ag_t1_1", "r1", "research", "success"),
        ]);
        let r = row(&report, "research");
        let s = r.success_cost.as_ref().expect("success stats");
        assert_eq!((s.count, s.total_micros, s.mean_micros, s.median_micros, s.p90_micros), (1, 333, 333, 333, 333));
        assert_eq!((r.variance_micros2, r.stddev_micros, r.cv), (0, 0, Some(0.0)));
        assert!(!r.unusual_variance);
        // 2.5 x 333 = 832.5, rounded up.
        assert_eq!(r.suggested_cap_micros, Some(833));
        assert_eq!(r.unsuccessful_cost, None);
        assert_eq!(report.agents[0].mean_success_micros, Some(333));
        assert_eq!(report.spent_micros, 333);
    }

    #[test]
    fn hand_computed_figures() {
        let a = "ag_t1_1";
        let report = build(&[
            // research: successes cost 100 (40 + 60), 200, 600; one failure cost 50.
            entry("settle", a, "r1", 40),
            entry("settle", a, "r1", 60),
            entry("settle", a, "r2", 200),
            entry("settle", a, "r3", 600),
            entry("settle", a, "r4", 50),
            outcome(a, "r1", "research", "success"),
            outcome(a, "r2", "research", "success"),
            outcome(a, "r3", "research", "success"),
            // A later outcome supersedes an earlier one.
            outcome(a, "r4", "research", "success"),
            outcome(a, "r4", "research", "failed"),
            // enrichment: 10, 10, 1000, all successful: an unusual spread.
            entry("settle", "ag_t1_2", "e1", 10),
            entry("settle", "ag_t1_2", "e2", 10),
            entry("settle", "ag_t1_2", "e3", 1000),
            outcome("ag_t1_2", "e1", "enrichment", "success"),
            outcome("ag_t1_2", "e2", "enrichment", "success"),
            outcome("ag_t1_2", "e3", "enrichment", "success"),
            // A task that spent and never ended.
            entry("settle", a, "open", 7),
            // Refusals: two over the cap, one revoked.
            LogEntry { reason: "cap_exceeded".into(), ..entry("refuse", a, "r5", 500) },
            LogEntry { reason: "cap_exceeded".into(), ..entry("refuse", a, "r5", 700) },
            LogEntry { reason: "agent_revoked".into(), ..entry("refuse", "ag_t1_2", "e4", 100) },
        ]);
        let r = row(&report, "research");
        assert_eq!((r.tasks, r.successes, r.failed, r.abandoned, r.spent_micros), (4, 3, 1, 0, 950));
        let s = r.success_cost.as_ref().expect("success stats");
        // mean 900 / 3; nearest-rank median = 2nd of 3; p90 = ceil(2.7) = 3rd.
        assert_eq!((s.total_micros, s.mean_micros, s.median_micros, s.p90_micros), (900, 300, 200, 600));
        let f = r.unsuccessful_cost.as_ref().expect("failure stats");
        assert_eq!((f.count, f.mean_micros, f.median_micros), (1, 50, 50));
        // Over 100, 200, 600, 50: n Σx² − (Σx)² = 4 × 412500 − 950² = 747500; / 16 = 46718.75.
        assert_eq!(r.variance_micros2, 46719);
        // sqrt(747500) = 864.58; / 4 = 216; cv = 864.58 / 950 = 0.910.
        assert_eq!(r.stddev_micros, 216);
        assert_eq!(r.cv, Some(0.91));
        assert!(!r.unusual_variance);
        assert_eq!(r.suggested_cap_micros, Some(500));

        let e = row(&report, "enrichment");
        let s = e.success_cost.as_ref().expect("success stats");
        assert_eq!((s.mean_micros, s.median_micros, s.p90_micros), (340, 10, 1000));
        // 3 × 1000200 − 1020² = 1960200; / 9 = 217800; sqrt = 1400.07 → stddev 466, cv 1.373.
        assert_eq!((e.variance_micros2, e.stddev_micros, e.cv), (217800, 466, Some(1.373)));
        assert!(e.unusual_variance);
        assert_eq!(e.suggested_cap_micros, Some(25));

        assert_eq!(report.unfinished_tasks, 1);
        assert_eq!(report.spent_micros, 950 + 1020 + 7);
        assert_eq!(report.refusals.len(), 2);
        assert_eq!((report.refusals[0].reason.as_str(), report.refusals[0].count), ("cap_exceeded", 2));
        assert_eq!(report.refusals[0].requested_micros, 1200);
        assert_eq!((report.refusals[1].reason.as_str(), report.refusals[1].count), ("agent_revoked", 1));
        assert_eq!(report.services[0].spent_micros, 1977);
        assert_eq!(report.services[0].refusals, 3);
        assert_eq!(report.protocols[0].key, "generic");
        // Agents by spend: ag_t1_2 spent 1020, ag_t1_1 957.
        assert_eq!(report.agents[0].agent, "ag_t1_2");
        assert_eq!(report.agents[0].mean_success_micros, Some(340));
        assert_eq!((report.agents[1].tasks, report.agents[1].successes, report.agents[1].unsuccessful), (4, 3, 1));
        assert_eq!(report.agents[1].refusals, 2);
        assert!(table(&report).contains("! unusual variance"));
        assert!(csv(&report).contains("task_type,enrichment,3,3,0,0,1020,340,10,1000,,217800,466,1.373,true,25,,,"));
    }

    #[test]
    fn all_failed() {
        let a = "ag_t1_1";
        let report = build(&[
            entry("settle", a, "b1", 100),
            entry("settle", a, "b2", 300),
            entry("settle", a, "b3", 200),
            outcome(a, "b1", "booking", "failed"),
            outcome(a, "b2", "booking", "failed"),
            outcome(a, "b3", "booking", "abandoned"),
        ]);
        let r = row(&report, "booking");
        assert_eq!((r.tasks, r.successes, r.failed, r.abandoned), (3, 0, 2, 1));
        assert_eq!(r.success_cost, None);
        assert_eq!(r.suggested_cap_micros, None);
        let f = r.unsuccessful_cost.as_ref().expect("failure stats");
        assert_eq!((f.count, f.total_micros, f.mean_micros, f.median_micros, f.p90_micros), (3, 600, 200, 200, 300));
        // 3 × 140000 − 600² = 60000; / 9 = 6666.67; cv = 244.95 / 600.
        assert_eq!((r.variance_micros2, r.cv), (6667, Some(0.408)));
        assert_eq!(report.agents[0].mean_success_micros, None);
    }

    #[test]
    fn free_tasks_have_no_cv() {
        let report = build(&[outcome("ag_t1_1", "x", "free", "success"), outcome("ag_t1_1", "y", "free", "success")]);
        let r = row(&report, "free");
        assert_eq!((r.cv, r.unusual_variance, r.suggested_cap_micros), (None, false, Some(0)));
    }

    #[test]
    fn mean_rounds_half_up_and_percentiles_are_observed() {
        let s = cost_stats(&[1, 2]).expect("stats");
        assert_eq!((s.mean_micros, s.median_micros, s.p90_micros), (2, 1, 2));
        let ten: Vec<u64> = (1..=10).collect();
        let s = cost_stats(&ten).expect("stats");
        assert_eq!((s.median_micros, s.p90_micros), (5, 9));
        assert_eq!(suggested_cap(1), 3);
        assert_eq!(suggested_cap(2), 5);
    }
}
