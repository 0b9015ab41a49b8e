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
    #[arg(long = "agent-token", env = "SPENDCAP_AGENT_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: AgentToken,
}

fn parse_token(text: &str) -> Result<AgentToken, String> {
    text.trim()
        .parse()
        .map_err(|_| "SPENDCAP_AGENT_TOKEN must be an agent token (sct_…), not an admin token".to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("MCP: {0}")]
    Mcp(String),
}

/// Serves MCP on stdin/stdout until the host closes it.
pub async fn run(args: McpArgs) -> Result<(), StdioError> {
    let remote = Remote::new(&args.url, args.token)?;
    let server = SpendcapMcp::new(Backend::Remote(Arc::new(remote)));
    let running = server.serve(rmcp::transport::stdio()).await.map_err(|err| StdioError::Mcp(err.to_string()))?;
    running.waiting().await.map_err(|err| StdioError::Mcp(err.to_string()))?;
    Ok(())
}
