//! The PSP's delegate-payment API: the owner's card in, a delegated payment token out.

use reqwest::Method;

use crate::conformance::ConformanceSink;

use super::delegate::{DelegatePaymentRequest, DelegatePaymentResponse};
use super::error::{AcpError, Provider};
use super::http::{IdempotencyKey, ProviderConfig, Transport};
use super::CONFORMANCE_PROTOCOL;

/// A client for the PSP that vaults the owner's card. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PspClient {
    transport: Transport,
    sink: ConformanceSink,
}

impl PspClient {
    pub fn new(config: ProviderConfig, sink: ConformanceSink) -> Result<PspClient, AcpError> {
        Ok(PspClient { transport: Transport::new(config, Provider::Psp)?, sink })
    }

    /// `POST /agentic_commerce/delegate_payment`: returns the delegated token (`vt_...`) the
    /// merchant charges, within the request's allowance.
    pub async fn delegate_payment(
        &self,
        request: &DelegatePaymentRequest,
        idempotency_key: &IdempotencyKey,
    ) -> Result<DelegatePaymentResponse, AcpError> {
        let body = serde_json::to_value(request)
            .map_err(|error| AcpError::InvalidInput { field: "request body", reason: error.to_string() })?;
        self.sink.record(CONFORMANCE_PROTOCOL, "DelegatePaymentRequest", &redacted_card(&body));
        let answer = self
            .transport
            .send(Method::POST, "/agentic_commerce/delegate_payment", Some(&body), Some(idempotency_key))
            .await?;
        let response: DelegatePaymentResponse = serde_json::from_slice(&answer.body).map_err(|error| {
            self.transport.malformed(answer.status, format!("body is not a delegate_payment response: {error}"))
        })?;
        if response.id.expose().is_empty() {
            return Err(self.transport.malformed(answer.status, "the delegated token id is empty".into()));
        }
        Ok(response)
    }
}

/// A copy of a delegate-payment body fit to write to disk: the card number keeps only its last
/// four digits and the CVC none, each masked to its own length so the copy still validates.
fn redacted_card(body: &serde_json::Value) -> serde_json::Value {
    let mut copy = body.clone();
    if let Some(serde_json::Value::String(number)) = copy.pointer_mut("/payment_method/number") {
        let keep = number.len().saturating_sub(4);
        *number = number.char_indices().map(|(i, c)| if i < keep { '*' } else { c }).collect();
    }
    if let Some(serde_json::Value::String(cvc)) = copy.pointer_mut("/payment_method/cvc") {
        *cvc = "*".repeat(cvc.len());
    }
    copy
}
