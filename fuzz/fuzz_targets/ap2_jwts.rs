//! AP2 JWTs and SD-JWTs from untrusted merchants and users: a merchant checkout JWT, open
//! mandates (two inputs split at the first NUL byte), and receipts.
#![no_main]
use adapters::ap2::{verify_checkout_jwt, verify_checkout_receipt, verify_open_mandates, verify_payment_receipt, Jwk};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

fn key(name: &str) -> Jwk {
    let path = format!("{}/../fixtures/ap2/keys/{name}.public.jwk.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture key")).expect("fixture key parses")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let merchant = key("merchant");
    let user = key("user");
    let agent = key("agent");
    let _ = verify_checkout_jwt(text, std::slice::from_ref(&merchant), NOW);
    let _ = verify_checkout_receipt(text, std::slice::from_ref(&merchant), None);
    let _ = verify_payment_receipt(text, std::slice::from_ref(&merchant), None);
    let (checkout, payment) = text.split_once('\0').unwrap_or((text, text));
    let _ = verify_open_mandates(checkout, payment, std::slice::from_ref(&user), &agent, NOW);
});
