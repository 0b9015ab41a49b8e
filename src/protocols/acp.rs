//! The ACP endpoint: an agent asks the daemon to pay a merchant's checkout session (Stripe's
//! Agentic Commerce Protocol, API-Version 2026-04-17), and the daemon does it with the owner's
//! card, which the agent never sees.
//!
//! `POST /v1/acp/checkouts` reads (or creates) the session, holds its total, asks the PSP for a
//! delegated token whose allowance is exactly the held total, completes the session with it, and
//! settles on the order — or voids on any decline, error or timeout. `POST
//! /v1/acp/checkouts/{id}/cancel` cancels a session at the merchant and voids its hold. The flow
//! itself is in [`checkout`]; this file holds the configuration, the service and the routes.

mod checkout;
mod config;
mod reply;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use adapters::acp::{Address, CardDetails, CurrencyPolicy, MerchantClient, ProviderConfig, PspClient, RetryPolicy};
use adapters::conformance::ConformanceSink;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use clap::Args;

pub use self::checkout::{CancelRequest, CheckoutRequest, ItemRequest};
pub use self::config::{AcpFile, ProviderEntry};
use super::ConfigError;
use crate::api::{AgentAuth, ApiError, ApiJson, SharedState};

/// Per-attempt timeout of a merchant or PSP request, unless configured.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of an ACP hold, and so of the delegated token's allowance, unless configured.
const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(900);
/// How long a purchase in progress keeps a duplicate out (409) before the duplicate may take it
/// over, unless configured.
const DEFAULT_LEASE: Duration = Duration::from_secs(120);

#[derive(Args, Debug, Clone, Default)]
pub struct AcpArgs {
    /// ACP configuration file (JSON: the PSP, the merchants, the owner's card and billing
    /// address). Without it the ACP endpoints answer `acp_not_configured`.
    #[arg(long = "acp-config", env = "SPENDCAP_ACP_CONFIG", value_name = "PATH")]
    pub acp_config: Option<PathBuf>,
    /// Timeout of one merchant or PSP request, in milliseconds [default: 10000].
    #[arg(long = "acp-timeout-ms", env = "SPENDCAP_ACP_TIMEOUT_MS", value_name = "MS")]
    pub acp_timeout_ms: Option<u64>,
    /// Lifetime of an ACP hold and of the delegated token's allowance, in seconds [default: 900].
    #[arg(long = "acp-hold-ttl-secs", env = "SPENDCAP_ACP_HOLD_TTL_SECS", value_name = "SECS")]
    pub acp_hold_ttl_secs: Option<u64>,
    /// How long a purchase in progress answers duplicates with 409 before a duplicate may take
    /// it over (the first caller died), in seconds [default: 120].
    #[arg(long = "acp-lease-secs", env = "SPENDCAP_ACP_LEASE_SECS", value_name = "SECS")]
    pub acp_lease_secs: Option<u64>,
    /// How many times the daemon reads back a purchase whose outcome is unknown (2 s doubling
    /// to 60 s between reads; 0: never) [default: 8].
    #[arg(long = "acp-resolve-attempts", env = "SPENDCAP_ACP_RESOLVE_ATTEMPTS", value_name = "N")]
    pub acp_resolve_attempts: Option<u32>,
}

/// The ACP configuration: the file's content (none: ACP is off) and the timings.
#[derive(Debug)]
pub struct AcpConfig {
    pub file: Option<AcpFile>,
    /// One attempt of one provider request, connection to last byte.
    pub timeout: Duration,
    /// Lifetime of a hold; the delegated token's allowance expires with it.
    pub hold_ttl: Duration,
    /// The in-flight lease of an idempotent purchase.
    pub lease: Duration,
    /// Retries of a request the provider reports in flight (409 `idempotency_in_flight`).
    pub retry: RetryPolicy,
    /// How the daemon itself reads back a purchase whose outcome is unknown.
    pub resolve: ResolvePolicy,
    /// Where request bodies are recorded for conformance checking (tests); disabled by default.
    pub conformance: ConformanceSink,
    /// Addresses no provider client may connect to (Redis, the daemon); set by `Protocols::build`.
    pub reserved: super::reserved::Reserved,
}

/// The read-backs of a purchase whose outcome is unknown: up to `attempts`, the first after
/// `first_wait`, each wait doubling up to `max_wait`. The hold stays counted (state `unknown`)
/// however long it takes; the read-backs only end the doubt sooner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvePolicy {
    pub attempts: u32,
    pub first_wait: Duration,
    pub max_wait: Duration,
}

impl ResolvePolicy {
    /// No read-backs: an unknown outcome waits for a retry, a cancel or an admin.
    pub fn disabled() -> ResolvePolicy {
        ResolvePolicy { attempts: 0, first_wait: Duration::ZERO, max_wait: Duration::ZERO }
    }
}

impl Default for ResolvePolicy {
    /// About four minutes of read-backs (2 s, 4 s, … 60 s), well within the default hold TTL.
    fn default() -> ResolvePolicy {
        ResolvePolicy { attempts: 8, first_wait: Duration::from_secs(2), max_wait: Duration::from_secs(60) }
    }
}

impl Default for AcpConfig {
    fn default() -> AcpConfig {
        AcpConfig {
            file: None,
            timeout: DEFAULT_TIMEOUT,
            hold_ttl: DEFAULT_HOLD_TTL,
            lease: DEFAULT_LEASE,
            retry: RetryPolicy::default(),
            resolve: ResolvePolicy::default(),
            conformance: ConformanceSink::disabled(),
            reserved: Default::default(),
        }
    }
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "acp", reason: reason.into() }
}

impl AcpConfig {
    pub fn from_args(args: &AcpArgs) -> Result<AcpConfig, ConfigError> {
        let file = match &args.acp_config {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| config_error(format!("reading {}: {error}", path.display())))?;
                Some(AcpFile::parse(&text).map_err(|reason| config_error(format!("{}: {reason}", path.display())))?)
            }
        };
        let defaults = AcpConfig::default();
        Ok(AcpConfig {
            file,
            timeout: args.acp_timeout_ms.map(Duration::from_millis).unwrap_or(defaults.timeout),
            hold_ttl: args.acp_hold_ttl_secs.map(Duration::from_secs).unwrap_or(defaults.hold_ttl),
            lease: args.acp_lease_secs.map(Duration::from_secs).unwrap_or(defaults.lease),
            resolve: ResolvePolicy {
                attempts: args.acp_resolve_attempts.unwrap_or(defaults.resolve.attempts),
                ..defaults.resolve
            },
            ..defaults
        })
    }

    /// A configuration from the file's text, with the default timings.
    pub fn from_json(text: &str) -> Result<AcpConfig, ConfigError> {
        let file = AcpFile::parse(text).map_err(config_error)?;
        Ok(AcpConfig { file: Some(file), ..AcpConfig::default() })
    }
}

/// What the ACP endpoints need at run time; `None` when ACP is not configured.
#[derive(Debug, Default)]
pub struct AcpService {
    configured: Option<std::sync::Arc<Acp>>,
}

/// A configured ACP: provider clients, the owner's payment method, and the timings.
#[derive(Debug)]
pub(crate) struct Acp {
    psp: PspClient,
    /// Matched against a payment handler's `psp`.
    psp_name: String,
    merchants: BTreeMap<String, MerchantClient>,
    card: CardDetails,
    billing_address: Option<Address>,
    currency: CurrencyPolicy,
    hold_ttl_ms: u64,
    lease_ms: u64,
    resolve: ResolvePolicy,
}

impl AcpService {
    pub fn build(config: AcpConfig) -> Result<AcpService, ConfigError> {
        let Some(file) = config.file else { return Ok(AcpService { configured: None }) };
        if config.timeout.is_zero() {
            return Err(config_error("the request timeout must be positive"));
        }
        if config.lease.is_zero() || config.lease >= config.hold_ttl {
            return Err(config_error(format!(
                "the in-flight lease ({} s) must be positive and shorter than the hold lifetime ({} s)",
                config.lease.as_secs(),
                config.hold_ttl.as_secs()
            )));
        }
        let reserved = config.reserved.clone();
        let provider = |entry: ProviderEntry| ProviderConfig {
            resolver: super::reserved::ReservedResolver::for_url(&reserved, &entry.base_url),
            base_url: entry.base_url,
            api_key: entry.api_key,
            timeout: config.timeout,
            retry: config.retry,
        };
        let psp_name = file.psp.name.clone();
        let psp = PspClient::new(provider(file.psp), config.conformance.clone())
            .map_err(|error| config_error(format!("psp {psp_name}: {error}")))?;
        let mut merchants = BTreeMap::new();
        for entry in file.merchants {
            let name = entry.name.clone();
            let client = MerchantClient::new(provider(entry), config.conformance.clone())
                .map_err(|error| config_error(format!("merchant {name}: {error}")))?;
            merchants.insert(name, client);
        }
        let mut currency = CurrencyPolicy::usd_only();
        for (code, rate) in &file.currency_rates {
            currency = currency.with_rate(code, *rate).map_err(|error| config_error(error.to_string()))?;
        }
        Ok(AcpService {
            configured: Some(std::sync::Arc::new(Acp {
                psp,
                psp_name,
                merchants,
                card: file.card,
                billing_address: file.billing_address,
                currency,
                hold_ttl_ms: duration_ms(config.hold_ttl),
                lease_ms: duration_ms(config.lease),
                resolve: config.resolve,
            })),
        })
    }

    fn configured(&self) -> Result<&std::sync::Arc<Acp>, ApiError> {
        self.configured.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "acp_not_configured",
                "ACP is not configured on this daemon (see SPENDCAP_ACP_CONFIG)",
            )
        })
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/acp/checkouts", post(create_checkout))
        .route("/v1/acp/checkouts/{checkout_session_id}/cancel", post(cancel_checkout))
}

/// Pays a merchant's checkout session for the agent (see the README for the request and answers).
async fn create_checkout(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckoutRequest>,
) -> Result<Response, ApiError> {
    let acp = state.protocols.acp.configured()?;
    let agent_key = crate::api::holds::idempotency_key(&headers)?;
    let reply = checkout::checkout(&state.core, acp, &auth, agent_key, body).await?;
    Ok(crate::api::status::reply(reply))
}

/// Cancels a checkout session at the merchant, and voids the hold of a purchase left open.
async fn cancel_checkout(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(checkout_session_id): Path<String>,
    ApiJson(body): ApiJson<CancelRequest>,
) -> Result<Response, ApiError> {
    let acp = state.protocols.acp.configured()?;
    let reply = checkout::cancel(&state.core, acp, &auth, &checkout_session_id, body).await?;
    Ok(crate::api::status::reply(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
        "psp": { "name": "stripe", "base_url": "http://127.0.0.1:9/psp", "api_key": "sk_psp" },
        "merchants": [{ "name": "acme", "base_url": "http://127.0.0.1:9/acp", "api_key": "sk_acme" }],
        "card": { "number": "4242424242424242", "exp_month": "11", "exp_year": "2030", "funding": "credit" },
        "currency_rates": { "eur": 10800 }
    }"#;

    #[test]
    fn the_file_and_flags_make_a_service_and_bad_timings_are_refused() {
        let path = std::env::temp_dir().join(format!("spendcap-acp-{:016x}.json", rand::random::<u64>()));
        std::fs::write(&path, FILE).expect("temp file");
        let args = AcpArgs {
            acp_config: Some(path.clone()),
            acp_timeout_ms: Some(2500),
            acp_resolve_attempts: Some(3),
            ..AcpArgs::default()
        };
        let config = AcpConfig::from_args(&args).expect("valid");
        assert_eq!(
            (config.timeout, config.hold_ttl, config.lease),
            (Duration::from_millis(2500), DEFAULT_HOLD_TTL, DEFAULT_LEASE)
        );
        assert_eq!(config.resolve, ResolvePolicy { attempts: 3, ..ResolvePolicy::default() });
        let service = AcpService::build(config).expect("builds");
        let acp = service.configured().expect("configured");
        assert_eq!(acp.merchants.keys().collect::<Vec<_>>(), ["acme"]);
        assert_eq!(acp.currency.to_micros(100, "eur").map(|m| m.get()), Ok(1_080_000));

        let too_long_lease = AcpArgs { acp_lease_secs: Some(900), ..args.clone() };
        let error = AcpService::build(AcpConfig::from_args(&too_long_lease).expect("parses")).expect_err("refused");
        assert!(error.reason.contains("lease"), "{error}");
        std::fs::remove_file(&path).expect("cleanup");

        let error = AcpConfig::from_args(&args).expect_err("the file is gone");
        assert!(error.reason.contains(&path.display().to_string()), "{error}");
        let off = AcpService::build(AcpConfig::from_args(&AcpArgs::default()).expect("no file")).expect("builds");
        assert_eq!(off.configured().map(|_| ()).map_err(|e| e.code), Err("acp_not_configured"));
    }
}
