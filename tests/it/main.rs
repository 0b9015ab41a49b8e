//! spendcap's one integration-test binary. Tests start their own `redis-server`s.

mod acp;
mod alerts;
mod ap2;
mod api;
mod clock;
mod concurrency;
mod controls;
mod dashboard;
mod demo;
mod deploy;
mod edges;
mod faults;
mod fire;
mod keyed_api;
mod layering;
mod ledger;
mod mcp;
mod metrics;
mod readme;
mod reports;
mod revocation;
mod security;
mod support;
mod unknown;
mod x402;
