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
    let core = Arc::new(crate::app::Core {
        ledger,
        signer: config.signer,
        clock: config.clock,
        metrics: crate::metrics::Metrics::new()?,
        clock_guard: crate::clock::ClockGuard::new(config.max_clock_skew.as_millis() as u64),
        unacked: Default::default(),
        limits: config.limits,
    });
    let state = Arc::new(AppState {
        core,
        protocols,
        admin: config.admin_token,
        alerts: config.alerts,
        login_codes: Default::default(),
    });
    measure_clock(&state).await;
    Ok(state)
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
    let clock_watch = Some(tokio::spawn(watch_clock(state.clone())));
    let withdraw = Some(tokio::spawn(crate::unacked::run(state.core.clone())));
    let alerts = state.alerts.clone().map(|config| crate::alerts::spawn(state.core.clone(), config));
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
    let app = api::router(state).layer(axum::middleware::from_fn(header_limits)).layer(trace);
    serve_connections(listener, app, shutdown).await;
    for task in [sweeper, alerts, clock_watch, withdraw].into_iter().flatten() {
        task.abort();
    }
    Ok(())
}

/// The most request headers, and header bytes (names and values), the API reads; more is 431
/// `headers_too_large` with a `{code, detail}` body like every error. The HTTP parser's own
/// limits are set far above these (`PARSER_MAX_*`), so that it is this check that answers:
/// the parser's automatic 431 has no body. Only a request past the parser's limits gets that.
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 32 * 1024;
const PARSER_MAX_HEADERS: usize = 1000;
const PARSER_MAX_BUF_BYTES: usize = 1024 * 1024;

async fn header_limits(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let headers = request.headers();
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return api::ApiError::new(
            axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("requests are limited to {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes of them"),
        )
        .into_response();
    }
    next.run(request).await
}

/// What `axum::serve` does (HTTP/1.1 and HTTP/2 on every accepted connection, graceful shutdown
/// that lets requests in flight finish), with the parser limits above.
async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().max_headers(PARSER_MAX_HEADERS).max_buf_size(PARSER_MAX_BUF_BYTES);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(stop);
        });
    }
    drop(stop_rx);
    let _ = stop_tx.send(());
    // Every connection holds a receiver until it has finished.
    stop_tx.closed().await;
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
