//! Keyed APIs: an agent calls an LLM or SaaS API through the daemon with its spendcap token as
//! the API key; the daemon holds a bound the call cannot exceed, forwards it with the owner's
//! credential, and settles what the call cost (from the answer's `usage`, a fixed price, or a
//! cost header).
//!
//! `ANY /v1/apis/{name}/{*path}`: the agent's SDK points its base URL at
//! `http://<daemon>/v1/apis/<name>/...`. The agent token is accepted as `Authorization: Bearer`
//! and as `x-api-key`, and never forwarded. The answer comes back verbatim, plus `X-Spendcap-*`
//! headers. The modules: [`config`] (the file), [`flow`] (hold → forward → settle or void, over the
//! narrow core; it knows no HTTP face) and `routes` (the axum face: reads the request, answers).
//!
//! Architecture invariant: nothing is sent upstream before a granted hold of the call's bound,
//! and outbound requests follow x402's rules (checked destinations, no redirects, no proxies).

mod config;
pub(crate) mod flow;
mod routes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use axum::routing::any;
use axum::Router;
use clap::Args;

pub use self::config::{ApisFile, Credential, KeyedApi};
use super::x402::destination::{CheckedResolver, Destinations};
use super::ConfigError;
use crate::api::SharedState;

const DEFAULT_TIMEOUT_SECS: u64 = 600;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// `serve` flags of the keyed-APIs endpoint.
#[derive(Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// Keyed-APIs configuration file (JSON: each API's name, base URL, the owner's credential and
    /// its pricing). Without it `/v1/apis/...` answers `api_not_configured`.
    #[arg(long = "apis-config", env = "SPENDCAP_APIS_CONFIG", value_name = "PATH")]
    pub apis_config: Option<PathBuf>,
    /// Longest upstream call, streaming included, in seconds [default: 600]. The hold lasts a
    /// minute longer.
    #[arg(long = "apis-timeout-secs", env = "SPENDCAP_APIS_TIMEOUT_SECS", value_name = "SECS")]
    pub apis_timeout_secs: Option<u64>,
    /// Largest request body an agent may send, in bytes [default: 8 MiB].
    #[arg(long = "apis-max-request-bytes", env = "SPENDCAP_APIS_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub apis_max_request_bytes: Option<usize>,
    /// Largest non-streaming answer read to settle it, in bytes [default: 16 MiB].
    #[arg(long = "apis-max-response-bytes", env = "SPENDCAP_APIS_MAX_RESPONSE_BYTES", value_name = "BYTES")]
    pub apis_max_response_bytes: Option<usize>,
}

/// The keyed-APIs configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The file's content; `None` leaves the endpoint unconfigured.
    pub file: Option<ApisFile>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    /// Where every request body sent to an LLM API is recorded (tests only).
    pub conformance: ConformanceSink,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            file: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            conformance: ConformanceSink::disabled(),
        }
    }
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "api", reason: reason.into() }
}

impl ApiConfig {
    pub fn from_args(args: &ApiArgs) -> Result<ApiConfig, ConfigError> {
        let file = match &args.apis_config {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| config_error(format!("reading {}: {}", path.display(), error.kind())))?;
                Some(
                    ApisFile::parse(&text, &|name| std::env::var(name).ok())
                        .map_err(|reason| config_error(format!("{}: {reason}", path.display())))?,
                )
            }
        };
        let defaults = ApiConfig::default();
        let config = ApiConfig {
            file,
            timeout: args.apis_timeout_secs.map(Duration::from_secs).unwrap_or(defaults.timeout),
            max_request_bytes: args.apis_max_request_bytes.unwrap_or(defaults.max_request_bytes),
            max_response_bytes: args.apis_max_response_bytes.unwrap_or(defaults.max_response_bytes),
            ..defaults
        };
        if config.timeout.is_zero() || config.max_request_bytes == 0 || config.max_response_bytes == 0 {
            return Err(config_error("the APIs timeout and size limits must be greater than zero"));
        }
        Ok(config)
    }

    /// A configuration from the file's text (credentials from the process environment), with
    /// the default limits.
    pub fn from_json(text: &str) -> Result<ApiConfig, ConfigError> {
        let file = ApisFile::parse(text, &|name| std::env::var(name).ok()).map_err(config_error)?;
        Ok(ApiConfig { file: Some(file), ..ApiConfig::default() })
    }
}

/// What the endpoint needs at run time; `None` inside when no file is configured.
pub struct ApiService {
    inner: Option<Arc<Engine>>,
}

pub(crate) struct Engine {
    apis: BTreeMap<String, KeyedApi>,
    /// One client per API: its resolver knows the API's port, so that a name that resolves to a
    /// Redis node or this daemon (on that port) is refused when it connects, not only at start.
    clients: BTreeMap<String, reqwest::Client>,
    destinations: Destinations,
    timeout: Duration,
    max_request_bytes: usize,
    max_response_bytes: usize,
    conformance: ConformanceSink,
}

impl ApiService {
    /// `reserved`: the Redis nodes and the daemon itself, which no upstream may resolve to.
    pub fn build(config: ApiConfig, reserved: super::reserved::Reserved) -> Result<ApiService, ConfigError> {
        let Some(file) = config.file else {
            tracing::info!(
                "keyed APIs not configured (no SPENDCAP_APIS_CONFIG); /v1/apis answers 503 api_not_configured"
            );
            return Ok(ApiService { inner: None });
        };
        let destinations = Destinations::new(file.allow_private).with_reserved(reserved);
        // The same rules as x402's client: checked resolution (private ranges, and the reserved
        // addresses on the API's port, at every connection), no proxies from the environment, no
        // redirects (a redirect would carry the owner's credential to an unchecked host).
        let mut clients = BTreeMap::new();
        for api in &file.apis {
            let resolver =
                CheckedResolver { destinations: destinations.clone(), port: api.base_url.port_or_known_default() };
            let client = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .dns_resolver(Arc::new(resolver))
                .connect_timeout(config.connect_timeout)
                .pool_max_idle_per_host(256)
                .user_agent(concat!("spendcap/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|err| config_error(format!("cannot build the HTTP client: {err}")))?;
            clients.insert(api.name.clone(), client);
        }
        let names: Vec<&str> = file.apis.iter().map(|api| api.name.as_str()).collect();
        tracing::info!(apis = ?names, "keyed APIs enabled");
        let apis = file.apis.into_iter().map(|api| (api.name.clone(), api)).collect();
        Ok(ApiService {
            inner: Some(Arc::new(Engine {
                apis,
                clients,
                destinations,
                timeout: config.timeout,
                max_request_bytes: config.max_request_bytes,
                max_response_bytes: config.max_response_bytes,
                conformance: config.conformance,
            })),
        })
    }

    fn engine(&self) -> Option<&Arc<Engine>> {
        self.inner.as_ref()
    }
}

pub fn router() -> Router<SharedState> {
    Router::new().route("/v1/apis/{name}/{*path}", any(routes::call))
}
