//! Simulated payment providers for `spendcap demo` and the benchmarks: an x402 resource server
//! with its facilitator, an ACP merchant and PSP, and AP2's user issuer, merchant and Credential
//! Provider. Each is a real HTTP server on a loopback port that checks what it is sent (x402
//! signatures and nonces, ACP token allowances, AP2 mandate chains) the way the real party
//! would, so a demo or benchmark payment goes through the same daemon code as a real one.
//!
//! Nothing here is a test double of spendcap itself; the integration tests keep using their own
//! wiremock providers and fixtures.

pub mod acp;
pub mod ap2;
pub mod llm;
pub mod mpp;
pub mod x402;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use axum::Router;
use tokio::task::JoinHandle;

use crate::protocols::acp::AcpConfig;
use crate::protocols::ap2::{Ap2Config, Ap2File, Kek};
use crate::protocols::api::ApiConfig;
use crate::protocols::x402::X402Config;
use crate::protocols::{ConfigError, ProtocolConfig};

/// An HTTP server on `127.0.0.1:<ephemeral port>`, stopped when dropped.
pub struct Server {
    base: String,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start(app: Router) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "simulated provider stopped");
            }
        });
        Ok(Server { base, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Micro-USD as dollars (`2.75`), for people.
pub fn usd(micros: u64) -> String {
    adapters::Micros::new(micros).map(|m| m.to_usd_string()).unwrap_or_default()
}

/// `<prefix>_<24 hex digits>`.
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// What the demo's providers sell. x402 prices are micro-USD (USDC atomic units); ACP and AP2
/// prices are US cents.
pub const X402_PRICES: &[(&str, u64)] = &[
    ("/search", 20_000),
    ("/papers/attention", 400_000),
    ("/papers/scaling", 350_000),
    ("/papers/retrieval", 500_000),
];
/// Metered x402 resources (`upto` scheme): path and the maximum the 402 asks to authorise, in
/// micro-USD; the server charges `?used=<micro-USD>` of it.
pub const X402_METERED: &[(&str, u64)] = &[("/summarise", 300_000)];
pub const ACP_MERCHANT: &str = "datashop";
pub const ACP_CATALOG: &[acp::Product] =
    &[("dataset_climate", "Climate dataset (CSV)", 99), ("report_market", "Market report (PDF)", 45)];
/// The price of the simulated MPP resource, in US cents.
pub const MPP_PRICE_CENTS: u64 = 1;
pub const AP2_MERCHANT: &str = "profiles_inc";
pub const AP2_CATALOG: &[ap2::Sku] = &[("sku_company_profile", "Company profile", 30)];

/// Every simulated provider, and the daemon's wallet for x402.
pub struct Providers {
    pub x402: x402::X402Resource,
    pub acp: acp::AcpShop,
    pub ap2: ap2::Ap2World,
    /// OpenAI- and Anthropic-style APIs (`/v1/apis/openai/...`, `/v1/apis/anthropic/...`).
    pub llm: llm::LlmProvider,
    /// An MPP resource (`stripe` charge at `/data`) and its PSP.
    pub mpp: mpp::MppShop,
    /// The x402 payer key the daemon signs with: fresh and random, holding nothing.
    x402_key: String,
}

impl Providers {
    pub async fn start() -> std::io::Result<Providers> {
        Ok(Providers {
            x402: x402::X402Resource::start_with_upto(X402_PRICES, X402_METERED).await?,
            acp: acp::AcpShop::start(ACP_MERCHANT, ACP_CATALOG).await?,
            ap2: ap2::Ap2World::start(AP2_MERCHANT, AP2_CATALOG).await?,
            llm: llm::LlmProvider::start().await?,
            mpp: mpp::MppShop::start(MPP_PRICE_CENTS).await?,
            x402_key: format!("0x{}", hex::encode(rand::random::<[u8; 32]>())),
        })
    }

    /// The daemon's protocol configuration for these providers (loopback allowed for x402).
    pub fn protocol_config(&self) -> Result<ProtocolConfig, ConfigError> {
        let x402_error = |reason: String| ConfigError { protocol: "x402", reason };
        let x402 = X402Config {
            signer: Some(adapters::x402::EvmSigner::from_hex(&self.x402_key).map_err(|e| x402_error(e.to_string()))?),
            allow_private: vec!["127.0.0.1/32"
                .parse()
                .map_err(|e: crate::protocols::x402::BadAddressRange| x402_error(e.to_string()))?],
            ..X402Config::default()
        };
        let acp = AcpConfig::from_json(&self.acp.config_json().to_string())?;
        let file: Ap2File = serde_json::from_value(self.ap2.config_json())
            .map_err(|e| ConfigError { protocol: "ap2", reason: e.to_string() })?;
        let ap2 = Ap2Config { file: Some(file), kek: Some(Kek::generate()), ..Ap2Config::default() };
        let api = ApiConfig::from_json(&self.llm.apis_json().to_string())?;
        let mpp = crate::protocols::mpp::MppConfig {
            psp: Some(crate::protocols::mpp::MppPsp {
                base_url: self.mpp.base().to_owned(),
                secret_key: "sk_sim_owner".to_owned(),
                payment_method: "pm_sim_card".to_owned(),
            }),
            allow_private: vec!["127.0.0.1/32"
                .parse()
                .map_err(|e: crate::protocols::x402::BadAddressRange| x402_error(e.to_string()))?],
            ..Default::default()
        };
        Ok(ProtocolConfig { x402, acp, ap2, api, reserved: Default::default(), mpp, mcp: Default::default() })
    }

    /// Writes the ACP and AP2 configuration files into `dir` and returns the environment a
    /// `spendcap serve` process needs to pay these providers.
    pub fn daemon_env(&self, dir: &Path) -> std::io::Result<Vec<(&'static str, String)>> {
        let acp = dir.join("acp.json");
        let ap2 = dir.join("ap2.json");
        let apis = dir.join("apis.json");
        std::fs::write(&acp, self.acp.config_json().to_string())?;
        std::fs::write(&ap2, self.ap2.config_json().to_string())?;
        std::fs::write(&apis, self.llm.apis_json().to_string())?;
        Ok(vec![
            ("SPENDCAP_X402_PRIVATE_KEY", self.x402_key.clone()),
            ("SPENDCAP_X402_ALLOW_PRIVATE", "127.0.0.1".into()),
            ("SPENDCAP_ACP_CONFIG", acp.display().to_string()),
            ("SPENDCAP_AP2_CONFIG", ap2.display().to_string()),
            ("SPENDCAP_AP2_KEK", hex::encode(rand::random::<[u8; 32]>())),
            ("SPENDCAP_APIS_CONFIG", apis.display().to_string()),
            ("SPENDCAP_MPP_PSP_URL", self.mpp.base().to_owned()),
            ("SPENDCAP_MPP_PSP_KEY", "sk_sim_owner".to_owned()),
            ("SPENDCAP_MPP_PAYMENT_METHOD", "pm_sim_card".to_owned()),
            ("SPENDCAP_MPP_ALLOW_PRIVATE", "127.0.0.1".into()),
        ])
    }
}
