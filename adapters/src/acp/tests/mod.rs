//! Tests for the ACP adapter. Merchants and PSPs are wiremock servers over real HTTP, answering
//! with the fixtures in `fixtures/acp/`, which are built from the official 2026-04-17 examples.

mod checks;
mod clients;
mod wire;

use std::path::PathBuf;
use std::time::Duration;

use crate::conformance::ConformanceSink;

use super::{ApiKey, CardDetails, CardFunding, CheckoutSession, IdempotencyKey, ProviderConfig, RetryPolicy};

pub(super) const TEST_CARD_NUMBER: &str = "4242424242424242";
pub(super) const TEST_CVC: &str = "223";

pub(super) fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/acp")
}

pub(super) fn fixture(name: &str) -> String {
    let path = fixtures_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading fixture {}: {error}", path.display()))
}

pub(super) fn session(name: &str) -> CheckoutSession {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|error| panic!("parsing fixture {name}: {error}"))
}

/// Where the tests record what they send: `$SPENDCAP_CONFORMANCE_DIR`, or the workspace's
/// `target/conformance`, which `../shared/tools/conform` validates.
pub(super) fn conformance_sink() -> ConformanceSink {
    ConformanceSink::to_dir(ConformanceSink::test_dir())
}

pub(super) fn test_card() -> CardDetails {
    CardDetails::new(TEST_CARD_NUMBER, "11", "2026", CardFunding::Credit)
        .and_then(|card| card.with_cvc(TEST_CVC))
        .expect("the test card is valid")
        .with_name("Jane Doe")
        .with_brand("visa")
}

pub(super) fn provider_config(base_url: &str, api_key: &str) -> ProviderConfig {
    ProviderConfig {
        base_url: base_url.to_owned(),
        api_key: ApiKey::new(api_key).expect("test api key"),
        timeout: Duration::from_secs(5),
        retry: RetryPolicy::default(),
        resolver: None,
    }
}

pub(super) fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new(text).expect("test idempotency key")
}

/// A fresh directory under the system temp dir, removed when dropped.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("spendcap-acp-{label}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
