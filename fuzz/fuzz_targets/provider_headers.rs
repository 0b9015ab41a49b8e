//! Provider response headers that decide what the daemon does next: an ACP merchant's or PSP's
//! `Retry-After` (the wait before the next attempt, after any time already waited: it must
//! never overflow or exceed the bound), and x402's `PAYMENT-REQUIRED` / `PAYMENT-RESPONSE`.
#![no_main]
use std::time::Duration;

use adapters::acp::{next_wait, RetryPolicy, MAX_PROVIDER_WAIT};
use adapters::x402::{parse_payment_required, parse_settlement, X402Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First 12 bytes: the time already waited (seconds, nanoseconds) and the attempt number;
    // the rest is the header value.
    if data.len() < 12 {
        return;
    }
    let (head, value) = data.split_at(12);
    let secs = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let attempt = u32::from(u16::from_le_bytes([head[8], head[9]]));
    let nanos = u32::from(u16::from_le_bytes([head[10], head[11]]));
    let waited = Duration::new(secs, nanos);
    let Ok(value) = http::HeaderValue::from_bytes(value) else { return };
    for policy in [
        RetryPolicy::default(),
        RetryPolicy { max_attempts: u32::MAX, max_total_wait: Duration::MAX, default_wait: Duration::MAX },
    ] {
        if let Some(wait) = next_wait(Some(&value), waited, attempt, &policy) {
            assert!(wait <= MAX_PROVIDER_WAIT, "a provider's wait is bounded");
        }
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("payment-required", value.clone());
    headers.insert("payment-response", value.clone());
    headers.insert("x-payment-response", value);
    let _ = parse_payment_required(&headers, b"{}");
    let _ = parse_settlement(&headers, X402Version::V2);
    let _ = parse_settlement(&headers, X402Version::V1);
});
