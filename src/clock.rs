//! The daemon's clock. Time-dependent logic takes `now` from here, so tests can move time
//! forward (hold expiry, agent expiry) without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Milliseconds since the Unix epoch, plus any offset a test added.
    pub fn now_ms(&self) -> u64 {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        (system + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance_ms(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Whether this instance's clock agrees with the ledger's closely enough to pay.
///
/// The ledger decides every expiry by its own clock (Redis's `TIME`), but the daemon signs times
/// of its own (x402 `validBefore`, AP2 `exp`) and computes hold expiries from them. A background
/// task measures the offset at start and every few seconds ([`ClockGuard::record`]); while it is
/// above the bound, payments are refused (`clock_skew`) and `/healthz` fails.
#[derive(Debug)]
pub struct ClockGuard {
    max_ms: u64,
    /// The last measured offset (this clock minus the ledger's), in ms.
    offset_ms: AtomicI64,
}

impl ClockGuard {
    /// A guard allowing `max_ms` of offset. A ledger without a clock of its own (the in-process
    /// one) is never measured and always agrees.
    pub fn new(max_ms: u64) -> ClockGuard {
        ClockGuard { max_ms, offset_ms: AtomicI64::new(0) }
    }

    /// Records a measurement: this clock read `local_before_ms` and `local_after_ms` around the
    /// ledger's answer `ledger_ms`; the offset is taken from the midpoint. Returns the offset.
    pub fn record(&self, local_before_ms: u64, ledger_ms: u64, local_after_ms: u64) -> i64 {
        let midpoint = (local_before_ms as i128 + local_after_ms as i128) / 2;
        let offset = (midpoint - ledger_ms as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        self.offset_ms.store(offset, Ordering::Relaxed);
        offset
    }

    /// `Err(offset)` while the last measured offset is above the bound.
    pub fn check(&self) -> Result<(), i64> {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        if offset.unsigned_abs() > self.max_ms {
            return Err(offset);
        }
        Ok(())
    }

    pub fn max_ms(&self) -> u64 {
        self.max_ms
    }
}

#[cfg(test)]
mod tests {
    use super::ClockGuard;

    #[test]
    fn the_offset_is_taken_at_the_midpoint_and_bounded_both_ways() {
        let guard = ClockGuard::new(2_000);
        assert_eq!(guard.record(10_000, 10_050, 10_100), 0);
        assert!(guard.check().is_ok());
        assert_eq!(guard.record(130_000, 10_000, 130_000), 120_000);
        assert_eq!(guard.check(), Err(120_000));
        assert_eq!(guard.record(10_000, 12_001, 10_000), -2_001);
        assert_eq!(guard.check(), Err(-2_001));
        assert_eq!(guard.record(10_000, 12_000, 10_000), -2_000);
        assert!(guard.check().is_ok(), "the bound itself is allowed");
    }
}
