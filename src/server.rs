//! Starting the daemon: build the ledger and state from a [`Config`], then serve a router on a
//! listener until a shutdown future resolves (tests pass port 0 and their own shutdown).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState, Limits, SharedState};
use crate::clock::Clock;
use crate::identity::AdminToken;
use crate::ledger::{Ledger, LedgerError, MemoryLedger, RedisConfig, RedisLedger};
use crate::protocols::{ConfigError, ProtocolConfig, Protocols};
use crate::receipt::ReceiptSigner;

pub enum LedgerConfig {
    /// In-process, nothing durable: `serve --dev` and tests.
    Memory,
    Redis(RedisConfig),
}

pub struct Config {
    pub ledger: LedgerConfig,
    pub admin_token: AdminToken,
    pub signer: ReceiptSigner,
    pub limits: Limits,
    pub clock: Clock,
    pub protocols: ProtocolConfig,
    /// How often to release expired holds in the background. Optional: expiry also happens
    /// inside every ledger call that touches a tree.
    pub sweep_interval: Option<Duration>,
    /// Alert webhooks (`SPENDCAP_WEBHOOK_URL`, `SPENDCAP_WEBHOOK_SECRET`); `None`: off.
    pub alerts: Option<crate::alerts::AlertConfig>,
    /// The most this instance's clock may be off the ledger's before it stops paying
    /// (`SPENDCAP_MAX_CLOCK_SKEW_MS`).
    pub max_clock_skew: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Protocol(#[from] ConfigError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub async fn build_state(config: Config) -> Result<SharedState, StartError> {
    let protocols = Protocols::build(config.protocols)?;
    let ledger = match config.ledger {
        LedgerConfig::Memory => Ledger::Memory(MemoryLedger::new()),
        LedgerConfig::Redis(redis) => Ledger::Redis(RedisLedger::connect(&redis).await?),
    };
    let state = Arc::new(AppState {
        ledger,
        protocols,
        admin: config.admin_token,
        signer: config.signer,
        clock: config.clock,
        limits: config.limits,
        alerts: config.alerts,
        metrics: crate::metrics::Metrics::new()?,
        login_codes: Default::default(),
        clock_guard: crate::clock::ClockGuard::new(config.max_clock_skew.as_millis() as u64),
        unacked: Default::default(),
    });
    measure_clock(&state).await;
    Ok(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    state: SharedState,
    listener: TcpListener,
    sweep_interval: Option<Duration>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = sweep_interval.map(|interval| tokio::spawn(sweep(state.clone(), interval)));
    let clock_watch = Some(tokio::spawn(watch_clock(state.clone())));
    let withdraw = Some(tokio::spawn(crate::unacked::run(state.clone())));
    let alerts = state.alerts.clone().map(|config| crate::alerts::spawn(state.clone(), config));
    // Request spans name the method and the path only: a query string may carry a credential
    // (the dashboard's event stream accepts the admin token there), and must never be logged.
    // A 5xx answer is not an error of this daemon by itself (503 x402_not_configured is expected
    // when x402 has no key): the causes that are errors log themselves where they happen
    // (`ApiError::internal`, the ledger being unreachable), so the request log stays at debug.
    let trace = tower_http::trace::TraceLayer::new_for_http()
        .make_span_with(|request: &axum::http::Request<_>| {
            tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
        })
        .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG));
    let app = api::router(state).layer(trace);
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    for task in [sweeper, alerts, clock_watch, withdraw].into_iter().flatten() {
        task.abort();
    }
    result
}

async fn sweep(state: SharedState, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let trees = match state.ledger.trees().await {
            Ok(trees) => trees,
            Err(e) => {
                tracing::warn!(error = %e, "hold sweep skipped");
                continue;
            }
        };
        for tree in trees {
            match state.ledger.expire(state.clock.now_ms(), &tree).await {
                Ok(0) => {}
                Ok(released) => tracing::info!(%tree, released, "released expired holds"),
                Err(e) => tracing::warn!(%tree, error = %e, "hold sweep failed"),
            }
        }
    }
}

/// How often the clock's offset from the ledger's is measured again.
const CLOCK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Measures this instance's clock against the ledger's once; logs when it crosses the bound.
async fn measure_clock(state: &AppState) {
    let before = state.clock.now_ms();
    let ledger_ms = match state.ledger.server_time_ms().await {
        Ok(Some(ms)) => ms,
        // The in-process ledger has this process's clock; an unreachable ledger refuses payments
        // on its own and is measured again next time.
        Ok(None) | Err(_) => return,
    };
    let after = state.clock.now_ms();
    let was_ok = state.clock_guard.check().is_ok();
    let offset = state.clock_guard.record(before, ledger_ms, after);
    match (was_ok, state.clock_guard.check().is_ok()) {
        (true, false) => tracing::error!(
            offset_ms = offset,
            max_ms = state.clock_guard.max_ms(),
            "this host's clock is off Redis's clock by more than SPENDCAP_MAX_CLOCK_SKEW_MS: refusing payments \
             (503 clock_skew) and failing /healthz until it agrees again; fix the host's time sync (NTP)"
        ),
        (false, true) => tracing::info!(offset_ms = offset, "this host's clock agrees with Redis's again; paying"),
        _ => {}
    }
}

async fn watch_clock(state: SharedState) {
    let mut ticks = tokio::time::interval(CLOCK_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        measure_clock(&state).await;
    }
}
