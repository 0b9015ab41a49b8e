//! The ledger side of AP2 shared by its flows: the caller's token checked, an open mandate's
//! budget bucket, a merchant-signed object claimed for one payment, and AP2 failures as
//! [`Failure`]s. Nothing here knows HTTP.

use adapters::ap2::types::Frequency;
use adapters::ap2::{Ap2Error, MandateConstraints};
use adapters::Micros;
use serde_json::{json, Value};

use crate::app::Core;
use crate::identity::{AgentAuth, AgentId};
use crate::outcome::{Failure, Kind};

/// Checks the agent's token (and that it is not unknown) before anything is done for it.
pub(crate) async fn authenticate(core: &Core, auth: &AgentAuth) -> Result<(), Failure> {
    core.ledger.balance(core.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(Failure::agent_scoped)?;
    Ok(())
}

/// Unix seconds, as AP2 counts time.
pub(crate) fn unix_secs(now_ms: u64) -> i64 {
    i64::try_from(now_ms / 1000).unwrap_or(i64::MAX)
}

/// An AP2 message from the agent (a mandate, a checkout, a cart) was refused: malformed when it
/// is not even well-formed, refused when it passes a budget, invalid for everything else it fails.
pub(crate) fn input_error(err: Ap2Error) -> Failure {
    let kind = match &err {
        Ap2Error::MalformedJwt(_) | Ap2Error::MalformedSdJwt(_) => Kind::Malformed,
        Ap2Error::BudgetExceeded { .. } => Kind::Refused,
        Ap2Error::InvalidKey(_) | Ap2Error::SigningFailed | Ap2Error::InvalidConfig(_) => {
            return Failure::internal(err)
        }
        _ => Kind::Invalid,
    };
    tracing::info!(code = err.code(), detail = %err, "AP2 request refused");
    Failure::new(kind, err.code(), err.to_string())
}

/// Open mandate constraints the daemon cannot enforce are refused rather than ignored:
/// `payment.agent_recurrence` with a frequency or a `max_occurrences` needs the history of
/// earlier presentations, which the daemon does not keep (an `ON_DEMAND` recurrence with a
/// budget is enforced by the budget bucket).
pub(crate) fn check_enforceable(constraints: &MandateConstraints) -> Result<(), Failure> {
    match constraints.recurrence {
        Some(r) if r.frequency != Frequency::OnDemand || r.max_occurrences.is_some() => Err(Failure::new(
            Kind::Invalid,
            "ap2_unsupported_constraint",
            "payment.agent_recurrence with a frequency other than ON_DEMAND or a max_occurrences is not supported",
        )),
        _ => Ok(()),
    }
}

/// The budget bucket of an open Payment Mandate: derived from its id, so every instance and
/// every payment under it use the same one.
pub(crate) fn bucket_id(constraints: &MandateConstraints) -> String {
    format!("ap2:pm:{}", constraints.payment_mandate_id)
}

/// Creates the open mandate's budget bucket (idempotent: its terms come from the signed mandate).
/// Exclusive, so that no two closed mandates of one open mandate are outstanding at once.
///
/// `by` names who registers it on the `budget` log entry (`agent:<id>`, an admin's name; "" when
/// a payment registers it on the way).
pub(crate) async fn ensure_bucket(
    core: &Core,
    agent: &AgentId,
    constraints: &MandateConstraints,
    by: &str,
) -> Result<(String, bool), Failure> {
    let id = bucket_id(constraints);
    let cap = constraints.budget.as_ref().map(|b| b.max).unwrap_or(Micros::MAX);
    let label = format!("ap2 open payment mandate; checkout mandate {}", constraints.checkout_mandate_id);
    let created = core.ledger.create_bucket(core.clock.now_ms(), agent, &id, cap, true, &label, by).await.map_err(
        |e| match e {
            crate::ledger::LedgerError::BucketExists => {
                Failure::new(Kind::Conflict, "ap2_mandate_taken", "this open mandate's budget belongs to another agent")
            }
            other => Failure::agent_scoped(other),
        },
    )?;
    Ok((id, created))
}

/// Who paid a signed object first: the idempotency key and request fingerprint that every later
/// request for the same object is answered with.
pub(crate) struct Claim {
    /// The budget bucket that lets the object be paid once: capped at its total, exclusive.
    pub bucket: String,
    pub key: String,
    pub fingerprint: String,
}

/// Claims a merchant-signed object (a v0.2 checkout, a v0.1 cart) for one payment.
///
/// The object gets a budget bucket of its own, keyed on its signed content and capped at its
/// total: every hold that pays it charges the bucket too, so however many idempotency keys,
/// requests and instances try, the ledger lets it be held (and paid) once at a time and settled
/// at most once. The first request's idempotency key and fingerprint are the bucket's label;
/// later requests with other keys are answered as that first one (replayed, or resumed).
pub(crate) async fn claim_payment(
    core: &Core,
    agent: &AgentId,
    bucket: String,
    total: Micros,
    key: &str,
    fingerprint: &str,
) -> Result<Claim, Failure> {
    let label = json!({ "first_key": key, "fingerprint": fingerprint }).to_string();
    let taken =
        || Failure::new(Kind::Conflict, "ap2_checkout_taken", "another agent is paying this merchant-signed checkout");
    let created =
        core.ledger.create_bucket(core.clock.now_ms(), agent, &bucket, total, true, &label, "").await.map_err(|e| {
            match e {
                crate::ledger::LedgerError::BucketExists => taken(),
                other => Failure::agent_scoped(other),
            }
        })?;
    if created {
        return Ok(Claim { bucket, key: key.to_owned(), fingerprint: fingerprint.to_owned() });
    }
    let stored = core
        .ledger
        .bucket(agent.tree(), &bucket)
        .await?
        .ok_or_else(|| Failure::internal("a payment's budget bucket vanished after it was created"))?;
    if stored.agent != *agent {
        return Err(taken());
    }
    let first: Value = serde_json::from_str(&stored.label).map_err(Failure::internal)?;
    match (first["first_key"].as_str(), first["fingerprint"].as_str()) {
        (Some(first_key), Some(first_fingerprint)) => {
            Ok(Claim { bucket, key: first_key.to_owned(), fingerprint: first_fingerprint.to_owned() })
        }
        _ => Err(Failure::internal("a payment's budget bucket has no first request")),
    }
}

impl Claim {
    /// The idempotency the hold is made with: this request's own key and fingerprint when it was
    /// the first (so that the same key with another request is `idempotency_conflict`), else
    /// the first request's (so that it is replayed or resumed, never paid again).
    pub fn idempotency(&self, own_key: &str, own_fingerprint: &str) -> (String, String) {
        if self.key == own_key {
            (own_key.to_owned(), own_fingerprint.to_owned())
        } else {
            tracing::info!(first_key = %self.key, "a merchant-signed object already claimed: answering as its first request");
            (self.key.clone(), self.fingerprint.clone())
        }
    }
}
