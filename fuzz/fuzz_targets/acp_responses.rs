//! A merchant's checkout session and error objects: parsing, then every check the daemon runs
//! on a session before and after paying.
#![no_main]
use adapters::acp::{
    completed_order, pick_delegate_handler, require_ready, session_total, verify_unchanged, CheckoutSession,
    CurrencyPolicy, ErrorObject,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ErrorObject>(data);
    let Ok(session) = serde_json::from_slice::<CheckoutSession>(data) else { return };
    let policy = CurrencyPolicy::usd_only();
    let _ = require_ready(&session);
    let _ = pick_delegate_handler(&session, "stripe");
    let _ = completed_order(&session);
    if let Ok(total) = session_total(&session, &policy) {
        let _ = verify_unchanged(&total, &session);
    }
});
