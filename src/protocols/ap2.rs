//! The AP2 endpoints: the daemon holds each agent's AP2 key and signs closed mandates only after
//! the ledger has held the amount against the agent's cap *and* the open mandate's own budget.
//!
//! AP2 leaves the running total of an open Payment Mandate's `payment.budget` to "the verifier",
//! so an agent that pays several merchants under one open mandate could pass it. Here the budget
//! is a ledger budget bucket (`ap2:pm:<payment mandate id>`), charged in the same atomic step as
//! the agent's caps, on every daemon instance. The bucket is *exclusive*: AP2 has the agent's key
//! prevent double spend "by preventing the release of overlapping closed Mandates", so while one
//! closed mandate of an open mandate is outstanding (held, not yet settled or voided) a second is
//! refused with 402 `budget_busy`, and the budget counts every closed mandate until its payment
//! fails.
//!
//! Open mandates are not stored: the agent sends them with every payment and the daemon verifies
//! them again (trusted issuers as configured *now*, expiry, `cnf` = the agent's key). The bucket
//! id is derived from the payment mandate id (the hash of its issuer-signed JWT), so every
//! instance and every payment under one mandate charge the same bucket.
//!
//! Routes (agent token unless marked admin):
//!
//! - `GET /v1/ap2/key`; admin `GET /v1/ap2/agents/{agent}/key` — the agent's public JWK (for the
//!   open mandates' `cnf`), generated on first use.
//! - `POST /v1/ap2/mandates`; admin `POST /v1/ap2/agents/{agent}/mandates` — verify open
//!   mandates and create their budget bucket; `GET /v1/ap2/mandates/{mandate_id}` — its budget.
//! - `POST /v1/ap2/payments` — pay a merchant-signed checkout under open mandates ([`checkout`]).
//! - `POST /v1/ap2/v0.1/payments` — pay a v0.1 CartMandate through the v0.1 processor ([`cart`]).

mod budget;
mod cart;
mod checkout;
mod config;
mod keys;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use adapters::ap2::types::PaymentInstrument;
use adapters::ap2::{
    verify_open_mandates, Ap2Error, CredentialProviderClient, Jwk, MerchantClient, OpenMandates, ProviderConfig,
};
use adapters::conformance::ConformanceSink;
use adapters::Micros;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::budget::{authenticate, check_enforceable, ensure_bucket, input_error, unix_secs};
pub use self::cart::CartPaymentRequest;
pub use self::checkout::PaymentRequest;
pub use self::config::{Ap2File, CredentialProviderEntry, MerchantEntry, V01Entry};
pub use self::keys::{Kek, KekError, KEY_ATTRIBUTE};
use super::ConfigError;
use crate::api::{AgentAuth, ApiError, ApiJson, AppState, Principal, SharedState};
use crate::app::Core;
use crate::identity::AgentId;
use crate::outcome::{Failure, Kind};

/// Timeout of one Credential Provider, merchant or processor request, unless configured.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of closed mandates (and so of their holds), unless configured.
const DEFAULT_MANDATE_TTL: Duration = Duration::from_secs(300);
/// How long a payment in progress keeps duplicates out (409) before one may take it over.
const DEFAULT_LEASE: Duration = Duration::from_secs(120);
/// A hold outlives the closed mandates it backs by this much, for verifiers' clock skew.
const HOLD_GRACE_MS: u64 = 60_000;

/// A secret given on the command line or in the environment. `Debug` redacts it, and a value
/// that does not parse is reported without being echoed.
#[derive(Clone)]
pub struct SecretText(String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

impl FromStr for SecretText {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<SecretText, Self::Err> {
        Ok(SecretText(text.to_owned()))
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct Ap2Args {
    /// AP2 configuration file (JSON: trusted issuers, Credential Provider, merchants, processor
    /// keys, v0.1 processor). Without it the AP2 payment endpoints answer `ap2_not_configured`.
    #[arg(long = "ap2-config", env = "SPENDCAP_AP2_CONFIG", value_name = "PATH")]
    pub ap2_config: Option<PathBuf>,
    /// Key-encryption key for the agents' AP2 keys: 32 bytes as 64 hex digits or base64. Prefer
    /// the environment variable or --ap2-kek-file to the command line. Every instance sharing a
    /// ledger needs the same one. Without one an ephemeral key is made (keys die with the daemon).
    #[arg(long = "ap2-kek", env = "SPENDCAP_AP2_KEK", value_name = "KEY", hide_env_values = true)]
    pub ap2_kek: Option<SecretText>,
    /// A file holding the key-encryption key (instead of SPENDCAP_AP2_KEK).
    #[arg(long = "ap2-kek-file", env = "SPENDCAP_AP2_KEK_FILE", value_name = "PATH")]
    pub ap2_kek_file: Option<PathBuf>,
    /// Timeout of one Credential Provider, merchant or processor request, in milliseconds
    /// [default: 10000].
    #[arg(long = "ap2-timeout-ms", env = "SPENDCAP_AP2_TIMEOUT_MS", value_name = "MS")]
    pub ap2_timeout_ms: Option<u64>,
    /// Lifetime of the closed mandates the daemon signs, in seconds; their hold lives 60 s longer
    /// [default: 300].
    #[arg(long = "ap2-mandate-ttl-secs", env = "SPENDCAP_AP2_MANDATE_TTL_SECS", value_name = "SECS")]
    pub ap2_mandate_ttl_secs: Option<u64>,
    /// How long a payment in progress answers duplicates with 409 before one may take it over,
    /// in seconds [default: 120].
    #[arg(long = "ap2-lease-secs", env = "SPENDCAP_AP2_LEASE_SECS", value_name = "SECS")]
    pub ap2_lease_secs: Option<u64>,
}

/// The AP2 configuration.
#[derive(Debug)]
pub struct Ap2Config {
    /// The configuration file's content; `None`: the payment endpoints are off.
    pub file: Option<Ap2File>,
    /// The key-encryption key; `None`: an ephemeral one is made at start-up (with a warning).
    pub kek: Option<Kek>,
    pub timeout: Duration,
    pub mandate_ttl: Duration,
    pub lease: Duration,
    /// Where every mandate sent is recorded for conformance checking (tests); off by default.
    pub conformance: ConformanceSink,
    /// Addresses no provider client may connect to (Redis, the daemon); set by `Protocols::build`.
    pub reserved: super::reserved::Reserved,
}

impl Default for Ap2Config {
    fn default() -> Ap2Config {
        Ap2Config {
            file: None,
            kek: None,
            timeout: DEFAULT_TIMEOUT,
            mandate_ttl: DEFAULT_MANDATE_TTL,
            lease: DEFAULT_LEASE,
            conformance: ConformanceSink::disabled(),
            reserved: Default::default(),
        }
    }
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "ap2", reason: reason.into() }
}

impl Ap2Config {
    pub fn from_args(args: &Ap2Args) -> Result<Ap2Config, ConfigError> {
        let file = match &args.ap2_config {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| config_error(format!("reading {}: {e}", path.display())))?;
                Some(
                    serde_json::from_str::<Ap2File>(&text)
                        .map_err(|e| config_error(format!("{}: {e}", path.display())))?,
                )
            }
        };
        let kek_text = match (&args.ap2_kek, &args.ap2_kek_file) {
            (Some(_), Some(_)) => return Err(config_error("set SPENDCAP_AP2_KEK or SPENDCAP_AP2_KEK_FILE, not both")),
            (Some(text), None) => Some(text.0.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path).map_err(|e| config_error(format!("reading {}: {e}", path.display())))?,
            ),
            (None, None) => None,
        };
        let kek = kek_text.map(|text| text.parse::<Kek>()).transpose().map_err(|e| config_error(e.to_string()))?;
        let positive = |value: Option<u64>, name: &str, default: Duration, unit: fn(u64) -> Duration| match value {
            None => Ok(default),
            Some(0) => Err(config_error(format!("{name} must be positive"))),
            Some(v) => Ok(unit(v)),
        };
        Ok(Ap2Config {
            file,
            kek,
            timeout: positive(args.ap2_timeout_ms, "SPENDCAP_AP2_TIMEOUT_MS", DEFAULT_TIMEOUT, Duration::from_millis)?,
            mandate_ttl: positive(
                args.ap2_mandate_ttl_secs,
                "SPENDCAP_AP2_MANDATE_TTL_SECS",
                DEFAULT_MANDATE_TTL,
                Duration::from_secs,
            )?,
            lease: positive(args.ap2_lease_secs, "SPENDCAP_AP2_LEASE_SECS", DEFAULT_LEASE, Duration::from_secs)?,
            conformance: ConformanceSink::disabled(),
            reserved: Default::default(),
        })
    }
}

/// A configured merchant: its keys and its client.
pub(crate) struct Merchant {
    pub id: String,
    pub keys: Vec<Jwk>,
    pub audience: String,
    pub v01_name: Option<String>,
    pub client: MerchantClient,
}

/// The v0.1 processor.
pub(crate) struct V01Processor {
    pub http: reqwest::Client,
    pub url: reqwest::Url,
    pub keys: Vec<Jwk>,
    pub audience: String,
    pub method_name: String,
}

/// What the payment endpoints need, built from the configuration file.
pub(crate) struct Settings {
    pub trusted_issuers: Vec<Jwk>,
    pub credential_provider: CredentialProviderClient,
    pub credential_provider_audience: String,
    pub merchants: Vec<Merchant>,
    pub payment_instrument: Option<PaymentInstrument>,
    pub v01: Option<V01Processor>,
}

impl Settings {
    pub fn merchant(&self, id: &str) -> Result<&Merchant, Failure> {
        self.merchants.iter().find(|m| m.id == id).ok_or_else(|| {
            Failure::new(Kind::Invalid, "ap2_unknown_merchant", format!("merchant {id:?} is not configured"))
        })
    }
}

pub struct Ap2Service {
    settings: Option<Settings>,
    kek: Kek,
    kek_ephemeral: bool,
    conformance: ConformanceSink,
    mandate_ttl: Duration,
    lease: Duration,
}

fn host_of(url: &str) -> Option<String> {
    reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned))
}

fn build_settings(
    file: Ap2File,
    timeout: Duration,
    sink: &ConformanceSink,
    reserved: &super::reserved::Reserved,
) -> Result<Settings, ConfigError> {
    if file.trusted_issuers.is_empty() {
        return Err(config_error("trusted_issuers must name at least one key"));
    }
    let invalid = |what: &str, e: Ap2Error| config_error(format!("{what}: {e}"));
    let provider = |base_url: &str| ProviderConfig {
        base_url: base_url.to_owned(),
        timeout,
        resolver: super::reserved::ReservedResolver::for_url(reserved, base_url),
    };
    let cp = &file.credential_provider;
    let credential_provider =
        CredentialProviderClient::new(&provider(&cp.base_url), cp.receipt_keys.clone(), sink.clone())
            .map_err(|e| invalid("credential_provider", e))?;
    let credential_provider_audience = cp
        .audience
        .clone()
        .or_else(|| host_of(&cp.base_url))
        .ok_or_else(|| config_error("credential_provider needs an audience"))?;
    let mut merchants: Vec<Merchant> = Vec::new();
    for entry in file.merchants {
        if entry.id.is_empty() || merchants.iter().any(|m| m.id == entry.id) {
            return Err(config_error(format!("merchant ids must be non-empty and unique ({:?})", entry.id)));
        }
        if entry.keys.is_empty() {
            return Err(config_error(format!("merchant {} needs at least one key", entry.id)));
        }
        let client = MerchantClient::new(
            &provider(&entry.base_url),
            entry.keys.clone(),
            file.processor_keys.clone(),
            sink.clone(),
        )
        .map_err(|e| invalid(&format!("merchant {}", entry.id), e))?;
        merchants.push(Merchant {
            audience: entry.audience.unwrap_or_else(|| entry.id.clone()),
            id: entry.id,
            keys: entry.keys,
            v01_name: entry.v01_name,
            client,
        });
    }
    let v01 = match file.v01 {
        None => None,
        Some(entry) => {
            let url = reqwest::Url::parse(&entry.processor_url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
                .ok_or_else(|| config_error("v01.processor_url must be an http(s) URL"))?;
            let keys = if entry.processor_keys.is_empty() { file.processor_keys.clone() } else { entry.processor_keys };
            if keys.is_empty() {
                return Err(config_error("v01 needs processor_keys (its own or the top-level ones)"));
            }
            let resolver = super::reserved::ReservedResolver::for_url(reserved, url.as_str());
            let http = adapters::net::with_resolver(reqwest::Client::builder(), resolver.as_ref())
                .timeout(timeout)
                .build()
                .map_err(|e| config_error(format!("v01 HTTP client: {e}")))?;
            Some(V01Processor {
                audience: entry.audience.or_else(|| url.host_str().map(str::to_owned)).unwrap_or_default(),
                method_name: entry.method_name.unwrap_or_else(|| "CARD".to_owned()),
                http,
                url,
                keys,
            })
        }
    };
    Ok(Settings {
        trusted_issuers: file.trusted_issuers,
        credential_provider,
        credential_provider_audience,
        merchants,
        payment_instrument: file.payment_instrument,
        v01,
    })
}

impl Ap2Service {
    pub fn build(config: Ap2Config) -> Result<Ap2Service, ConfigError> {
        let settings = config
            .file
            .map(|file| build_settings(file, config.timeout, &config.conformance, &config.reserved))
            .transpose()?;
        let kek_ephemeral = config.kek.is_none();
        let kek =
            config.kek.unwrap_or_else(|| {
                let kek = Kek::generate();
                tracing::warn!(kek = kek.id(),
                "AP2: NO KEY-ENCRYPTION KEY CONFIGURED (SPENDCAP_AP2_KEK); using an EPHEMERAL one. Agents' AP2 keys \
                 made now become unreadable when this daemon stops, and other instances cannot read them. \
                 Fine for --dev, never for real money.");
                kek
            });
        Ok(Ap2Service {
            settings,
            kek,
            kek_ephemeral,
            conformance: config.conformance,
            mandate_ttl: config.mandate_ttl,
            lease: config.lease,
        })
    }

    pub(crate) fn settings(&self) -> Result<&Settings, Failure> {
        self.settings.as_ref().ok_or_else(|| {
            Failure::new(
                Kind::Unavailable,
                "ap2_not_configured",
                "AP2 payments are not configured on this daemon (SPENDCAP_AP2_CONFIG)",
            )
        })
    }

    pub(crate) async fn agent_key(&self, core: &Core, agent: &AgentId) -> Result<adapters::ap2::AgentKey, Failure> {
        keys::agent_key(core, &self.kek, self.kek_ephemeral, agent).await
    }
}

/// `POST /v1/ap2/payments`: a v0.2 payment (the flow is `checkout::pay`).
async fn pay_checkout(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<PaymentRequest>,
) -> Result<axum::response::Response, ApiError> {
    let header_key = crate::api::holds::idempotency_key(&headers)?;
    let reply = checkout::pay(&state.core, &state.protocols.ap2, &auth, header_key, body).await?;
    Ok(crate::api::status::reply(reply))
}

/// `POST /v1/ap2/v0.1/payments`: a v0.1 cart payment (the flow is `cart::pay`).
async fn pay_cart(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<CartPaymentRequest>,
) -> Result<axum::response::Response, ApiError> {
    let header_key = crate::api::holds::idempotency_key(&headers)?;
    let reply = cart::pay(&state.core, &state.protocols.ap2, &auth, header_key, body).await?;
    Ok(crate::api::status::reply(reply))
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/ap2/key", get(own_key))
        .route("/v1/ap2/agents/{agent}/key", get(admin_key))
        .route("/v1/ap2/mandates", post(register_mandates))
        .route("/v1/ap2/agents/{agent}/mandates", post(admin_register_mandates))
        .route("/v1/ap2/mandates/{mandate_id}", get(show_mandate))
        .route("/v1/ap2/payments", post(pay_checkout))
        .route("/v1/ap2/v0.1/payments", post(pay_cart))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct KeyView {
    pub agent_id: String,
    pub alg: String,
    /// The public key, to put into open mandates as `cnf: {"jwk": ...}`.
    pub jwk: Jwk,
    pub cnf: Value,
    /// RFC 7638 thumbprint of `jwk`.
    pub thumbprint: String,
}

async fn key_view(state: &AppState, agent: &AgentId) -> Result<Json<KeyView>, ApiError> {
    let key = state.protocols.ap2.agent_key(state, agent).await?;
    Ok(Json(KeyView {
        agent_id: agent.to_string(),
        alg: "ES256".into(),
        cnf: json!({ "jwk": key.public_jwk() }),
        jwk: key.public_jwk().clone(),
        thumbprint: key.thumbprint(),
    }))
}

/// `GET /v1/ap2/key`: the agent's own public AP2 key (generated on first use).
async fn own_key(auth: AgentAuth, State(state): State<SharedState>) -> Result<Json<KeyView>, ApiError> {
    authenticate(&state, &auth).await?;
    key_view(&state, &auth.agent).await
}

/// `GET /v1/ap2/agents/{agent}/key` (admin): an agent's public AP2 key, for the owner's trusted
/// surface to name in the open mandates it signs.
async fn admin_key(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
) -> Result<Json<KeyView>, ApiError> {
    let agent = who.resolve(&state, &agent).await?;
    state.ledger.agent(&agent).await?;
    key_view(&state, &agent).await
}

/// `POST /v1/ap2/mandates`: open mandates to register.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MandatesRequest {
    /// The user-signed open Checkout Mandate (SD-JWT `<jwt>~<disclosures>~`).
    pub open_checkout_mandate: String,
    /// The user-signed open Payment Mandate.
    pub open_payment_mandate: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MandateView {
    /// The open Payment Mandate's id: base64url(SHA-256(its issuer-signed JWT)).
    pub mandate_id: String,
    pub bucket_id: String,
    /// `payment.budget` in micro-USD; `null` when the mandate sets none (the agent's cap still
    /// applies).
    pub budget_micros: Option<u64>,
    pub spent_micros: u64,
    pub held_micros: u64,
    pub remaining_micros: Option<u64>,
    /// Closed mandates outstanding (at most one: the budget is exclusive).
    pub outstanding: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout_mandate_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_range: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_payees: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_merchants: Option<Vec<String>>,
}

fn mandate_view(bucket: &crate::ledger::Bucket, mandate_id: &str) -> MandateView {
    let budget = (bucket.cap != Micros::MAX).then_some(bucket.cap.get());
    MandateView {
        mandate_id: mandate_id.to_owned(),
        bucket_id: bucket.id.clone(),
        budget_micros: budget,
        spent_micros: bucket.spent.get(),
        held_micros: bucket.held.get(),
        remaining_micros: budget.map(|b| b.saturating_sub(bucket.spent.get() + bucket.held.get())),
        outstanding: bucket.open_holds,
        checkout_mandate_id: None,
        expires_at: None,
        amount_range: None,
        allowed_payees: None,
        allowed_merchants: None,
    }
}

async fn register(
    state: &AppState,
    agent: &AgentId,
    body: &MandatesRequest,
    by: &str,
) -> Result<MandateView, ApiError> {
    let settings = state.protocols.ap2.settings()?;
    let key = state.protocols.ap2.agent_key(state, agent).await?;
    let now = unix_secs(state.clock.now_ms());
    let open: OpenMandates = verify_open_mandates(
        &body.open_checkout_mandate,
        &body.open_payment_mandate,
        &settings.trusted_issuers,
        key.public_jwk(),
        now,
    )
    .map_err(input_error)?;
    let constraints = &open.constraints;
    check_enforceable(constraints)?;
    let (bucket_id, created) = ensure_bucket(state, agent, constraints, by).await?;
    let bucket = state
        .ledger
        .bucket(agent.tree(), &bucket_id)
        .await?
        .ok_or_else(|| ApiError::internal("a budget bucket vanished after it was created"))?;
    if created {
        tracing::info!(agent = %agent, mandate = %constraints.payment_mandate_id, "registered an AP2 open mandate");
    }
    let ids = |list: &Option<Vec<adapters::ap2::types::Merchant>>| {
        list.as_ref().map(|l| l.iter().map(|m| m.id.clone()).collect::<Vec<_>>())
    };
    Ok(MandateView {
        checkout_mandate_id: Some(constraints.checkout_mandate_id.clone()),
        expires_at: constraints.expires_at,
        amount_range: constraints.amount_range.map(|r| json!({ "min_micros": r.min.get(), "max_micros": r.max.get() })),
        allowed_payees: ids(&constraints.allowed_payees),
        allowed_merchants: ids(&constraints.allowed_merchants),
        ..mandate_view(&bucket, &constraints.payment_mandate_id)
    })
}

/// `POST /v1/ap2/mandates`: verify open mandates bound to the agent's key and create their budget.
async fn register_mandates(
    auth: AgentAuth,
    State(state): State<SharedState>,
    ApiJson(body): ApiJson<MandatesRequest>,
) -> Result<(StatusCode, Json<MandateView>), ApiError> {
    authenticate(&state, &auth).await?;
    crate::api::refuse_if_revoked(&state, &auth.agent).await?;
    let by = auth.caller().by_for(&auth.agent);
    Ok((StatusCode::CREATED, Json(register(&state, &auth.agent, &body, &by).await?)))
}

/// `POST /v1/ap2/agents/{agent}/mandates` (admin): the same, by the agent's owner.
async fn admin_register_mandates(
    who: Principal,
    State(state): State<SharedState>,
    Path(agent): Path<String>,
    ApiJson(body): ApiJson<MandatesRequest>,
) -> Result<(StatusCode, Json<MandateView>), ApiError> {
    let agent = who.resolve(&state, &agent).await?;
    state.ledger.agent(&agent).await?;
    Ok((StatusCode::CREATED, Json(register(&state, &agent, &body, &who.actor().by).await?)))
}

/// `GET /v1/ap2/mandates/{mandate_id}`: the open mandate's budget: spent, held, remaining.
async fn show_mandate(
    auth: AgentAuth,
    State(state): State<SharedState>,
    Path(mandate_id): Path<String>,
) -> Result<Json<MandateView>, ApiError> {
    authenticate(&state, &auth).await?;
    let unknown = || ApiError::new(StatusCode::NOT_FOUND, "ap2_unknown_mandate", "no such open mandate for this agent");
    if mandate_id.is_empty()
        || mandate_id.len() > 64
        || !mandate_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
    {
        return Err(unknown());
    }
    let bucket = state.ledger.bucket(auth.agent.tree(), &format!("ap2:pm:{mandate_id}")).await?;
    match bucket {
        Some(bucket) if bucket.agent == auth.agent => Ok(Json(mandate_view(&bucket, &mandate_id))),
        _ => Err(unknown()),
    }
}
