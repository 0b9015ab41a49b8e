//! The merchant's checkout API: create, retrieve, complete and cancel checkout sessions.

use reqwest::Method;
use serde::Serialize;

use crate::conformance::ConformanceSink;

use super::error::{AcpError, Provider};
use super::http::{Answer, IdempotencyKey, ProviderConfig, Transport};
use super::types::{
    CancelSessionRequest, CheckoutSession, CheckoutSessionCompleteRequest, CheckoutSessionCreateRequest,
};
use super::CONFORMANCE_PROTOCOL;

/// A client for one merchant. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct MerchantClient {
    transport: Transport,
    sink: ConformanceSink,
}

impl MerchantClient {
    pub fn new(config: ProviderConfig, sink: ConformanceSink) -> Result<MerchantClient, AcpError> {
        Ok(MerchantClient { transport: Transport::new(config, Provider::Merchant)?, sink })
    }

    /// `POST /checkout_sessions`.
    pub async fn create_session(
        &self,
        request: &CheckoutSessionCreateRequest,
        idempotency_key: &IdempotencyKey,
    ) -> Result<CheckoutSession, AcpError> {
        let body = self.record(request, "CheckoutSessionCreateRequest")?;
        let answer =
            self.transport.send(Method::POST, "/checkout_sessions", Some(&body), Some(idempotency_key)).await?;
        self.parse_session(&answer, None)
    }

    /// `GET /checkout_sessions/{id}`: the latest authoritative state.
    pub async fn retrieve_session(&self, checkout_session_id: &str) -> Result<CheckoutSession, AcpError> {
        let path = session_path(checkout_session_id, "")?;
        let answer = self.transport.send(Method::GET, &path, None, None).await?;
        self.parse_session(&answer, Some(checkout_session_id))
    }

    /// `POST /checkout_sessions/{id}/complete`: pays, and on success returns the session with
    /// `status: completed` and its order.
    pub async fn complete_session(
        &self,
        checkout_session_id: &str,
        request: &CheckoutSessionCompleteRequest,
        idempotency_key: &IdempotencyKey,
    ) -> Result<CheckoutSession, AcpError> {
        let path = session_path(checkout_session_id, "/complete")?;
        let body = self.record(request, "CheckoutSessionCompleteRequest")?;
        let answer = self.transport.send(Method::POST, &path, Some(&body), Some(idempotency_key)).await?;
        self.parse_session(&answer, Some(checkout_session_id))
    }

    /// `POST /checkout_sessions/{id}/cancel`. A merchant answers 405 for a session already
    /// completed or canceled; that arrives as [`AcpError::Merchant`].
    pub async fn cancel_session(
        &self,
        checkout_session_id: &str,
        request: &CancelSessionRequest,
        idempotency_key: &IdempotencyKey,
    ) -> Result<CheckoutSession, AcpError> {
        let path = session_path(checkout_session_id, "/cancel")?;
        let body = self.record(request, "CancelSessionRequest")?;
        let answer = self.transport.send(Method::POST, &path, Some(&body), Some(idempotency_key)).await?;
        self.parse_session(&answer, Some(checkout_session_id))
    }

    /// Serializes a request body once, and records it for conformance checking. The credential
    /// token in a complete request is replaced in the recorded copy: the files are test output,
    /// and a token is a secret.
    fn record<T: Serialize>(&self, request: &T, message_type: &str) -> Result<serde_json::Value, AcpError> {
        let body = serde_json::to_value(request)
            .map_err(|error| AcpError::InvalidInput { field: "request body", reason: error.to_string() })?;
        let mut recorded = body.clone();
        if let Some(token) = recorded.pointer_mut("/payment_data/instrument/credential/token") {
            *token = serde_json::Value::String("<redacted>".into());
        }
        self.sink.record(CONFORMANCE_PROTOCOL, message_type, &recorded);
        Ok(body)
    }

    fn parse_session(&self, answer: &Answer, expected_id: Option<&str>) -> Result<CheckoutSession, AcpError> {
        let session: CheckoutSession = serde_json::from_slice(&answer.body).map_err(|error| {
            self.transport.malformed(answer.status, format!("body is not a checkout session: {error}"))
        })?;
        if let Some(expected) = expected_id {
            if session.id != expected {
                return Err(AcpError::SessionMismatch { expected: expected.to_owned(), got: session.id });
            }
        }
        Ok(session)
    }
}

/// The path of a session endpoint. Session ids come from agents, so they are checked to be one
/// plain path segment: nothing an agent sends can steer the request to another endpoint.
fn session_path(checkout_session_id: &str, suffix: &str) -> Result<String, AcpError> {
    let plain = checkout_session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if checkout_session_id.is_empty() || checkout_session_id.len() > 255 || !plain {
        return Err(AcpError::InvalidInput {
            field: "checkout session id",
            reason: "must be 1 to 255 characters of letters, digits, '_' and '-'".into(),
        });
    }
    Ok(format!("/checkout_sessions/{checkout_session_id}{suffix}"))
}
