//! Request fingerprints for idempotency: what an idempotency key stands for.
//!
//! Every endpoint that takes an `Idempotency-Key` fingerprints the *whole* request the agent sent
//! (every field, after parsing into its typed form, so that formatting and key order do not
//! matter) with [`of`], and the ledger refuses the same key with another fingerprint
//! (`idempotency_conflict`). One format for every protocol: the SHA-256 of the value's RFC 8785
//! canonical JSON, prefixed with a scope (the endpoint) so that two endpoints never share one.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// `<scope>:<hex SHA-256 of the RFC 8785 canonical JSON of value>`.
///
/// Canonicalisation only fails for values JSON cannot represent (a map with non-string keys, a
/// non-finite float); request types never contain those, and such a value still gets a stable
/// fingerprint of its scope alone rather than a panic.
pub fn of(scope: &str, value: &impl Serialize) -> String {
    let bytes = serde_json_canonicalizer::to_vec(value).unwrap_or_default();
    format!("{scope}:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn key_order_and_spacing_do_not_matter_but_every_field_does() {
        let a = super::of("x402.fetch", &json!({"url": "https://a.example/", "task": "t1", "max": 5}));
        let b = super::of("x402.fetch", &json!({"max": 5, "task": "t1", "url": "https://a.example/"}));
        assert_eq!(a, b);
        assert_ne!(a, super::of("x402.fetch", &json!({"url": "https://a.example/", "task": "t2", "max": 5})));
        assert_ne!(a, super::of("x402.fetch", &json!({"url": "https://a.example/", "task": "t1", "max": 6})));
        assert_ne!(a, super::of("acp.checkout", &json!({"url": "https://a.example/", "task": "t1", "max": 5})));
        assert!(a.starts_with("x402.fetch:") && a.len() == "x402.fetch:".len() + 64);
    }
}
