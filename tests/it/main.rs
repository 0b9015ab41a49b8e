//! spendcap's one integration-test binary. Tests start their own `redis-server`s.

mod alerts;
mod api;
mod concurrency;
mod controls;
mod faults;
mod ledger;
mod revocation;
mod support;
