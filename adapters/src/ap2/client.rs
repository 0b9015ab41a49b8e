//! HTTP clients for the two AP2 providers the daemon talks to after closing the mandates: the
//! Credential Provider (Payment Mandate in, payment token out) and the merchant (token and
//! Checkout Mandate in, receipts out). AP2 fixes no HTTP binding; the JSON one used here is
//! documented in the module docs of [`crate::ap2`].
//!
//! Every mandate sent is also given, decoded, to the [`ConformanceSink`] under protocol `ap2`.
//! Receipts are received, not sent, and are not recorded: they are checked against their schema
//! here, and the official `receipt_status.json` cannot be resolved by `conform` (its `$id` is
//! `receipt-status.json` while the receipts reference `types/receipt_status.json`).

use std::fmt;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::error::Ap2Error;
use super::pay::ClosedMandates;
use super::receipt::{verify_checkout_receipt, verify_payment_receipt};
use super::types::{CheckoutReceipt, Jwk, PaymentReceipt, ReceiptStatus};
use crate::conformance::ConformanceSink;
use crate::net::{read_limited, ReadError};

/// Largest provider answer read; AP2 answers are a few kilobytes.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A payment token from the Credential Provider. A bearer secret: `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentCredential {
    token: String,
}

impl PaymentCredential {
    pub fn new(token: String) -> PaymentCredential {
        PaymentCredential { token }
    }

    /// The token itself, to send to the merchant.
    pub fn expose(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for PaymentCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PaymentCredential(<redacted>)")
    }
}

/// The Credential Provider's answer to a Payment Mandate.
#[derive(Debug)]
pub enum CredentialOutcome {
    /// A payment token scoped to this payment.
    Issued(PaymentCredential),
    /// A verified Payment Receipt with status `Error`: the mandate was refused.
    Refused(PaymentReceipt),
}

/// The merchant's answer to a checkout completion.
#[derive(Clone, Debug)]
pub struct Completion {
    pub checkout_receipt: CheckoutReceipt,
    /// Absent when the merchant refused the checkout before any payment was attempted.
    pub payment_receipt: Option<PaymentReceipt>,
}

impl Completion {
    /// Paid only when both receipts say `Success`; settle the hold then, void it otherwise.
    pub fn is_paid(&self) -> bool {
        self.checkout_receipt.status == ReceiptStatus::Success
            && self.payment_receipt.as_ref().is_some_and(|r| r.status == ReceiptStatus::Success)
    }
}

/// Where a provider is and how long to wait for it.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// `http(s)://host[:port][/prefix]`; the binding's paths are appended to it.
    pub base_url: String,
    pub timeout: Duration,
    /// The daemon's resolver (refuses reserved addresses when connecting); `None`: the system's.
    pub resolver: Option<crate::net::DnsResolver>,
}

fn http_client(config: &ProviderConfig) -> Result<(reqwest::Client, Url), Ap2Error> {
    let base = Url::parse(&config.base_url).map_err(|e| Ap2Error::InvalidConfig(format!("base URL: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
        return Err(Ap2Error::InvalidConfig("base URL must be http(s)".into()));
    }
    let http = crate::net::with_resolver(reqwest::Client::builder(), config.resolver.as_ref())
        .timeout(config.timeout)
        .build()
        .map_err(|e| Ap2Error::InvalidConfig(format!("HTTP client: {e}")))?;
    Ok((http, base))
}

fn endpoint(base: &Url, segments: &[&str]) -> Result<Url, Ap2Error> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| Ap2Error::InvalidConfig("base URL cannot take a path".into()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// Sends one JSON POST and reads a bounded JSON answer of any status.
async fn post_json<B: Serialize, R: for<'de> Deserialize<'de>>(
    http: &reqwest::Client,
    url: Url,
    body: &B,
) -> Result<(StatusCode, R), Ap2Error> {
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| Ap2Error::ProviderUnreachable(e.without_url().to_string()))?;
    let status = response.status();
    let bytes = read_answer(response, MAX_RESPONSE_BYTES).await?;
    let parsed = serde_json::from_slice(&bytes).map_err(|_| {
        if status.is_success() {
            Ap2Error::ProviderBadResponse(format!("HTTP {status} with a body that is not the documented JSON"))
        } else {
            Ap2Error::ProviderError { status: status.as_u16(), detail: "no JSON body".into() }
        }
    })?;
    Ok((status, parsed))
}

/// A provider's whole answer, at most `limit` bytes, with AP2's errors for what stops it.
pub async fn read_answer(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Ap2Error> {
    read_limited(response, limit).await.map_err(|error| match error {
        ReadError::TooLarge { .. } => Ap2Error::ProviderBadResponse("answer too large".into()),
        ReadError::Transport(e) => Ap2Error::ProviderUnreachable(e.without_url().to_string()),
    })
}

/// `error` / `error_description` a provider may send with an HTTP error instead of a receipt.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

impl ErrorBody {
    fn detail(&self) -> String {
        let mut detail = self.error.clone().unwrap_or_else(|| "no error code".into());
        if let Some(description) = &self.error_description {
            detail.push_str(": ");
            detail.push_str(description);
        }
        detail.chars().take(300).collect()
    }
}

/// Client for a Credential Provider.
#[derive(Clone, Debug)]
pub struct CredentialProviderClient {
    http: reqwest::Client,
    base: Url,
    receipt_keys: Vec<Jwk>,
    sink: ConformanceSink,
}

#[derive(Serialize)]
struct CredentialRequest<'a> {
    payment_mandate: &'a str,
    checkout_hash: &'a str,
    open_checkout_hash: &'a str,
}

#[derive(Deserialize)]
struct CredentialAnswer {
    #[serde(default)]
    payment_token: Option<String>,
    #[serde(default)]
    payment_receipt: Option<String>,
    #[serde(flatten)]
    error: ErrorBody,
}

impl CredentialProviderClient {
    /// `receipt_keys` verify the Payment Receipts the Credential Provider signs when it refuses.
    pub fn new(
        config: &ProviderConfig,
        receipt_keys: Vec<Jwk>,
        sink: ConformanceSink,
    ) -> Result<CredentialProviderClient, Ap2Error> {
        let (http, base) = http_client(config)?;
        Ok(CredentialProviderClient { http, base, receipt_keys, sink })
    }

    /// Presents the open and closed Payment Mandates; returns the payment token, or the
    /// Credential Provider's verified refusal.
    pub async fn request_credential(&self, closed: &ClosedMandates) -> Result<CredentialOutcome, Ap2Error> {
        self.sink.record("ap2", "open_payment_mandate", &closed.open_payment_mandate);
        if let Ok(payment_mandate) = serde_json::to_value(&closed.payment_mandate) {
            self.sink.record("ap2", "payment_mandate", &payment_mandate);
        }
        let url = endpoint(&self.base, &["ap2", "v0.2", "payment-credentials"])?;
        let request = CredentialRequest {
            payment_mandate: &closed.payment_mandate_jwt,
            checkout_hash: &closed.checkout_hash,
            open_checkout_hash: &closed.open_checkout_hash,
        };
        let (status, answer): (StatusCode, CredentialAnswer) = post_json(&self.http, url, &request).await?;
        if let Some(receipt_jwt) = &answer.payment_receipt {
            let receipt = verify_payment_receipt(receipt_jwt, &self.receipt_keys, Some(&closed.payment_reference))?;
            if receipt.status == ReceiptStatus::Error {
                return Ok(CredentialOutcome::Refused(receipt));
            }
        }
        match answer.payment_token {
            Some(token) if status.is_success() && !token.is_empty() => {
                Ok(CredentialOutcome::Issued(PaymentCredential::new(token)))
            }
            _ if status.is_success() => Err(Ap2Error::ProviderBadResponse("no payment_token in the answer".into())),
            _ => Err(Ap2Error::ProviderError { status: status.as_u16(), detail: answer.error.detail() }),
        }
    }
}

/// Client for a merchant's AP2 checkout completion.
#[derive(Clone, Debug)]
pub struct MerchantClient {
    http: reqwest::Client,
    base: Url,
    merchant_keys: Vec<Jwk>,
    processor_keys: Vec<Jwk>,
    sink: ConformanceSink,
}

#[derive(Serialize)]
struct CompleteRequest<'a> {
    checkout_mandate: &'a str,
    payment_token: &'a str,
    checkout_hash: &'a str,
    open_checkout_hash: &'a str,
}

#[derive(Deserialize)]
struct CompleteAnswer {
    #[serde(default)]
    checkout_receipt: Option<String>,
    #[serde(default)]
    payment_receipt: Option<String>,
    #[serde(flatten)]
    error: ErrorBody,
}

impl MerchantClient {
    /// `merchant_keys` verify Checkout Receipts; `processor_keys` verify the Merchant Payment
    /// Processor's Payment Receipts, which the merchant passes on.
    pub fn new(
        config: &ProviderConfig,
        merchant_keys: Vec<Jwk>,
        processor_keys: Vec<Jwk>,
        sink: ConformanceSink,
    ) -> Result<MerchantClient, Ap2Error> {
        let (http, base) = http_client(config)?;
        Ok(MerchantClient { http, base, merchant_keys, processor_keys, sink })
    }

    /// Completes the checkout with the payment token and the Checkout Mandates; returns the
    /// verified receipts (whatever their status: read [`Completion::is_paid`]).
    pub async fn complete_checkout(
        &self,
        closed: &ClosedMandates,
        credential: &PaymentCredential,
    ) -> Result<Completion, Ap2Error> {
        self.sink.record("ap2", "open_checkout_mandate", &closed.open_checkout_mandate);
        if let Ok(checkout_mandate) = serde_json::to_value(&closed.checkout_mandate) {
            self.sink.record("ap2", "checkout_mandate", &checkout_mandate);
        }
        let url = endpoint(&self.base, &["ap2", "v0.2", "checkouts", &closed.checkout_id, "complete"])?;
        let request = CompleteRequest {
            checkout_mandate: &closed.checkout_mandate_jwt,
            payment_token: credential.expose(),
            checkout_hash: &closed.checkout_hash,
            open_checkout_hash: &closed.open_checkout_hash,
        };
        let (status, answer): (StatusCode, CompleteAnswer) = post_json(&self.http, url, &request).await?;
        let Some(checkout_jwt) = &answer.checkout_receipt else {
            if status.is_success() {
                return Err(Ap2Error::ProviderBadResponse("no checkout_receipt in the answer".into()));
            }
            return Err(Ap2Error::ProviderError { status: status.as_u16(), detail: answer.error.detail() });
        };
        let checkout_receipt =
            verify_checkout_receipt(checkout_jwt, &self.merchant_keys, Some(&closed.checkout_reference))?;
        let payment_receipt = match &answer.payment_receipt {
            Some(jwt) => Some(verify_payment_receipt(jwt, &self.processor_keys, Some(&closed.payment_reference))?),
            None => None,
        };
        Ok(Completion { checkout_receipt, payment_receipt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap2_payment_credential_debug_redacts_the_token() {
        let credential = PaymentCredential::new("tok_secret_123".into());
        assert_eq!(format!("{credential:?}"), "PaymentCredential(<redacted>)");
        assert_eq!(credential.expose(), "tok_secret_123");
    }

    #[test]
    fn ap2_endpoints_append_to_the_base_path() {
        let base = Url::parse("http://cp.example:8080/prefix/").expect("url");
        let url = endpoint(&base, &["ap2", "v0.2", "checkouts", "a/b c", "complete"]).expect("endpoint");
        assert_eq!(url.as_str(), "http://cp.example:8080/prefix/ap2/v0.2/checkouts/a%2Fb%20c/complete");
        let config =
            ProviderConfig { base_url: "mailto:x@example.com".into(), timeout: Duration::from_secs(1), resolver: None };
        assert_eq!(http_client(&config).map(|_| ()).map_err(|e| e.code()), Err("ap2_invalid_config"));
    }
}
