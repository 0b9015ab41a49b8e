//! The application state, outside every face: the narrow payment core (`Core`: ledger, receipt
//! signer, clocks, metrics, unacknowledged holds) and what the daemon runs beside it (the
//! protocols' services, the admin token, limits, alerts, dashboard codes).
//!
//! Flows take `&Core` and their own protocol service — never `AppState`, which holds every
//! protocol: handing that into the protocols would rebuild the import circle between faces,
//! flows and the core (ARCHITECTURE.md, "Faces translate, the core decides").

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, ClockGuard};
use crate::identity::AdminToken;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::receipt::ReceiptSigner;
use crate::unacked::Unacked;

/// What every payment needs and nothing more: the ledger, the receipt signer, the clock and the
/// guard that compares it with the ledger's, the metrics, and the holds whose grant was lost.
pub struct Core {
    pub ledger: Ledger,
    pub signer: ReceiptSigner,
    pub clock: Clock,
    /// Whether this instance's clock agrees with the ledger's (payments and `/healthz` ask).
    pub clock_guard: ClockGuard,
    /// This instance's Prometheus counters (`/metrics`).
    pub metrics: Metrics,
    /// Holds whose grant never reached the agent (the ledger's answer was lost), to be voided.
    pub unacked: Unacked,
    /// What the daemon accepts: body sizes, hold lifetimes.
    pub limits: Limits,
}

/// Limits and defaults the daemon enforces on what it is sent.
#[derive(Clone, Debug)]
pub struct Limits {
    pub body_bytes: usize,
    pub default_hold_ttl: Duration,
    pub max_hold_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            body_bytes: 64 * 1024,
            default_hold_ttl: Duration::from_secs(300),
            max_hold_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct AppState {
    /// The payment core, shared with the tasks flows spawn (an ACP read-back, a keyed stream).
    pub core: Arc<Core>,
    pub protocols: crate::protocols::Protocols,
    pub admin: AdminToken,
    /// Where alert webhooks go (`None`: no alerts are sent).
    pub alerts: Option<crate::alerts::AlertConfig>,
    /// One-time dashboard login codes (`serve --dev` prints one).
    pub login_codes: crate::api::dashboard::LoginCodes,
}

/// `state.ledger`, `state.clock`, ... keep reading the core's fields: the faces use them
/// everywhere, and the core is the part of the state they share with the flows.
impl Deref for AppState {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

pub type SharedState = Arc<AppState>;
