//! The MPP endpoint (Machine Payments Protocol, `WWW-Authenticate: Payment`): an agent asks the
//! daemon to fetch a URL; when the server answers 402 with Payment challenges, the daemon chooses
//! one the operator's policy and the agent's maximum allow, holds its price on the ledger, mints
//! the method's credential (`stripe`: a Shared Payment Token bounded to the held amount, its
//! currency, its seller and its expiry), retries with `Authorization: Payment …` and settles the
//! hold when the server answers with a `Payment-Receipt`.
//!
//! The same two forms as x402: `POST /v1/mpp/fetch` (JSON) and `ANY /v1/mpp/proxy/<url>`.
//! Modules: `flow` (one paid fetch over `&Core`), `routes` (the two forms). The destination
//! checks and the upstream client are x402's (`x402::destination`, `x402::upstream`).
//!
//! Architecture invariant: one purchase, one credential. The token is minted under the
//! provider idempotency key `<hold>:spt`, so a resumed purchase gets the very same token back and
//! re-sends the very same credential (the challenge it answers is stored in the hold).

mod flow;
pub(crate) mod routes;
mod session;

use std::path::PathBuf;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::mpp::SptIssuer;
use adapters::x402::EvmSigner;
use adapters::Micros;
use axum::routing::{any, post};
use axum::Router;
use clap::Args;

pub use self::routes::{MppFetchResponse, MppPaymentView};
use super::x402::destination::{self, AddressRange};
use super::x402::upstream::Upstream;
use super::x402::SecretText;
use super::ConfigError;
use crate::api::SharedState;

const DEFAULT_MAX_PAYMENT_MICROS: u64 = 1_000_000;
const DEFAULT_MAX_VALIDITY_SECS: u64 = 300;
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
const DEFAULT_SESSION_MAX_DEPOSIT_MICROS: u64 = 5_000_000;
const DEFAULT_SESSION_TTL_SECS: u64 = 3_600;

/// `serve` flags of the MPP endpoint.
#[derive(Args, Debug, Clone)]
pub struct MppArgs {
    /// Base URL of the PSP that mints Shared Payment Tokens for the `stripe` method (Stripe's API,
    /// e.g. https://api.stripe.com). Without it the MPP endpoint answers 503 mpp_not_configured.
    #[arg(long = "mpp-psp-url", env = "SPENDCAP_MPP_PSP_URL", value_name = "URL")]
    pub mpp_psp_url: Option<String>,
    /// File with the PSP's secret API key. Never logged or shown.
    #[arg(long = "mpp-psp-key-file", env = "SPENDCAP_MPP_PSP_KEY_FILE", value_name = "PATH")]
    pub mpp_psp_key_file: Option<PathBuf>,
    /// The PSP's secret API key itself; prefer the file.
    #[arg(long = "mpp-psp-key", env = "SPENDCAP_MPP_PSP_KEY", hide_env_values = true, hide = true)]
    pub mpp_psp_key: Option<SecretText>,
    /// The owner's saved payment method the tokens are minted from (e.g. pm_...).
    #[arg(long = "mpp-payment-method", env = "SPENDCAP_MPP_PAYMENT_METHOD", value_name = "ID")]
    pub mpp_payment_method: Option<String>,
    /// Largest single MPP payment in micro-USD, whatever the agent's budget.
    #[arg(long = "mpp-max-payment-micros", env = "SPENDCAP_MPP_MAX_PAYMENT_MICROS", default_value_t = DEFAULT_MAX_PAYMENT_MICROS)]
    pub mpp_max_payment_micros: u64,
    /// Longest life of a credential (its token expires at the challenge's expiry or now + this,
    /// whichever is sooner; the hold lasts as long).
    #[arg(long = "mpp-max-validity-secs", env = "SPENDCAP_MPP_MAX_VALIDITY_SECS", default_value_t = DEFAULT_MAX_VALIDITY_SECS)]
    pub mpp_max_validity_secs: u64,
    /// Non-public addresses or networks the daemon may fetch from, comma-separated.
    #[arg(long = "mpp-allow-private", env = "SPENDCAP_MPP_ALLOW_PRIVATE", value_delimiter = ',')]
    pub mpp_allow_private: Vec<AddressRange>,
    /// Longest wait for one upstream request (and for the PSP), body included.
    #[arg(long = "mpp-timeout-ms", env = "SPENDCAP_MPP_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    pub mpp_timeout_ms: u64,
    /// File with the EVM private key (hex) that opens `tempo` session channels and signs their
    /// vouchers. Without it, `session` challenges are not paid. Never logged or shown.
    #[arg(long = "mpp-tempo-key-file", env = "SPENDCAP_MPP_TEMPO_KEY_FILE", value_name = "PATH")]
    pub mpp_tempo_key_file: Option<PathBuf>,
    /// Largest deposit of one session channel in micro-USD (the ledger holds it while it is open).
    #[arg(long = "mpp-session-max-deposit-micros", env = "SPENDCAP_MPP_SESSION_MAX_DEPOSIT_MICROS", default_value_t = DEFAULT_SESSION_MAX_DEPOSIT_MICROS)]
    pub mpp_session_max_deposit_micros: u64,
    /// How long a session channel's deposit stays held without a close (the ledger releases it then).
    #[arg(long = "mpp-session-ttl-secs", env = "SPENDCAP_MPP_SESSION_TTL_SECS", default_value_t = DEFAULT_SESSION_TTL_SECS)]
    pub mpp_session_ttl_secs: u64,
}

impl Default for MppArgs {
    fn default() -> MppArgs {
        MppArgs {
            mpp_psp_url: None,
            mpp_psp_key_file: None,
            mpp_psp_key: None,
            mpp_payment_method: None,
            mpp_max_payment_micros: DEFAULT_MAX_PAYMENT_MICROS,
            mpp_max_validity_secs: DEFAULT_MAX_VALIDITY_SECS,
            mpp_allow_private: Vec::new(),
            mpp_timeout_ms: DEFAULT_TIMEOUT_MS,
            mpp_tempo_key_file: None,
            mpp_session_max_deposit_micros: DEFAULT_SESSION_MAX_DEPOSIT_MICROS,
            mpp_session_ttl_secs: DEFAULT_SESSION_TTL_SECS,
        }
    }
}

/// The PSP that mints the `stripe` method's tokens.
#[derive(Clone)]
pub struct MppPsp {
    pub base_url: String,
    pub secret_key: String,
    pub payment_method: String,
}

impl std::fmt::Debug for MppPsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MppPsp")
            .field("base_url", &self.base_url)
            .field("payment_method", &self.payment_method)
            .finish_non_exhaustive()
    }
}

/// The MPP endpoint's configuration.
#[derive(Debug, Clone)]
pub struct MppConfig {
    /// `None` leaves the endpoint unconfigured (503 `mpp_not_configured`).
    pub psp: Option<MppPsp>,
    pub max_payment: Micros,
    pub max_validity_secs: u64,
    pub allow_private: Vec<AddressRange>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    /// Where every credential sent is recorded (tests only).
    pub conformance: ConformanceSink,
    /// The key of `tempo` session channels; `None`: sessions are not paid.
    pub tempo_signer: Option<EvmSigner>,
    pub session_max_deposit: Micros,
    pub session_ttl_secs: u64,
}

impl Default for MppConfig {
    fn default() -> MppConfig {
        MppConfig {
            psp: None,
            max_payment: Micros::new(DEFAULT_MAX_PAYMENT_MICROS).unwrap_or(Micros::ZERO),
            max_validity_secs: DEFAULT_MAX_VALIDITY_SECS,
            allow_private: Vec::new(),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            conformance: ConformanceSink::disabled(),
            tempo_signer: None,
            session_max_deposit: Micros::new(DEFAULT_SESSION_MAX_DEPOSIT_MICROS).unwrap_or(Micros::ZERO),
            session_ttl_secs: DEFAULT_SESSION_TTL_SECS,
        }
    }
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "mpp", reason: reason.into() }
}

impl MppConfig {
    pub fn from_args(args: &MppArgs) -> Result<MppConfig, ConfigError> {
        let key = match (&args.mpp_psp_key_file, &args.mpp_psp_key) {
            (Some(_), Some(_)) => {
                return Err(config_error("set SPENDCAP_MPP_PSP_KEY_FILE or SPENDCAP_MPP_PSP_KEY, not both"))
            }
            (Some(path), None) => Some(
                std::fs::read_to_string(path)
                    .map_err(|err| {
                        config_error(format!("cannot read the PSP key file {}: {}", path.display(), err.kind()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, Some(secret)) => Some(secret.reveal().trim().to_owned()),
            (None, None) => None,
        };
        let psp = match (&args.mpp_psp_url, key, &args.mpp_payment_method) {
            (None, None, None) => None,
            (Some(url), Some(secret_key), Some(payment_method)) if !secret_key.is_empty() => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|err| config_error(format!("SPENDCAP_MPP_PSP_URL {url:?}: {err}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(config_error("SPENDCAP_MPP_PSP_URL must be an http(s) URL"));
                }
                Some(MppPsp { base_url: url.clone(), secret_key, payment_method: payment_method.clone() })
            }
            _ => {
                return Err(config_error(
                    "the stripe method needs SPENDCAP_MPP_PSP_URL, a PSP key (SPENDCAP_MPP_PSP_KEY_FILE) and \
                     SPENDCAP_MPP_PAYMENT_METHOD together",
                ))
            }
        };
        let max_payment = Micros::positive(args.mpp_max_payment_micros)
            .map_err(|err| config_error(format!("SPENDCAP_MPP_MAX_PAYMENT_MICROS: {err}")))?;
        if args.mpp_max_validity_secs < 5 {
            return Err(config_error("SPENDCAP_MPP_MAX_VALIDITY_SECS must be at least 5"));
        }
        if args.mpp_timeout_ms == 0 {
            return Err(config_error("SPENDCAP_MPP_TIMEOUT_MS must be greater than zero"));
        }
        let tempo_signer = match &args.mpp_tempo_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    config_error(format!("cannot read the tempo key file {}: {}", path.display(), err.kind()))
                })?;
                Some(EvmSigner::from_hex(&text).map_err(|_| {
                    config_error(format!("the tempo key file {} holds no EVM private key", path.display()))
                })?)
            }
        };
        let session_max_deposit = Micros::positive(args.mpp_session_max_deposit_micros)
            .map_err(|err| config_error(format!("SPENDCAP_MPP_SESSION_MAX_DEPOSIT_MICROS: {err}")))?;
        if args.mpp_session_ttl_secs < 60 {
            return Err(config_error("SPENDCAP_MPP_SESSION_TTL_SECS must be at least 60"));
        }
        Ok(MppConfig {
            tempo_signer,
            session_max_deposit,
            session_ttl_secs: args.mpp_session_ttl_secs,
            psp,
            max_payment,
            max_validity_secs: args.mpp_max_validity_secs,
            allow_private: args.mpp_allow_private.clone(),
            timeout: Duration::from_millis(args.mpp_timeout_ms),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            conformance: ConformanceSink::disabled(),
        })
    }
}

/// What the MPP endpoint needs at run time; `None` inside when it is not configured.
pub struct MppService {
    engine: Option<flow::Engine>,
}

impl MppService {
    pub fn build(config: MppConfig, reserved: super::reserved::Reserved) -> Result<MppService, ConfigError> {
        if config.psp.is_none() && config.tempo_signer.is_none() {
            tracing::info!(
                "MPP endpoint not configured (no SPENDCAP_MPP_PSP_URL nor SPENDCAP_MPP_TEMPO_KEY_FILE); it answers 503 \
                 mpp_not_configured"
            );
            return Ok(MppService { engine: None });
        }
        let destinations = destination::Destinations::new(config.allow_private).with_reserved(reserved);
        let upstream = Upstream::build(destinations.clone(), config.timeout, config.max_response_bytes)
            .map_err(|err| config_error(format!("cannot build the HTTP client: {err}")))?;
        let issuer = match config.psp {
            None => None,
            Some(psp) => {
                let issuer = SptIssuer::new(
                    &psp.base_url,
                    psp.secret_key,
                    psp.payment_method,
                    config.timeout,
                    config.conformance.clone(),
                )
                .map_err(|err| config_error(format!("cannot build the PSP client: {err}")))?;
                tracing::info!(psp = %issuer.base_url(), "MPP endpoint: stripe charge enabled");
                Some(issuer)
            }
        };
        let session = config.tempo_signer.map(|signer| {
            tracing::info!(payer = %signer.address(), "MPP endpoint: tempo session enabled");
            session::Sessions::new(signer, config.session_max_deposit, config.session_ttl_secs)
        });
        Ok(MppService {
            engine: Some(flow::Engine {
                issuer,
                max_payment: config.max_payment,
                max_validity_secs: config.max_validity_secs,
                timeout: config.timeout,
                upstream,
                destinations,
                conformance: config.conformance,
                session,
            }),
        })
    }

    fn engine(&self) -> Option<&flow::Engine> {
        self.engine.as_ref()
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/mpp/fetch", post(routes::fetch))
        .route(&format!("{}{{*target}}", routes::PROXY_PREFIX), any(routes::proxy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        mpp: MppArgs,
    }

    #[test]
    fn the_psp_key_never_shows_and_a_partial_configuration_is_refused() {
        let key = "sk_test_0123456789abcdefghijklmnop";
        let cli = Cli::try_parse_from([
            "spendcap",
            "--mpp-psp-url",
            "http://127.0.0.1:9/",
            "--mpp-psp-key",
            key,
            "--mpp-payment-method",
            "pm_card_visa",
        ])
        .expect("parses");
        let config = MppConfig::from_args(&cli.mpp).expect("valid");
        assert!(config.psp.is_some());
        for shown in [format!("{cli:?}"), format!("{config:?}")] {
            assert!(!shown.contains(key), "{shown}");
        }
        let partial = Cli::try_parse_from(["spendcap", "--mpp-psp-url", "http://127.0.0.1:9/"]).expect("parses");
        let err = MppConfig::from_args(&partial.mpp).expect_err("no key");
        assert!(err.to_string().contains("SPENDCAP_MPP_PAYMENT_METHOD"), "{err}");
        let none = Cli::try_parse_from(["spendcap"]).expect("parses");
        assert!(MppConfig::from_args(&none.mpp).expect("valid").psp.is_none());
    }

    #[test]
    fn the_tempo_key_is_read_from_its_file_never_shown_and_a_bad_one_is_refused() {
        let key = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
        let path = std::env::temp_dir().join(format!("spendcap-tempo-{}.key", hex::encode(rand::random::<[u8; 8]>())));
        std::fs::write(&path, format!("0x{key}\n")).expect("writes");
        let path_text = path.to_str().expect("utf-8").to_owned();
        let cli = Cli::try_parse_from(["spendcap", "--mpp-tempo-key-file", &path_text]).expect("parses");
        let config = MppConfig::from_args(&cli.mpp).expect("valid");
        assert!(config.tempo_signer.is_some() && config.psp.is_none());
        assert!(!format!("{config:?}").contains(key), "the key never shows");
        std::fs::write(&path, "not a key").expect("writes");
        let err = MppConfig::from_args(&cli.mpp).expect_err("no key in it");
        assert!(
            err.to_string().contains("holds no EVM private key") && !err.to_string().contains("not a key"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
