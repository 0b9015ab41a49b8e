//! The MCP face: spendcap's payments as tools a model can call, over the Model Context Protocol
//! (the official Rust SDK, `rmcp`).
//!
//! Two ways in, one set of tools:
//!
//! - `spendcap mcp` ([`stdio`]): a stdio MCP server for one agent, launched by an MCP host. It
//!   talks to a daemon over HTTP with the agent's token (`SPENDCAP_URL`,
//!   `SPENDCAP_AGENT_TOKEN`) and holds nothing else: no admin token, no payment key.
//! - `/mcp` on the daemon ([`http`]): streamable HTTP, authenticated with the agent's bearer token
//!   on every request, dispatching each tool call to the daemon's own routes in process.
//!
//! The modules: [`tools`] (the tools, their typed parameters and descriptions), `backend` (where
//! a call goes: the daemon's router in process, or a daemon over HTTP), `outcome` (the one
//! mapping of an API answer to a tool result), `explain` (what each code means and what can be
//! done).
//!
//! Architecture invariant: the MCP face decides nothing about money. Every tool call is one call
//! of the agent API, made with the agent's own token, so the flows, the ledger's checks and the
//! idempotency rules are exactly the HTTP API's; the face only translates, in `outcome`.

mod backend;
mod explain;
pub mod http;
mod outcome;
pub mod stdio;
mod tools;

pub use self::backend::Backend;
pub use self::explain::{explain, Explanation};
pub use self::tools::{SpendcapMcp, OWN_TOOLS};
