//! Prometheus metrics of this daemon instance: holds, settles, voids, refusals by reason, spend
//! by protocol, hold latency and ledger errors, served as text at `/metrics` (admin token).
//!
//! Counters count what this instance handled (several instances are summed by Prometheus); they
//! are updated in `pay.rs` and `api/holds.rs`, the two places every payment's ledger steps go
//! through. A replayed idempotent answer is not counted again.

use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::ledger::{HoldOutcome, LedgerError, SettleOutcome};

pub struct Metrics {
    registry: Registry,
    holds: IntCounterVec,
    settles: IntCounterVec,
    voids: IntCounter,
    linked_by_settle: IntCounter,
    refusals: IntCounterVec,
    spend: IntCounterVec,
    hold_latency: HistogramVec,
    ledger_errors: IntCounterVec,
    outcomes: IntCounterVec,
}

/// Hold latency buckets, seconds: one Redis round trip is well under a millisecond locally.
const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Metrics {
    /// Builds the registry. The metric definitions are constants, so a failure here is a bug.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let holds = counter("spendcap_holds_total", "Holds granted, by protocol.", &["protocol"])?;
        let settles = counter("spendcap_settles_total", "Holds settled, by protocol.", &["protocol"])?;
        let refusals =
            counter("spendcap_refusals_total", "Holds refused, by reason and protocol.", &["reason", "protocol"])?;
        let spend = counter("spendcap_spend_micros_total", "Micro-USD settled, by protocol.", &["protocol"])?;
        let ledger_errors =
            counter("spendcap_ledger_errors_total", "Ledger calls that failed (unavailable, corrupt).", &["code"])?;
        let outcomes = counter("spendcap_task_outcomes_total", "Task outcomes recorded.", &["outcome"])?;
        let voids = IntCounter::new("spendcap_voids_total", "Holds voided.")?;
        registry.register(Box::new(voids.clone()))?;
        let linked_by_settle = IntCounter::new(
            "spendcap_settle_linked_receipts_total",
            "Settles whose receipt, signed before the settle, was linked by the settle itself (the others take one more ledger call).",
        )?;
        registry.register(Box::new(linked_by_settle.clone()))?;
        let hold_latency = HistogramVec::new(
            HistogramOpts::new("spendcap_hold_duration_seconds", "Time the ledger took to decide a hold.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["protocol"],
        )?;
        registry.register(Box::new(hold_latency.clone()))?;
        Ok(Metrics {
            registry,
            holds,
            settles,
            voids,
            linked_by_settle,
            refusals,
            spend,
            hold_latency,
            ledger_errors,
            outcomes,
        })
    }

    pub fn hold(&self, protocol: &str, result: &Result<HoldOutcome, LedgerError>, elapsed: Duration) {
        self.hold_latency.with_label_values(&[protocol]).observe(elapsed.as_secs_f64());
        match result {
            Ok(HoldOutcome::Granted(grant)) if !grant.replayed => self.holds.with_label_values(&[protocol]).inc(),
            Ok(HoldOutcome::Refused(refusal)) if !refusal.replayed => {
                self.refusals.with_label_values(&[refusal.reason.code(), protocol]).inc()
            }
            Err(e) => self.ledger_error(e),
            _ => {}
        }
    }

    /// A precheck's answer: a refusal counts like a refused hold.
    pub fn precheck(&self, protocol: &str, result: &Result<Option<crate::ledger::Refusal>, LedgerError>) {
        match result {
            Ok(Some(refusal)) => self.refusals.with_label_values(&[refusal.reason.code(), protocol]).inc(),
            Err(e) => self.ledger_error(e),
            Ok(None) => {}
        }
    }

    pub fn settle(&self, result: &Result<SettleOutcome, LedgerError>) {
        match result {
            Ok(outcome) if !outcome.replayed => {
                let protocol = outcome.facts.protocol.as_str();
                self.settles.with_label_values(&[protocol]).inc();
                self.spend.with_label_values(&[protocol]).inc_by(outcome.amount.get());
                if outcome.linked {
                    self.linked_by_settle.inc();
                }
            }
            Err(e) => self.ledger_error(e),
            _ => {}
        }
    }

    pub fn void<T>(&self, result: &Result<(T, bool), LedgerError>) {
        match result {
            Ok((_, false)) => self.voids.inc(),
            Err(e) => self.ledger_error(e),
            _ => {}
        }
    }

    pub fn outcome(&self, outcome: &str) {
        self.outcomes.with_label_values(&[outcome]).inc();
    }

    /// Counts failures of the ledger itself; answers about the request (unknown hold, ...) are not.
    pub fn ledger_error(&self, error: &LedgerError) {
        if matches!(error, LedgerError::Unavailable(_) | LedgerError::OutcomeUnknown { .. } | LedgerError::Corrupt(_)) {
            self.ledger_errors.with_label_values(&[error.code()]).inc();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
