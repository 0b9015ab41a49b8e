//! AP2 v0.1 cart mandates (JSON with W3C PaymentRequest amounts and a merchant JWT).
#![no_main]
use adapters::ap2::{v01, Jwk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = format!("{}/../fixtures/ap2/keys/merchant.public.jwk.json", env!("CARGO_MANIFEST_DIR"));
    let merchant: Jwk =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture key")).expect("fixture key parses");
    let _ = v01::verify_cart_mandate(text, &[merchant], 1_800_000_000);
});
