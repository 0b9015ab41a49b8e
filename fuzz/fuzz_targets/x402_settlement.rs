//! A settlement response from an untrusted server, as JSON and as a header.
#![no_main]
use adapters::x402::{decode_settlement_json, parse_settlement, X402Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_settlement_json(data);
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let mut headers = http::HeaderMap::new();
        headers.insert("payment-response", value.clone());
        headers.insert("x-payment-response", value);
        let _ = parse_settlement(&headers, X402Version::V2);
        let _ = parse_settlement(&headers, X402Version::V1);
    }
});
