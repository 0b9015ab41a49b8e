//! The protocol endpoints: each module turns one protocol's payment flow into `pay` steps and
//! owns its configuration (flags and `SPENDCAP_*` variables), its service state and its routes.

pub mod acp;
pub mod ap2;
pub mod api;
pub mod mcp_upstream;
pub mod mpp;
pub mod reserved;
pub mod x402;

use axum::Router;
use clap::Args;

use crate::api::SharedState;

/// Command-line flags of every protocol, flattened into `serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProtocolArgs {
    #[command(flatten)]
    pub x402: x402::X402Args,
    #[command(flatten)]
    pub acp: acp::AcpArgs,
    #[command(flatten)]
    pub ap2: ap2::Ap2Args,
    #[command(flatten)]
    pub api: api::ApiArgs,
    #[command(flatten)]
    pub mpp: mpp::MppArgs,
    #[command(flatten)]
    pub mcp: mcp_upstream::McpUpstreamArgs,
}

/// The configured protocols.
#[derive(Default)]
pub struct ProtocolConfig {
    pub x402: x402::X402Config,
    pub acp: acp::AcpConfig,
    pub ap2: ap2::Ap2Config,
    /// Addresses no outbound client may reach (Redis, the daemon); filled in at start-up.
    pub reserved: reserved::Reserved,
    pub api: api::ApiConfig,
    pub mpp: mpp::MppConfig,
    /// Upstream MCP servers whose tools agents call through the daemon (paid MCP tools).
    pub mcp: mcp_upstream::McpUpstreamConfig,
}

/// What each protocol needs at run time (clients, keys), built once at start-up.
pub struct Protocols {
    pub x402: x402::X402Service,
    pub acp: acp::AcpService,
    pub ap2: ap2::Ap2Service,
    pub reserved: reserved::Reserved,
    /// Every provider base URL of the configuration (ACP, AP2, keyed APIs), checked against `reserved`.
    pub provider_urls: Vec<String>,
    pub api: api::ApiService,
    pub mpp: mpp::MppService,
    pub mcp: mcp_upstream::McpUpstreams,
}

/// Why the protocol configuration is unusable; start-up fails with this.
#[derive(Debug, thiserror::Error)]
#[error("{protocol} configuration: {reason}")]
pub struct ConfigError {
    pub protocol: &'static str,
    pub reason: String,
}

impl ProtocolConfig {
    pub fn from_args(args: &ProtocolArgs) -> Result<ProtocolConfig, ConfigError> {
        Ok(ProtocolConfig {
            x402: x402::X402Config::from_args(&args.x402)?,
            acp: acp::AcpConfig::from_args(&args.acp)?,
            ap2: ap2::Ap2Config::from_args(&args.ap2)?,
            reserved: reserved::Reserved::default(),
            api: api::ApiConfig::from_args(&args.api)?,
            mpp: mpp::MppConfig::from_args(&args.mpp)?,
            mcp: mcp_upstream::McpUpstreamConfig::from_args(&args.mcp)?,
        })
    }
}

impl ProtocolConfig {
    /// The base URL of every provider the configuration names (ACP PSP and merchants; AP2
    /// Credential Provider, merchants and v0.1 processor).
    pub fn provider_urls(&self) -> Vec<String> {
        let mut urls = Vec::new();
        if let Some(file) = &self.acp.file {
            urls.push(file.psp.base_url.clone());
            urls.extend(file.merchants.iter().map(|m| m.base_url.clone()));
        }
        if let Some(file) = &self.ap2.file {
            urls.push(file.credential_provider.base_url.clone());
            urls.extend(file.merchants.iter().map(|m| m.base_url.clone()));
            urls.extend(file.v01.iter().map(|v| v.processor_url.clone()));
        }
        if let Some(file) = &self.api.file {
            urls.extend(file.apis.iter().map(|api| api.base_url.to_string()));
        }
        if let Some(psp) = &self.mpp.psp {
            urls.push(psp.base_url.clone());
        }
        urls
    }
}

impl Protocols {
    pub fn build(mut config: ProtocolConfig) -> Result<Protocols, ConfigError> {
        // Provider clients refuse the reserved addresses when they connect, not only at start-up.
        config.acp.reserved = config.reserved.clone();
        config.ap2.reserved = config.reserved.clone();
        let provider_urls = config.provider_urls();
        // Upstream MCP servers are reached like x402 resource servers: the same destination
        // rules and timeouts.
        let mcp_destinations = x402::destination::Destinations::new(config.x402.allow_private.clone())
            .with_reserved(config.reserved.clone());
        let mcp = mcp_upstream::McpUpstreams::build(
            config.mcp,
            mcp_destinations,
            config.x402.connect_timeout,
            config.x402.timeout,
        )?;
        Ok(Protocols {
            mcp,
            provider_urls,
            x402: x402::X402Service::build(config.x402, config.reserved.clone())?,
            acp: acp::AcpService::build(config.acp)?,
            ap2: ap2::Ap2Service::build(config.ap2)?,
            api: api::ApiService::build(config.api, config.reserved.clone())?,
            mpp: mpp::MppService::build(config.mpp, config.reserved.clone())?,
            reserved: config.reserved,
        })
    }
}

pub fn router() -> Router<SharedState> {
    Router::new()
        .merge(x402::router())
        .merge(acp::router())
        .merge(ap2::router())
        .merge(api::router())
        .merge(mpp::router())
        .merge(mcp_upstream::routes::router())
}
