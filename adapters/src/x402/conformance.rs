//! Conformance capture of what the x402 adapter sends: each payment and the requirement it pays,
//! as decoded JSON, under the official SDK model names that `../shared/tools/conform` checks.

use serde::Serialize;

use super::policy::{Choice, ChosenRequirement};
use super::wire::PaymentPayload;
use crate::conformance::ConformanceSink;

/// Records a sent payment and the requirement it answers: `PaymentPayload` and
/// `PaymentRequirements` for v2, `PaymentPayloadV1` and `PaymentRequirementsV1` for v1.
pub fn record_payment(sink: &ConformanceSink, payment: &PaymentPayload, choice: &Choice) {
    let (payload_type, requirements_type) = match payment {
        PaymentPayload::V1(_) => ("PaymentPayloadV1", "PaymentRequirementsV1"),
        PaymentPayload::V2(_) | PaymentPayload::UptoV2(_) => ("PaymentPayload", "PaymentRequirements"),
    };
    record(sink, payload_type, payment);
    match choice.requirement() {
        ChosenRequirement::V1(requirement) => record(sink, requirements_type, requirement),
        ChosenRequirement::V2(requirement) => record(sink, requirements_type, requirement),
    }
}

fn record(sink: &ConformanceSink, message_type: &str, message: &impl Serialize) {
    // Our wire types always serialize; were one not to, capture must not change what happens.
    if let Ok(json) = serde_json::to_value(message) {
        sink.record("x402", message_type, &json);
    }
}
