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
        LedgerConfig::Redis(redis) => {
            let ledger = Ledger::Redis(RedisLedger::connect(&redis).await?);
            // No agent may make the daemon connect to Redis, whatever the allow-list says.
            for address in crate::ledger::nodes::addresses(&redis).await {
                protocols.reserved.add(address);
            }
            refuse_reserved_providers(&protocols).await?;
            ledger
        }
    };
    Ok(Arc::new(AppState {
        ledger,
        protocols,
        admin: config.admin_token,
        signer: config.signer,
        clock: config.clock,
        limits: config.limits,
        alerts: config.alerts,
        metrics: crate::metrics::Metrics::new()?,
    }))
}

/// Start-up fails when a configured provider (ACP, AP2) is a reserved address: the daemon would
/// send requests, credentials and mandates to its own Redis or to itself.
async fn refuse_reserved_providers(protocols: &Protocols) -> Result<(), ConfigError> {
    match crate::protocols::reserved::first_reserved_url(&protocols.provider_urls, &protocols.reserved).await {
        None => Ok(()),
        Some((url, address)) => Err(ConfigError {
            protocol: "providers",
            reason: format!("{url} resolves to {address}, a Redis node of the ledger or this daemon's listen address"),
        }),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    state: SharedState,
    listener: TcpListener,
    sweep_interval: Option<Duration>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Nor to the daemon itself.
    state.protocols.reserved.add(listener.local_addr()?);
    refuse_reserved_providers(&state.protocols).await.map_err(std::io::Error::other)?;
    tracing::info!(addresses = ?state.protocols.reserved.addresses(), "never fetched for an agent");
    let sweeper = sweep_interval.map(|interval| tokio::spawn(sweep(state.clone(), interval)));
    let alerts = state.alerts.clone().map(|config| crate::alerts::spawn(state.clone(), config));
    // Request spans name the method and the path only: a query string may carry a credential
    // (the dashboard's event stream accepts the admin token there), and must never be logged.
    let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
        tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
    });
    let app = api::router(state).layer(trace);
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    for task in [sweeper, alerts].into_iter().flatten() {
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
