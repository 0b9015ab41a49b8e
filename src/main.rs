//! The `spendcap` binary: parse the command line, then serve or run a client command.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spendcap::api::Limits;
use spendcap::cli::{Cli, Command, LogFormat, ServeArgs};
use spendcap::clock::Clock;
use spendcap::identity::AdminToken;
use spendcap::ledger::RedisConfig;
use spendcap::protocols::ProtocolConfig;
use spendcap::receipt::ReceiptSigner;
use spendcap::server::{self, Config, LedgerConfig};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Demo { listen, providers_only, mcp } => demo(listen, providers_only, mcp).await,
            Command::Mcp(args) => mcp(args).await,
            other => spendcap::cli::run_client(other).await.map_err(anyhow::Error::from),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPENDCAP_LOG").unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let admin_token = match (&args.admin_token, args.dev) {
        (Some(token), _) => AdminToken::new(token.clone()).context("SPENDCAP_ADMIN_TOKEN")?,
        (None, true) => AdminToken::generate(),
        (None, false) => anyhow::bail!("set SPENDCAP_ADMIN_TOKEN (at least 32 characters), or run with --dev"),
    };
    let signer = if args.dev && std::env::var_os("SPENDCAP_RECEIPT_KEY").is_none() {
        ReceiptSigner::generate()
    } else {
        ReceiptSigner::load_or_create(&args.receipt_key)?
    };
    let ledger = if args.dev {
        LedgerConfig::Memory
    } else {
        LedgerConfig::Redis(RedisConfig {
            url: args.redis_url.clone(),
            cluster: args.redis_cluster,
            namespace: args.redis_namespace.clone(),
            timeout: Duration::from_millis(args.redis_timeout_ms),
            clock: spendcap::ledger::LedgerClock::Redis,
        })
    };
    let alerts = match (&args.webhook_url, &args.webhook_secret) {
        (None, None) => None,
        (Some(url), Some(secret)) => {
            let secret = spendcap::alerts::WebhookSecret::new(secret.clone())?;
            let mut config = spendcap::alerts::AlertConfig::new(url, secret)?;
            config.claim_idle = Duration::from_secs(args.webhook_claim_idle_secs);
            Some(config)
        }
        _ => anyhow::bail!("set both SPENDCAP_WEBHOOK_URL and SPENDCAP_WEBHOOK_SECRET, or neither"),
    };
    let config = Config {
        alerts,
        ledger,
        admin_token: admin_token.clone(),
        signer,
        limits: Limits {
            body_bytes: args.body_limit,
            default_hold_ttl: Duration::from_secs(args.hold_ttl_secs),
            max_hold_ttl: Duration::from_secs(args.max_hold_ttl_secs),
        },
        clock: Clock::system(),
        protocols: ProtocolConfig::from_args(&args.protocols)?,
        sweep_interval: (args.sweep_interval_secs > 0).then(|| Duration::from_secs(args.sweep_interval_secs)),
        max_clock_skew: Duration::from_millis(args.max_clock_skew_ms),
    };
    let sweep_interval = config.sweep_interval;
    let state = server::build_state(config).await.context("connecting to the ledger")?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    if args.dev {
        let code = state.login_codes.issue(state.clock.now_ms());
        eprintln!(
            "\n  WARNING: spendcap is running in --dev mode with an in-process ledger.\n  \
             NOTHING IS DURABLE: every agent, cap, hold and log entry is lost when it stops.\n  \
             Never use --dev for real money.\n\n  \
             Listening on http://{address}\n  \
             Dashboard (this link logs in once, for 10 minutes): http://{address}/dashboard#login={code}\n\n  \
             In another shell:\n"
        );
        // On stdout, alone on their lines, so that `eval "$(… | grep ^export)"` works too.
        let exports =
            format!("export SPENDCAP_URL=http://{address}\nexport SPENDCAP_ADMIN_TOKEN={}\n", admin_token.reveal());
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), exports.as_bytes());
        eprintln!("\n  Then: spendcap agent create --handle research --cap 5.00\n");
    }
    if args.dev {
        tracing::info!(%address, ledger = "memory (nothing is durable)", "spendcap listening");
    } else {
        tracing::info!(%address, ledger = "redis", redis = %spendcap::doctor::without_credentials(&args.redis_url),
            cluster = args.redis_cluster, namespace = %args.redis_namespace,
            receipt_key = %args.receipt_key.display(), "spendcap listening");
    }
    server::serve(state, listener, sweep_interval, shutdown_signal()).await?;
    tracing::info!("spendcap stopped");
    Ok(())
}

async fn mcp(args: spendcap::mcp::stdio::McpArgs) -> anyhow::Result<()> {
    // stdout carries the protocol: logs go to stderr, where MCP hosts collect them.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPENDCAP_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).init();
    spendcap::mcp::stdio::run(args).await?;
    Ok(())
}

async fn demo(
    listen: std::net::SocketAddr,
    providers_only: bool,
    mcp: spendcap::protocols::mcp_upstream::McpUpstreamArgs,
) -> anyhow::Result<()> {
    // The scenario's own lines say what happened; the daemon's warnings (the revocation) would
    // only repeat them in between.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPENDCAP_LOG").unwrap_or_else(|_| "error".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let providers = spendcap::sim::Providers::start().await.context("starting the simulated providers")?;
    let admin_token = AdminToken::generate();
    let mut protocols = providers.protocol_config()?;
    protocols.mcp = spendcap::protocols::mcp_upstream::McpUpstreamConfig::from_args(&mcp)?;
    let config = Config {
        alerts: None,
        ledger: LedgerConfig::Memory,
        admin_token: admin_token.clone(),
        signer: ReceiptSigner::generate(),
        limits: Limits::default(),
        clock: Clock::system(),
        protocols,
        sweep_interval: Some(Duration::from_secs(30)),
        max_clock_skew: Duration::from_secs(2),
    };
    let sweep_interval = config.sweep_interval;
    let state = server::build_state(config).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    let served = state.clone();
    let server = tokio::spawn(server::serve(served, listener, sweep_interval, shutdown_signal()));
    let base = format!("http://{address}");
    if providers_only {
        eprintln!(
            "spendcap demo --providers-only: in-process ledger (nothing is durable), simulated providers, no scenario.\n\
             Never use it for real money. Ctrl-C stops everything.\n"
        );
        // Written once; a reader that stops reading (`| head`) must not stop the daemon, so a
        // closed stdout is ignored rather than a panic of `println!`.
        let text = format!("{}# Dashboard: {base}/dashboard\n", providers_env(&base, admin_token.reveal(), &providers));
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
        server.await??;
        return Ok(());
    }
    eprintln!(
        "spendcap demo: in-process ledger (nothing is durable), listening on {base}\n\
         simulated providers: x402 resource {}, ACP merchant '{}', AP2 merchant '{}' with a Credential Provider\n",
        providers.x402.base(),
        spendcap::sim::ACP_MERCHANT,
        spendcap::sim::AP2_MERCHANT,
    );
    let outcome = spendcap::demo::scenario(&base, admin_token.reveal(), &providers).await?;
    for line in &outcome.lines {
        println!("  {line}");
    }
    let (x402, acp, ap2) = outcome.payments;
    println!(
        "  providers were paid: x402 {}, ACP {}, AP2 {} ({x402} x402, {acp} ACP and {ap2} AP2 payments)",
        spendcap::human::usd(providers.x402.received_micros()),
        spendcap::human::usd(providers.acp.charged_cents() * 10_000),
        spendcap::human::usd(providers.ap2.paid_cents().max(0) as u64 * 10_000),
    );
    println!();
    let report = spendcap::report::report(&state.ledger, spendcap::log::LogFilter::default()).await?;
    print!("{}", spendcap::report::table(&report));
    println!(
        "\nDashboard: {base}/dashboard  (admin token: {})\nMetrics:   {base}/metrics\nPress Ctrl-C to stop.",
        admin_token.reveal()
    );
    server.await??;
    Ok(())
}

/// The `export` lines `spendcap demo --providers-only` prints: the daemon, its admin token, and
/// how an agent reaches each simulated provider.
fn providers_env(base: &str, admin_token: &str, providers: &spendcap::sim::Providers) -> String {
    use spendcap::sim::{usd, ACP_CATALOG, ACP_MERCHANT, AP2_CATALOG, AP2_MERCHANT, X402_PRICES};
    let x402_paths: Vec<String> =
        X402_PRICES.iter().map(|(path, micros)| format!("{path} ${}", usd(*micros))).collect();
    let acp_items: Vec<String> =
        ACP_CATALOG.iter().map(|(id, _, cents)| format!("{id} ${}", usd(*cents * 10_000))).collect();
    let ap2_items: Vec<String> =
        AP2_CATALOG.iter().map(|(sku, _, cents)| format!("{sku} ${}", usd(*cents as u64 * 10_000))).collect();
    format!(
        "export SPENDCAP_URL={base}\n\
         export SPENDCAP_ADMIN_TOKEN={admin_token}\n\
         # OpenAI- and Anthropic-style APIs (simulated; models sim-gpt, sim-claude): the SDK's base URL, the agent token as API key\n\
         export SPENDCAP_SIM_OPENAI_BASE_URL={base}/v1/apis/openai/v1\n\
         export SPENDCAP_SIM_ANTHROPIC_BASE_URL={base}/v1/apis/anthropic\n\
         # x402 resources (GET, paid per call): {}\n\
         export SPENDCAP_SIM_X402_URL={}\n\
         # ACP merchant for /v1/acp/checkouts (\"merchant\"), items: {}\n\
         export SPENDCAP_SIM_ACP_MERCHANT={ACP_MERCHANT}\n\
         # AP2 merchant: POST /checkouts {{\"items\": [sku]}} answers a signed checkout_jwt; items: {}\n\
         export SPENDCAP_SIM_AP2_MERCHANT={AP2_MERCHANT}\n\
         export SPENDCAP_SIM_AP2_MERCHANT_URL={}\n\
         # AP2 user: POST /mandates {{\"jwk\": <GET /v1/ap2/key .jwk>, \"items\": [sku], \"budget_cents\": 500, \"max_payment_cents\": 100}}\n\
         export SPENDCAP_SIM_AP2_USER_URL={}\n",
        x402_paths.join(", "),
        providers.x402.base(),
        acp_items.join(", "),
        ap2_items.join(", "),
        providers.ap2.merchant_base(),
        providers.ap2.user_base(),
    )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
