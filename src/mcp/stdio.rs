//! `spendcap mcp`: the MCP server of one agent on stdin/stdout, as an MCP host launches it. It
//! reaches the daemon over HTTP with the agent's token and holds no other credential.

use std::sync::Arc;

use clap::Args;
use rmcp::ServiceExt as _;

use super::backend::Remote;
use super::{Backend, SpendcapMcp};
use crate::identity::AgentToken;

/// `spendcap mcp` flags.
#[derive(Args, Debug, Clone)]
pub struct McpArgs {
    /// The daemon's URL.
    #[arg(long, env = "SPENDCAP_URL", default_value = "http://127.0.0.1:8402")]
    pub url: String,
    /// The agent's token (`sct_…`). Never the admin token: the server acts as this one agent.
    #[arg(long = "agent-token", env = "SPENDCAP_AGENT_TOKEN", hide_env_values = true)]
    pub token: TokenText,
}

/// The token as given. Checked in [`run`], not by clap, whose error for a bad value would quote
/// it (and a mistaken admin token would end up in the host's logs); `Debug` redacts it.
#[derive(Clone)]
pub struct TokenText(String);

impl std::str::FromStr for TokenText {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<TokenText, Self::Err> {
        Ok(TokenText(text.trim().to_owned()))
    }
}

impl std::fmt::Debug for TokenText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("SPENDCAP_AGENT_TOKEN must be an agent token (sct_…); spendcap mcp never takes the admin token")]
    NotAnAgentToken,
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("MCP: {0}")]
    Mcp(String),
}

/// Serves MCP on stdin/stdout until the host closes it.
pub async fn run(args: McpArgs) -> Result<(), StdioError> {
    let token: AgentToken = args.token.0.parse().map_err(|_| StdioError::NotAnAgentToken)?;
    let remote = Remote::new(&args.url, token)?;
    let server = SpendcapMcp::new(Backend::Remote(Arc::new(remote)));
    let running = server.serve(rmcp::transport::stdio()).await.map_err(|err| StdioError::Mcp(err.to_string()))?;
    running.waiting().await.map_err(|err| StdioError::Mcp(err.to_string()))?;
    Ok(())
}
