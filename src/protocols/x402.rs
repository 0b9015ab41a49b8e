//! The x402 endpoint: an agent asks the daemon to fetch a URL; when the server answers 402, the
//! daemon holds the price on the ledger, signs an EIP-3009 authorization with the master key,
//! retries with the payment header, and settles the hold (with a signed receipt) when the server
//! confirms the settlement.
//!
//! Two forms of the same operation:
//!
//! - `POST /v1/x402/fetch` with a JSON body (`url`, `method`, `headers`, `body`, `task`,
//!   `max_amount_micros`), answered with JSON (the upstream status, headers and body, and the
//!   payment with its receipt);
//! - `ANY /v1/x402/proxy/<url>`: the target URL appended to the daemon's path, so that any HTTP
//!   client pays by changing only its URL. The upstream response comes back verbatim, plus
//!   `X-Spendcap-*` headers.
//!
//! The modules: [`destination`] (which hosts may be fetched: SSRF), `upstream` (the HTTP client),
//! `purchase` (one paid fetch: hold, sign, pay, settle, idempotency), `routes` (the two forms).
//!
//! Architecture invariant: a signed authorization is held until the server confirms its
//! settlement or its `validBefore` passes, and a retry of the same purchase re-signs the very
//! same authorization (same nonce) from the hold's stored terms, so at most one can settle.

pub(crate) mod destination;
pub(crate) mod purchase;
pub(crate) mod routes;
pub(crate) mod upstream;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::x402::{chain_id_of_network, AllowedAsset, EvmSigner, X402Version};
use adapters::Micros;
use axum::routing::{any, post};
use axum::Router;
use clap::Args;

pub use self::destination::{AddressRange, BadAddressRange};
pub use self::routes::{FetchBody, FetchResponse, PaymentStatus, PaymentView};
use super::ConfigError;
use crate::api::SharedState;

const DEFAULT_MAX_PAYMENT_MICROS: u64 = 1_000_000;
const DEFAULT_MAX_VALIDITY_SECS: u64 = 300;
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// `serve` flags of the x402 endpoint.
#[derive(Args, Debug, Clone)]
pub struct X402Args {
    /// File with the master EVM private key (64 hex digits, optional 0x) that signs x402 payments.
    /// Without a key (here or in SPENDCAP_X402_PRIVATE_KEY) the x402 endpoint answers 503.
    #[arg(long = "x402-private-key-file", env = "SPENDCAP_X402_PRIVATE_KEY_FILE", value_name = "PATH")]
    pub private_key_file: Option<PathBuf>,
    /// The master EVM private key itself; prefer the file. Never logged or shown.
    #[arg(long = "x402-private-key", env = "SPENDCAP_X402_PRIVATE_KEY", hide_env_values = true, hide = true)]
    pub private_key: Option<SecretText>,
    /// Largest single x402 payment in micro-USD, whatever the agent's budget.
    #[arg(long = "x402-max-payment-micros", env = "SPENDCAP_X402_MAX_PAYMENT_MICROS", default_value_t = DEFAULT_MAX_PAYMENT_MICROS)]
    pub max_payment_micros: u64,
    /// Longest validity of a signed authorization (its validBefore is at most now + this).
    #[arg(long = "x402-max-validity-secs", env = "SPENDCAP_X402_MAX_VALIDITY_SECS", default_value_t = DEFAULT_MAX_VALIDITY_SECS)]
    pub max_validity_secs: u64,
    /// Networks to pay on, comma-separated (CAIP-2 ids like eip155:8453 or v1 names like base);
    /// default: every network of the built-in USDC allow-list (Base, Base Sepolia, Ethereum).
    #[arg(long = "x402-networks", env = "SPENDCAP_X402_NETWORKS", value_delimiter = ',')]
    pub networks: Vec<String>,
    /// Private, loopback or link-local addresses or networks the daemon may fetch from,
    /// comma-separated (e.g. 10.0.0.0/8,127.0.0.1). Default: none, only public addresses.
    #[arg(long = "x402-allow-private", env = "SPENDCAP_X402_ALLOW_PRIVATE", value_delimiter = ',')]
    pub allow_private: Vec<AddressRange>,
    /// Longest wait for one upstream request, body included.
    #[arg(long = "x402-timeout-ms", env = "SPENDCAP_X402_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Longest wait for an upstream connection.
    #[arg(long = "x402-connect-timeout-ms", env = "SPENDCAP_X402_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,
    /// Largest upstream response body passed back to an agent, in bytes.
    #[arg(long = "x402-max-response-bytes", env = "SPENDCAP_X402_MAX_RESPONSE_BYTES", default_value_t = DEFAULT_MAX_RESPONSE_BYTES)]
    pub max_response_bytes: usize,
}

impl Default for X402Args {
    fn default() -> X402Args {
        X402Args {
            private_key_file: None,
            private_key: None,
            max_payment_micros: DEFAULT_MAX_PAYMENT_MICROS,
            max_validity_secs: DEFAULT_MAX_VALIDITY_SECS,
            networks: Vec::new(),
            allow_private: Vec::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Text that must never be shown: its `Debug` redacts it (clap prints the arguments' `Debug` in
/// some error paths, and `X402Args` is `Debug`).
#[derive(Clone)]
pub struct SecretText(String);

impl SecretText {
    pub(crate) fn reveal(&self) -> &str {
        &self.0
    }
}

impl FromStr for SecretText {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<SecretText, Self::Err> {
        Ok(SecretText(text.to_owned()))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The x402 endpoint's configuration.
#[derive(Debug, Clone)]
pub struct X402Config {
    /// The master key; `None` leaves the endpoint unconfigured (it answers 503
    /// `x402_not_configured`; start-up does not fail).
    pub signer: Option<EvmSigner>,
    /// Largest single payment.
    pub max_payment: Micros,
    /// Longest authorization validity (the hold lasts as long).
    pub max_validity_secs: u64,
    /// The (chain, token) pairs that are paid.
    pub assets: Vec<AllowedAsset>,
    /// Non-public addresses that may be fetched anyway (tests allow-list 127.0.0.1).
    pub allow_private: Vec<AddressRange>,
    /// Longest wait for one upstream request, body included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Largest upstream response body, in bytes (a larger one is `x402_upstream_body_too_large`).
    pub max_response_bytes: usize,
    /// Where every PaymentPayload and PaymentRequirements sent is recorded (tests only).
    pub conformance: ConformanceSink,
}

impl Default for X402Config {
    fn default() -> X402Config {
        X402Config {
            signer: None,
            max_payment: Micros::new(DEFAULT_MAX_PAYMENT_MICROS).unwrap_or(Micros::ZERO),
            max_validity_secs: DEFAULT_MAX_VALIDITY_SECS,
            assets: AllowedAsset::default_usdc(),
            allow_private: Vec::new(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            conformance: ConformanceSink::disabled(),
        }
    }
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "x402", reason: reason.into() }
}

impl X402Config {
    pub fn from_args(args: &X402Args) -> Result<X402Config, ConfigError> {
        let signer = match (&args.private_key_file, &args.private_key) {
            (Some(_), Some(_)) => {
                return Err(config_error("set SPENDCAP_X402_PRIVATE_KEY_FILE or SPENDCAP_X402_PRIVATE_KEY, not both"))
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    config_error(format!("cannot read the private key file {}: {}", path.display(), err.kind()))
                })?;
                Some(
                    EvmSigner::from_hex(&text)
                        .map_err(|err| config_error(format!("the private key file {}: {err}", path.display())))?,
                )
            }
            (None, Some(secret)) => Some(
                EvmSigner::from_hex(secret.reveal())
                    .map_err(|err| config_error(format!("SPENDCAP_X402_PRIVATE_KEY: {err}")))?,
            ),
            (None, None) => None,
        };
        let max_payment = Micros::positive(args.max_payment_micros)
            .map_err(|err| config_error(format!("SPENDCAP_X402_MAX_PAYMENT_MICROS: {err}")))?;
        if args.max_validity_secs == 0 {
            return Err(config_error("SPENDCAP_X402_MAX_VALIDITY_SECS must be at least 1"));
        }
        if args.timeout_ms == 0 || args.connect_timeout_ms == 0 || args.max_response_bytes == 0 {
            return Err(config_error("x402 timeouts and the response size limit must be greater than zero"));
        }
        Ok(X402Config {
            signer,
            max_payment,
            max_validity_secs: args.max_validity_secs,
            assets: allowed_assets(&args.networks)?,
            allow_private: args.allow_private.clone(),
            timeout: Duration::from_millis(args.timeout_ms),
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            max_response_bytes: args.max_response_bytes,
            conformance: ConformanceSink::disabled(),
        })
    }
}

/// The built-in USDC allow-list, narrowed to the named networks (all of it when none is named).
fn allowed_assets(networks: &[String]) -> Result<Vec<AllowedAsset>, ConfigError> {
    let all = AllowedAsset::default_usdc();
    let networks: Vec<&str> = networks.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect();
    if networks.is_empty() {
        return Ok(all);
    }
    let mut chains = Vec::new();
    for network in networks {
        let chain = chain_id_of_network(network, X402Version::V2)
            .or_else(|| chain_id_of_network(network, X402Version::V1))
            .filter(|chain| all.iter().any(|asset| asset.chain_id == *chain))
            .ok_or_else(|| {
                config_error(format!(
                    "SPENDCAP_X402_NETWORKS: {network:?} is not a network of the USDC allow-list \
                     (eip155:8453 / base, eip155:84532 / base-sepolia, eip155:1 / ethereum)"
                ))
            })?;
        chains.push(chain);
    }
    Ok(all.into_iter().filter(|asset| chains.contains(&asset.chain_id)).collect())
}

/// What the x402 endpoint needs at run time; `None` inside when no key is configured.
pub struct X402Service {
    engine: Option<purchase::Engine>,
}

impl X402Service {
    pub fn build(config: X402Config, reserved: super::reserved::Reserved) -> Result<X402Service, ConfigError> {
        let Some(signer) = config.signer else {
            tracing::info!(
                "x402 endpoint not configured (no SPENDCAP_X402_PRIVATE_KEY_FILE or SPENDCAP_X402_PRIVATE_KEY); \
                 it answers 503 x402_not_configured"
            );
            return Ok(X402Service { engine: None });
        };
        let destinations = destination::Destinations::new(config.allow_private).with_reserved(reserved);
        let upstream =
            upstream::Upstream::build(destinations.clone(), config.connect_timeout, config.max_response_bytes)
                .map_err(|err| config_error(format!("cannot build the HTTP client: {err}")))?;
        tracing::info!(payer = %signer.address(), "x402 endpoint enabled");
        Ok(X402Service {
            engine: Some(purchase::Engine {
                signer,
                assets: config.assets,
                max_payment: config.max_payment,
                max_validity_secs: config.max_validity_secs,
                timeout: config.timeout,
                upstream,
                destinations,
                conformance: config.conformance,
            }),
        })
    }

    /// The address that pays, when a key is configured.
    pub fn payer(&self) -> Option<adapters::x402::Address> {
        self.engine.as_ref().map(|engine| engine.signer.address())
    }

    pub(crate) fn engine(&self) -> Option<&purchase::Engine> {
        self.engine.as_ref()
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/x402/fetch", post(routes::fetch))
        .route(&format!("{}{{*target}}", routes::PROXY_PREFIX), any(routes::proxy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const TEST_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        x402: X402Args,
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let cli =
            Cli::try_parse_from(["spendcap", "--x402-private-key", TEST_KEY, "--x402-allow-private", "127.0.0.1"])
                .expect("parses");
        let config = X402Config::from_args(&cli.x402).expect("valid configuration");
        let service = X402Service::build(config.clone(), Default::default()).expect("builds");
        for shown in [format!("{cli:?}"), format!("{config:?}"), format!("{:#?}", cli.x402)] {
            assert!(!shown.contains(TEST_KEY) && !shown.contains(&TEST_KEY[..16]), "{shown}");
        }
        assert_eq!(
            service.payer().map(|a| a.to_string()).as_deref(),
            Some("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266")
        );
    }

    #[test]
    fn configuration_errors_are_clear_and_never_quote_the_key() {
        let parse = |args: &[&str]| {
            let mut all = vec!["spendcap"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|cli| X402Config::from_args(&cli.x402))
        };
        let bad_key = "zz".repeat(32);
        let err = parse(&["--x402-private-key", &bad_key]).expect("parses").expect_err("invalid key");
        assert!(!err.to_string().contains(&bad_key), "{err}");
        assert!(err.to_string().contains("SPENDCAP_X402_PRIVATE_KEY"), "{err}");
        let err = parse(&["--x402-networks", "solana"]).expect("parses").expect_err("unknown network");
        assert!(err.to_string().contains("solana"), "{err}");
        let narrowed = parse(&["--x402-networks", "eip155:8453,base-sepolia"]).expect("parses").expect("valid");
        let mut chains: Vec<u64> = narrowed.assets.iter().map(|a| a.chain_id).collect();
        chains.sort();
        assert_eq!(chains, vec![8453, 84532]);
        assert!(parse(&["--x402-allow-private", "not-an-ip"]).is_err());
        assert!(parse(&["--x402-max-payment-micros", "0"]).expect("parses").is_err());
        let unconfigured = parse(&[]).expect("parses").expect("valid without a key");
        assert!(unconfigured.signer.is_none());
        assert!(X402Service::build(unconfigured, Default::default()).expect("starts without a key").payer().is_none());
    }

    #[test]
    fn a_key_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("spendcap-x402-key-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("key");
        std::fs::write(&path, format!("0x{TEST_KEY}\n")).expect("write key");
        let args = X402Args { private_key_file: Some(path.clone()), ..X402Args::default() };
        let config = X402Config::from_args(&args).expect("valid key file");
        assert!(config.signer.is_some());
        let both = X402Args { private_key: Some(SecretText(TEST_KEY.to_owned())), ..args };
        assert!(X402Config::from_args(&both).is_err());
        let missing = X402Args { private_key_file: Some(dir.join("absent")), ..X402Args::default() };
        assert!(X402Config::from_args(&missing).is_err());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
