//! Holds this instance asked the ledger for but whose grant never reached the agent: the ledger
//! did not answer in time (nor when asked again), so the agent was told `ledger_outcome_unknown`.
//! If Redis ran the hold after all, its money would stay held until the hold's TTL; a background
//! task voids such holds once Redis answers again, and forgets their idempotency record, so that
//! the agent's retry with the key it was given makes a fresh hold.
//!
//! A retry that replays the hold before the withdrawal (through any instance: the idempotency
//! record notes the replay, and `forget_unacknowledged` then keeps it) makes the hold the agent's,
//! and it is not voided; a replay in this instance racing the withdrawal is answered
//! `ledger_outcome_unknown` again, and the next retry settles which it is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::app::Core;
use crate::identity::{AgentId, HoldId};
use crate::ledger::{Caller, LedgerError};

/// How often the withdrawal task looks for unacknowledged holds.
pub const WITHDRAW_INTERVAL: Duration = Duration::from_millis(200);

/// The void reason of a withdrawn hold (its log line's `reason`).
pub const WITHDRAW_REASON: &str = "grant_not_delivered";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Not yet voided: a replay may still acknowledge it.
    Waiting,
    /// The task is voiding it now.
    Withdrawing,
    /// Voided; remembered until its expiry so that a late replay is not acknowledged.
    Withdrawn,
}

struct Entry {
    agent: AgentId,
    key: Option<String>,
    expires_at_ms: u64,
    stage: Stage,
}

#[derive(Default)]
pub struct Unacked {
    entries: Mutex<HashMap<HoldId, Entry>>,
}

impl Unacked {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<HoldId, Entry>> {
        // A panic while holding the lock leaves a consistent map (every change is one statement).
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers a hold whose grant did not reach the agent.
    pub fn remember(&self, agent: &AgentId, hold: &HoldId, key: Option<&str>, expires_at_ms: u64) {
        tracing::warn!(%agent, %hold, "a hold's outcome is unknown; it will be voided if Redis ran it");
        self.entries().insert(
            hold.clone(),
            Entry { agent: agent.clone(), key: key.map(str::to_owned), expires_at_ms, stage: Stage::Waiting },
        );
    }

    /// A replay is about to give `hold` to the agent: true if it may (it is the agent's from now
    /// on), false if the daemon is withdrawing or has withdrawn it.
    pub fn acknowledge(&self, hold: &HoldId) -> bool {
        let mut entries = self.entries();
        match entries.get(hold).map(|e| e.stage) {
            None => true,
            Some(Stage::Waiting) => {
                entries.remove(hold);
                true
            }
            Some(Stage::Withdrawing | Stage::Withdrawn) => false,
        }
    }

    /// How many holds are remembered and not yet withdrawn.
    pub fn waiting(&self) -> usize {
        self.entries().values().filter(|e| e.stage == Stage::Waiting).count()
    }

    /// One pass: voids every waiting hold (when Redis answers), forgets the withdrawn ones whose
    /// expiry has passed.
    pub async fn withdraw(state: &Core) {
        let now = state.clock.now_ms();
        let due: Vec<(HoldId, AgentId, Option<String>, u64)> = {
            let mut entries = state.unacked.entries();
            entries.retain(|_, e| !(e.stage == Stage::Withdrawn && e.expires_at_ms < now));
            entries
                .iter_mut()
                .filter(|(_, e)| e.stage == Stage::Waiting)
                .map(|(hold, e)| {
                    e.stage = Stage::Withdrawing;
                    (hold.clone(), e.agent.clone(), e.key.clone(), e.expires_at_ms)
                })
                .collect()
        };
        for (hold, agent, key, expires_at_ms) in due {
            let next = withdraw_one(state, &agent, &hold, key.as_deref(), now, expires_at_ms).await;
            let mut entries = state.unacked.entries();
            match next {
                Some(stage) => {
                    if let Some(entry) = entries.get_mut(&hold) {
                        entry.stage = stage;
                    }
                }
                None => {
                    entries.remove(&hold);
                }
            }
        }
    }
}

/// Voids one unacknowledged hold; the stage it is in afterwards (`None`: forget it).
async fn withdraw_one(
    state: &Core,
    agent: &AgentId,
    hold: &HoldId,
    key: Option<&str>,
    now: u64,
    expires_at_ms: u64,
) -> Option<Stage> {
    let forget = || async {
        match key {
            Some(key) => state.ledger.forget_unacknowledged(agent, key).await,
            None => Ok(true),
        }
    };
    match forget().await {
        Ok(true) => {}
        // A retry (through any instance) got the hold: it is the agent's now.
        Ok(false) => return None,
        Err(_) => return Some(Stage::Waiting),
    }
    let voided = state.ledger.void(state.clock.now_ms(), agent, &Caller::Admin, hold, WITHDRAW_REASON).await;
    match voided {
        Ok((released, replayed)) => {
            // The hold may have been made (with its record) between the first forget and the void.
            if forget().await.is_err() {
                tracing::warn!(%hold, "could not forget a withdrawn hold's idempotency key");
            }
            if !replayed {
                tracing::info!(%agent, %hold, released = released.get(), "voided a hold whose grant never reached the agent");
            }
            Some(Stage::Withdrawn)
        }
        // Never made (yet): a call still queued in Redis may make it, so look again until it
        // would have expired anyway.
        Err(LedgerError::UnknownHold) if now <= expires_at_ms => Some(Stage::Waiting),
        Err(LedgerError::UnknownHold) => None,
        Err(LedgerError::Unavailable(_) | LedgerError::OutcomeUnknown { .. }) => Some(Stage::Waiting),
        // Settled or expired: it ended another way; nothing is held.
        Err(err) => {
            tracing::info!(%hold, error = %err, "an unacknowledged hold ended another way");
            Some(Stage::Withdrawn)
        }
    }
}

/// The withdrawal task: a pass every [`WITHDRAW_INTERVAL`].
pub async fn run(state: std::sync::Arc<Core>) {
    let mut ticker = tokio::time::interval(WITHDRAW_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        Unacked::withdraw(&state).await;
    }
}
