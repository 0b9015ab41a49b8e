//! The HTTP conventions ACP merchants and PSPs share: headers, idempotent retries of an in-flight
//! request, bounded bodies, and the flat error object.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use super::error::{AcpError, Provider, ProviderError};
use super::types::ErrorObject;
use super::API_VERSION;
use crate::net::{read_limited, ReadError};

/// The largest response body read. A checkout session is a few tens of kilobytes; anything far
/// larger is not one, and must not be buffered without bound.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A provider's bearer credential. `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Result<ApiKey, AcpError> {
        let key = key.into();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AcpError::InvalidInput {
                field: "api key",
                reason: "must be non-empty printable ASCII without spaces".into(),
            });
        }
        Ok(ApiKey(key))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The `Idempotency-Key` of one POST. The caller derives it from the hold and the step (for
/// example `<hold id>:complete`), so that retrying a purchase repeats the same requests and the
/// provider answers them once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// ACP keys are opaque strings of at most 255 characters; they travel in a header, so only
    /// printable ASCII without spaces is accepted.
    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, AcpError> {
        let key = key.into();
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AcpError::InvalidInput {
                field: "idempotency key",
                reason: "must be 1 to 255 printable ASCII characters without spaces".into(),
            });
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How long to keep retrying a request the provider reports as still in flight (HTTP 409,
/// `idempotency_in_flight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The most time spent waiting between attempts, summed. A `Retry-After` that would exceed it
    /// ends the retries at once instead of sleeping in vain.
    pub max_total_wait: Duration,
    /// The wait when the provider sends no usable `Retry-After`.
    pub default_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, max_total_wait: Duration::from_secs(10), default_wait: Duration::from_secs(1) }
    }
}

/// Where a provider is and how to talk to it.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    /// The API root, e.g. `https://merchant.example/acp`; endpoint paths are appended to it.
    pub base_url: String,
    pub api_key: ApiKey,
    /// The limit for one attempt, connection to last byte.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// The daemon's resolver (refuses reserved addresses when connecting); `None`: the system's.
    pub resolver: Option<crate::net::DnsResolver>,
}

/// One provider endpoint family, with its credentials and conventions.
#[derive(Clone, Debug)]
pub(crate) struct Transport {
    client: reqwest::Client,
    base_url: String,
    api_key: ApiKey,
    retry: RetryPolicy,
    provider: Provider,
}

/// A successful answer: its status and body.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Transport {
    pub fn new(config: ProviderConfig, provider: Provider) -> Result<Transport, AcpError> {
        let parsed = Url::parse(&config.base_url).map_err(|error| AcpError::InvalidInput {
            field: "base url",
            reason: format!("{:?} is not a URL: {error}", config.base_url),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(AcpError::InvalidInput {
                field: "base url",
                reason: format!("{:?} must be an http(s) URL without query or fragment", config.base_url),
            });
        }
        let client = crate::net::with_resolver(reqwest::Client::builder(), config.resolver.as_ref())
            .timeout(config.timeout)
            // A redirect would re-send the credentials and body somewhere the operator did not
            // configure; a provider that redirects is answering wrongly.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| AcpError::InvalidInput { field: "http client", reason: error.to_string() })?;
        Ok(Transport {
            client,
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_key: config.api_key,
            retry: config.retry,
            provider,
        })
    }

    /// Sends one request and returns the 2xx answer. A POST carries `idempotency_key` and `body`;
    /// while the provider reports that key in flight, the same request is sent again after the
    /// provider's `Retry-After`, within the retry policy.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<Answer, AcpError> {
        let url = format!("{}{path}", self.base_url);
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|error| AcpError::InvalidInput { field: "request body", reason: error.to_string() })?;
        // One Request-Id for all attempts, so the provider's logs tie the retries together.
        let request_id = format!("req_{:032x}", rand::random::<u128>());
        let mut waited = Duration::ZERO;
        let mut attempt = 1;
        loop {
            let mut request = self
                .client
                .request(method.clone(), &url)
                .bearer_auth(&self.api_key.0)
                .header("API-Version", API_VERSION)
                .header("Request-Id", &request_id);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key.as_str());
            }
            if let Some(body) = &body {
                request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json")).body(body.clone());
            }
            let response = request.send().await.map_err(|error| self.transport_error(&error))?;
            let status = response.status();
            let retry_after = response.headers().get(RETRY_AFTER).cloned();
            let body = self.read_body(response).await?;
            if status.is_success() {
                return Ok(Answer { status: status.as_u16(), body });
            }
            let error = self.provider_error(status, &body)?;
            let in_flight = status == StatusCode::CONFLICT && error.code == "idempotency_in_flight";
            let wait = next_wait(retry_after.as_ref(), waited, attempt, &self.retry).filter(|_| in_flight);
            let Some(wait) = wait else {
                return Err(match self.provider {
                    Provider::Merchant => AcpError::Merchant(error),
                    Provider::Psp => AcpError::Psp(error),
                });
            };
            tokio::time::sleep(wait).await;
            waited = waited.saturating_add(wait);
            attempt = attempt.saturating_add(1);
        }
    }

    async fn read_body(&self, response: reqwest::Response) -> Result<Vec<u8>, AcpError> {
        let status = response.status().as_u16();
        read_limited(response, MAX_BODY_BYTES).await.map_err(|error| match error {
            ReadError::TooLarge { .. } => self.malformed(status, format!("body exceeds {MAX_BODY_BYTES} bytes")),
            ReadError::Transport(error) => self.transport_error(&error),
        })
    }

    fn provider_error(&self, status: StatusCode, body: &[u8]) -> Result<ProviderError, AcpError> {
        let object: ErrorObject = serde_json::from_slice(body).map_err(|error| {
            self.malformed(status.as_u16(), format!("error body is not an ACP error object: {error}"))
        })?;
        Ok(ProviderError {
            http_status: status.as_u16(),
            error_type: object.error_type,
            code: object.code,
            message: object.message,
            param: object.param,
        })
    }

    pub fn malformed(&self, http_status: u16, reason: String) -> AcpError {
        AcpError::MalformedResponse { provider: self.provider, http_status, reason }
    }

    fn transport_error(&self, error: &reqwest::Error) -> AcpError {
        if error.is_timeout() {
            return AcpError::Timeout(self.provider);
        }
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        // A failed connection means no byte of the request reached the provider.
        AcpError::Transport { provider: self.provider, reason, request_may_have_arrived: !error.is_connect() }
    }
}

/// The longest wait a provider's `Retry-After` can ask for, whatever the retry policy says.
pub const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(60);

/// The wait before attempt `attempt + 1` of a request the provider reports in flight, after
/// `waited` in all so far, or `None` when the retries end (attempts used up, or the wait would
/// pass the policy's total). The provider chooses the wait, so any number may arrive here: it is
/// bounded by [`MAX_PROVIDER_WAIT`] and added without overflow.
pub fn next_wait(
    retry_after: Option<&HeaderValue>,
    waited: Duration,
    attempt: u32,
    policy: &RetryPolicy,
) -> Option<Duration> {
    let wait = retry_after.and_then(parse_retry_after).unwrap_or(policy.default_wait).min(MAX_PROVIDER_WAIT);
    (attempt < policy.max_attempts && waited.saturating_add(wait) <= policy.max_total_wait).then_some(wait)
}

/// `Retry-After` in seconds, as ACP servers send it. The HTTP-date form is not used by ACP and
/// falls back to the policy's default wait.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    value.to_str().ok()?.trim().parse::<u64>().ok().map(Duration::from_secs)
}
