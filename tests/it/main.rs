//! spendcap's one integration-test binary. Tests start their own `redis-server`s.

mod api;
mod concurrency;
mod faults;
mod fire;
mod ledger;
mod revocation;
mod support;
