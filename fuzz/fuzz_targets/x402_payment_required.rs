//! A 402 from an untrusted resource server: the PAYMENT-REQUIRED header (v2) or the JSON body
//! (v1), then the choice of a requirement under the default policy.
#![no_main]
use adapters::x402::{choose, parse_payment_required, Policy};
use adapters::Micros;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = Policy::with_default_assets(Micros::new(1_000_000).expect("constant"), 600);
    let mut headers = http::HeaderMap::new();
    // First byte: 0 → the input is the v2 header value; otherwise it is the v1 body.
    let (as_header, rest) = match data.split_first() {
        Some((0, rest)) => (true, rest),
        Some((_, rest)) => (false, rest),
        None => return,
    };
    let body: &[u8] = if as_header {
        if let Ok(value) = http::HeaderValue::from_bytes(rest) {
            headers.insert("payment-required", value);
        }
        b"{}"
    } else {
        rest
    };
    if let Ok(required) = parse_payment_required(&headers, body) {
        let _ = choose(&required, &policy);
    }
});
