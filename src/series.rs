//! Spend over time: settled amounts from the log, summed per hour or per UTC day and per agent,
//! budget tree or protocol (the dashboard's chart, `GET /v1/reports/series`). A pure function of
//! log entries, like the reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ledger::LogEntry;

/// What one series is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SeriesBy {
    Agent,
    Tree,
    Protocol,
}

/// How long one bucket is (hours and days in UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn ms(self) -> u64 {
        match self {
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }

    /// The start of the bucket `ts_ms` falls in.
    pub fn start_of(self, ts_ms: u64) -> u64 {
        ts_ms - ts_ms % self.ms()
    }
}

/// The most buckets one answer has (a month of hours, about three years of days).
pub const MAX_BUCKETS: u64 = 1_000;

/// One line of the chart: its key (agent id, tree id or protocol), a label for people (the
/// agent's handle, the tree's root handle, the protocol) and the spend in each bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Series {
    pub key: String,
    pub label: String,
    pub total_micros: u64,
    /// Settled micro-USD per bucket, aligned with `SpendSeries::starts_ms`.
    pub points: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SpendSeries {
    pub by: SeriesBy,
    pub bucket: Bucket,
    pub bucket_ms: u64,
    /// The start of each bucket (ms since the epoch, UTC), oldest first.
    pub starts_ms: Vec<u64>,
    /// Largest total first.
    pub series: Vec<Series>,
}

/// Sums the `settle` entries among `entries` with `since_ms <= ts_ms < until_ms` into buckets
/// from the bucket of `since_ms` to the bucket of `until_ms - 1`. `label` names a key for people
/// (unknown keys keep the key as their label). Callers bound the range to [`MAX_BUCKETS`].
pub fn spend_series<'a>(
    entries: impl IntoIterator<Item = &'a LogEntry>,
    by: SeriesBy,
    bucket: Bucket,
    since_ms: u64,
    until_ms: u64,
    label: impl Fn(&str) -> Option<String>,
) -> SpendSeries {
    let first = bucket.start_of(since_ms);
    let count = if until_ms > since_ms { (bucket.start_of(until_ms - 1) - first) / bucket.ms() + 1 } else { 0 };
    let starts_ms: Vec<u64> = (0..count).map(|i| first + i * bucket.ms()).collect();
    let mut sums: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in entries {
        if !matches!(entry.event.as_str(), "settle" | "psettle") || entry.ts_ms < since_ms || entry.ts_ms >= until_ms {
            continue;
        }
        let amount = entry.amount.unwrap_or(0);
        if amount == 0 {
            continue;
        }
        let key = match by {
            SeriesBy::Agent => entry.agent.clone(),
            SeriesBy::Tree => entry.tree.clone(),
            SeriesBy::Protocol => entry.protocol.clone(),
        };
        let index = ((bucket.start_of(entry.ts_ms) - first) / bucket.ms()) as usize;
        let points = sums.entry(key).or_insert_with(|| vec![0; starts_ms.len()]);
        points[index] = points[index].saturating_add(amount);
    }
    let mut series: Vec<Series> = sums
        .into_iter()
        .map(|(key, points)| Series {
            label: label(&key).unwrap_or_else(|| key.clone()),
            total_micros: points.iter().fold(0u64, |sum, p| sum.saturating_add(*p)),
            key,
            points,
        })
        .collect();
    series.sort_by(|a, b| b.total_micros.cmp(&a.total_micros).then_with(|| a.label.cmp(&b.label)));
    SpendSeries { by, bucket, bucket_ms: bucket.ms(), starts_ms, series }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(ts_ms: u64, agent: &str, protocol: &str, amount: u64) -> LogEntry {
        LogEntry {
            event: "settle".into(),
            ts_ms,
            agent: agent.into(),
            tree: "tr_1".into(),
            protocol: protocol.into(),
            amount: Some(amount),
            ..LogEntry::default()
        }
    }

    #[test]
    fn settles_are_summed_per_hour_and_key_within_the_range() {
        let h = 3_600_000;
        let entries = vec![
            settle(10 * h + 5, "ag_a", "x402", 100),
            settle(10 * h + 6, "ag_a", "acp", 50),
            settle(12 * h, "ag_a", "x402", 7),
            settle(12 * h + 1, "ag_b", "x402", 1_000),
            settle(9 * h, "ag_a", "x402", 99_999),  // before the range
            settle(13 * h, "ag_a", "x402", 99_999), // at its end (exclusive)
            LogEntry {
                event: "hold".into(),
                ts_ms: 10 * h,
                agent: "ag_a".into(),
                amount: Some(5),
                ..LogEntry::default()
            },
        ];
        let label = |key: &str| (key == "ag_a").then(|| "research".to_owned());
        let by_agent = spend_series(&entries, SeriesBy::Agent, Bucket::Hour, 10 * h, 13 * h, label);
        assert_eq!(by_agent.starts_ms, vec![10 * h, 11 * h, 12 * h]);
        assert_eq!(by_agent.series.len(), 2);
        assert_eq!((by_agent.series[0].label.as_str(), by_agent.series[0].points.clone()), ("ag_b", vec![0, 0, 1_000]));
        assert_eq!(
            (by_agent.series[1].label.as_str(), by_agent.series[1].points.clone()),
            ("research", vec![150, 0, 7])
        );
        assert_eq!(by_agent.series[1].total_micros, 157);

        let by_protocol = spend_series(&entries, SeriesBy::Protocol, Bucket::Day, 10 * h, 13 * h, |_| None);
        assert_eq!(by_protocol.starts_ms, vec![0]);
        let x402 = by_protocol.series.iter().find(|s| s.key == "x402").expect("x402");
        assert_eq!(x402.points, vec![1_107]);
    }
}
