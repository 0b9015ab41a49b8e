//! spendcap: every AI agent gets its own payment identity with a hard spending cap, line-item
//! cost attribution and one-call revocation. See ARCHITECTURE.md for the map.

pub mod alerts;
pub mod api;
pub mod app;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod csv;
pub mod demo;
pub mod doctor;
pub mod fingerprint;
pub mod fleet;
pub mod human;
pub mod identity;
pub mod ledger;
pub mod log;
pub mod mcp;
pub mod metrics;
pub mod operators;
pub mod outcome;
pub mod pay;
pub mod protocols;
pub mod receipt;
pub mod report;
pub mod roles;
pub mod series;
pub mod server;
pub mod sim;
pub mod unacked;
