//! Request bodies and credentials of the HTTP API, as the daemon parses them.
#![no_main]
use adapters::Micros;
use libfuzzer_sys::fuzz_target;
use spendcap::api::agents::{CreateAgentRequest, RevokeRequest, SetCapRequest};
use spendcap::api::holds::{HoldRequestBody, SettleRequest, VoidRequest};
use spendcap::identity::{AgentId, AgentToken, HoldId};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<HoldRequestBody>(data) {
        let _ = Micros::from_json_number(&body.amount_micros);
    }
    if let Ok(body) = serde_json::from_slice::<SettleRequest>(data) {
        let _ = Micros::from_json_number(&body.amount_micros);
    }
    if let Ok(body) = serde_json::from_slice::<CreateAgentRequest>(data) {
        let _ = Micros::from_json_number(&body.cap_micros);
    }
    let _ = serde_json::from_slice::<SetCapRequest>(data);
    let _ = serde_json::from_slice::<RevokeRequest>(data);
    let _ = serde_json::from_slice::<VoidRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<AgentToken>();
        let _ = text.parse::<AgentId>();
        let _ = text.parse::<HoldId>();
    }
});
