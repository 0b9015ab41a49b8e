//! The PSP that mints Shared Payment Tokens (SPTs) for the `stripe` method: one token per purchase,
//! bounded to the held amount, the challenge's currency, its seller and its expiry, from the
//! owner's saved payment method. The same purchase asks with the same `Idempotency-Key`, so the
//! PSP answers with the same token: a resumed purchase re-sends the same credential.

use std::time::Duration;

use crate::conformance::ConformanceSink;

use super::CONFORMANCE_PROTOCOL;

/// Where tokens are minted (Stripe's issued-token endpoint for agents).
pub const SPT_PATH: &str = "/v1/shared_payment/issued_tokens";

/// The limits a token is minted under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SptRequest {
    pub currency: String,
    /// In the currency's base units (cents), as the challenge states it.
    pub max_amount: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub network_id: String,
}

/// Why no token came back.
#[derive(Debug, thiserror::Error)]
pub enum SptError {
    /// The request may or may not have reached the PSP.
    #[error("the PSP did not answer: {0}")]
    NoAnswer(String),
    /// The PSP answered without a token.
    #[error("the PSP refused to mint a token (HTTP {status}): {detail}")]
    Refused { status: u16, detail: String },
}

/// A client of the PSP's token endpoint. Cheap to clone. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct SptIssuer {
    base_url: String,
    secret_key: String,
    payment_method: String,
    client: reqwest::Client,
    sink: ConformanceSink,
}

impl std::fmt::Debug for SptIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SptIssuer").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl SptIssuer {
    pub fn new(
        base_url: &str,
        secret_key: String,
        payment_method: String,
        timeout: Duration,
        sink: ConformanceSink,
    ) -> Result<SptIssuer, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| err.to_string())?;
        Ok(SptIssuer { base_url: base_url.trim_end_matches('/').to_owned(), secret_key, payment_method, client, sink })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Mints (or, for the same `idempotency_key`, gets back) the token.
    pub async fn mint(&self, request: &SptRequest, idempotency_key: &str) -> Result<String, SptError> {
        let form = [
            ("payment_method", self.payment_method.clone()),
            ("usage_limits[currency]", request.currency.clone()),
            ("usage_limits[max_amount]", request.max_amount.clone()),
            ("usage_limits[expires_at]", request.expires_at.to_string()),
            ("seller_details[network_id]", request.network_id.clone()),
        ];
        self.sink.record(
            CONFORMANCE_PROTOCOL,
            "SptRequest",
            &serde_json::Value::Object(
                form.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone()))).collect(),
            ),
        );
        let answer = self
            .client
            .post(format!("{}{SPT_PATH}", self.base_url))
            .basic_auth(&self.secret_key, Some(""))
            .header("Idempotency-Key", idempotency_key)
            .form(&form)
            .send()
            .await
            .map_err(|err| SptError::NoAnswer(err.without_url().to_string()))?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|err| SptError::NoAnswer(err.without_url().to_string()))?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(SptError::Refused { status: status.as_u16(), detail: text.chars().take(200).collect() });
        }
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|value| value.get("id").and_then(|id| id.as_str()).map(str::to_owned))
            .filter(|id| id.starts_with("spt_"))
            .ok_or_else(|| SptError::Refused {
                status: status.as_u16(),
                detail: "the answer carries no spt_ token id".to_owned(),
            })?;
        Ok(id)
    }
}
