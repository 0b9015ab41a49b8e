//! The two forms of the x402 endpoint: `POST /v1/x402/fetch` (JSON in, JSON out) and
//! `ANY /v1/x402/proxy/<url>` (the upstream response verbatim, plus `X-Spendcap-*` headers).

use std::collections::BTreeMap;

use adapters::Micros;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::destination::{check_url, UrlError};
use super::purchase::{self, Delivered, Engine, FetchRequest};
use super::upstream::{forwarded_request_header, returned_response_header, Outgoing};
use crate::api::holds::idempotency_key;
use crate::api::{label, AgentAuth, ApiError, ApiJson, AppState, SharedState};
use crate::receipt::Receipt;

/// The path the target URL is appended to in the proxy form.
pub const PROXY_PREFIX: &str = "/v1/x402/proxy/";

const TASK_HEADER: &str = "x-spendcap-task";
const MAX_AMOUNT_HEADER: &str = "x-spendcap-max-amount-micros";
const IDEMPOTENCY_HEADER: &str = "x-spendcap-idempotency-key";
const UPSTREAM_AUTHORIZATION_HEADER: &str = "x-spendcap-upstream-authorization";

/// The methods an agent may send upstream (no CONNECT, no TRACE).
const METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];

/// A fetch, JSON form.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct FetchBody {
    /// The URL to fetch, `http` or `https`.
    pub url: String,
    /// The HTTP method; `GET` when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Headers to send upstream (hop-by-hop, `Host`, payment and `X-Spendcap-*` headers are not sent).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The request body as text; or `body_base64` for bytes.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_base64: Option<String>,
    /// The task this spend is attributed to.
    #[serde(default)]
    pub task: String,
    /// The most this call may pay, in micro-USD (the daemon's own per-payment maximum applies too).
    #[serde(default)]
    #[schema(value_type = Option<u64>)]
    pub max_amount_micros: Option<serde_json::Number>,
}

/// The upstream's answer, JSON form. Returned with HTTP 200 whatever the upstream's status.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
pub struct FetchResponse {
    /// The upstream's HTTP status.
    pub status: u16,
    /// The upstream's headers (lowercase names; repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// The upstream's body, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The upstream's body in standard base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// The payment made for this answer; `null` when the upstream asked for none.
    pub payment: Option<PaymentView>,
    /// True when this is the stored answer of an earlier request for the same purchase.
    pub replayed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// The server confirmed the settlement; the hold is settled and `receipt` is set.
    Settled,
    /// The server answered without confirming a settlement; the amount stays held until
    /// `valid_before` (the authorization may still settle), then is released.
    Unconfirmed,
}

/// One x402 payment as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    pub status: PaymentStatus,
    pub hold_id: String,
    pub amount_micros: u64,
    pub network: String,
    pub asset: String,
    pub pay_to: String,
    /// The EIP-3009 nonce: one purchase, one nonce, however often it is retried.
    pub nonce: String,
    /// Unix seconds; the authorization (and its hold) end then.
    pub valid_before: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The signed, chained spendcap receipt of the settlement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// Why the payment is unconfirmed, or why no receipt was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `upto` for a metered payment (absent for `exact`): `amount_micros` is then what the server
    /// settled (once settled) and `maximum_micros` what was authorised and held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_micros: Option<u64>,
}

fn engine(state: &AppState) -> Result<&Engine, ApiError> {
    state.protocols.x402.engine().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "x402_not_configured",
            "x402 payments are not configured on this daemon (no SPENDCAP_X402_PRIVATE_KEY_FILE)",
        )
    })
}

pub(crate) fn invalid(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

fn url_error(err: UrlError) -> ApiError {
    match err {
        UrlError::Refused(refused) => {
            ApiError::new(StatusCode::FORBIDDEN, "x402_destination_forbidden", refused.to_string())
        }
        other => invalid("invalid_url", other.to_string()),
    }
}

pub(crate) fn method(text: &str) -> Result<Method, ApiError> {
    METHODS
        .iter()
        .find(|method| method.as_str().eq_ignore_ascii_case(text))
        .cloned()
        .ok_or_else(|| invalid("invalid_method", format!("method must be one of {METHODS:?}")))
}

pub(crate) fn max_amount(number: &serde_json::Number) -> Result<Micros, ApiError> {
    Micros::from_json_number(number)
        .and_then(|micros| Micros::positive(micros.get()))
        .map_err(|err| invalid(err.code(), format!("max_amount_micros: {err}")))
}

#[utoipa::path(post, path = "/v1/x402/fetch", request_body = FetchBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "names the purchase; without it, the same task + method + URL + body is the same purchase")),
    responses(
        (status = 200, body = FetchResponse, description = "the upstream answered (its own status is in the body)"),
        (status = 402, description = "budget refusal (cap_exceeded, agent_revoked, agent_expired), a policy refusal (x402_over_payment_maximum, x402_unknown_network, ...) or x402_payment_rejected; nothing was paid"),
        (status = 403, description = "x402_destination_forbidden: the URL's host is not public and not allow-listed"),
        (status = 409, description = "idempotency_in_flight, x402_authorization_expired, x402_already_paid"),
        (status = 502, description = "the upstream's 402 was unreadable (x402_bad_json, ...), or x402_payment_outcome_unknown"),
        (status = 503, description = "x402_not_configured: no payment key")),
    security(("agent" = [])))]
pub async fn fetch(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FetchBody>,
) -> Result<Json<FetchResponse>, ApiError> {
    let engine = engine(&state)?;
    let idempotency_key = idempotency_key(&headers)?;
    let method = method(body.method.as_deref().unwrap_or("GET"))?;
    let url = check_url(&body.url, &engine.destinations).map_err(url_error)?;
    let (upstream_headers, request_body) = json_form_parts(&body.headers, body.body, body.body_base64)?;
    let request = FetchRequest {
        outgoing: Outgoing { method, url, headers: upstream_headers, body: request_body },
        task: label("task", &body.task, 128)?,
        max_amount: body.max_amount_micros.as_ref().map(max_amount).transpose()?,
        idempotency_key,
    };
    let delivered = purchase::fetch(&state.core, engine, &auth, request).await?;
    Ok(Json(json_response(delivered)))
}

/// The JSON form's upstream headers (those that are forwarded) and body (text or base64), as
/// x402's and MPP's fetch take them.
pub(crate) fn json_form_parts(
    headers: &BTreeMap<String, String>,
    body: Option<String>,
    body_base64: Option<String>,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let mut upstream_headers = HeaderMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("invalid_header", format!("{name:?} is not a header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid("invalid_header", format!("the value of {name} is not a valid header value")))?;
        if forwarded_request_header(&name) {
            upstream_headers.append(name, value);
        }
    }
    let request_body = match (body, body_base64) {
        (Some(_), Some(_)) => return Err(invalid("invalid_body", "send body or body_base64, not both")),
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => {
            Bytes::from(STANDARD.decode(encoded).map_err(|_| invalid("invalid_body", "body_base64 is not base64"))?)
        }
        (None, None) => Bytes::new(),
    };
    Ok((upstream_headers, request_body))
}

/// An upstream answer's headers for the JSON form (those passed back; repeated ones joined with
/// ", ") and its body as text, or base64 when it is not UTF-8.
pub(crate) fn json_answer_parts(
    answer: &super::upstream::Answer,
) -> (BTreeMap<String, String>, Option<String>, Option<String>) {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &answer.headers {
        if !returned_response_header(name) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let (body, body_base64) = match std::str::from_utf8(&answer.body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (None, Some(STANDARD.encode(&answer.body))),
    };
    (headers, body, body_base64)
}

fn json_response(delivered: Delivered) -> FetchResponse {
    let (headers, body, body_base64) = json_answer_parts(&delivered.answer);
    FetchResponse {
        status: delivered.answer.status.as_u16(),
        headers,
        body,
        body_base64,
        payment: delivered.payment,
        replayed: delivered.replayed,
    }
}

/// `ANY /v1/x402/proxy/<url>`: the same fetch for any HTTP client. The agent's token is the
/// `Authorization` header (not forwarded; `X-Spendcap-Upstream-Authorization` is forwarded as
/// `Authorization`), the task is `X-Spendcap-Task`, the per-call maximum
/// `X-Spendcap-Max-Amount-Micros`, and the purchase key `X-Spendcap-Idempotency-Key` (or
/// `Idempotency-Key`, which is forwarded too).
pub async fn proxy(auth: AgentAuth, State(state): State<SharedState>, request: Request) -> Response {
    match proxy_fetch(&auth, &state, request).await {
        Ok(delivered) => proxy_response(delivered),
        Err(err) => error_response(err),
    }
}

/// A pass-through form's error: the `{code, detail}` body, and the code as `X-Spendcap-Error`
/// (its answers are otherwise the upstream's).
pub(crate) fn error_response(err: ApiError) -> Response {
    let code = HeaderValue::from_str(err.code).ok();
    let mut response = err.into_response();
    if let Some(code) = code {
        response.headers_mut().insert(HeaderName::from_static("x-spendcap-error"), code);
    }
    response
}

/// The target URL in the request's raw path after `prefix` (still percent-encoded, as the agent
/// wrote it), plus the query. A client that merged the `//` after the scheme is forgiven.
pub(crate) fn proxy_target_under(uri: &Uri, prefix: &str) -> Result<String, ApiError> {
    let raw = uri.path().strip_prefix(prefix).unwrap_or_default();
    let mut target = String::with_capacity(raw.len() + 8);
    match ["https:/", "http:/"].iter().find(|scheme| raw.starts_with(*scheme) && !raw[scheme.len()..].starts_with('/'))
    {
        Some(scheme) => {
            target.push_str(scheme);
            target.push('/');
            target.push_str(&raw[scheme.len()..]);
        }
        None => target.push_str(raw),
    }
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    if target.is_empty() {
        return Err(invalid("invalid_url", format!("append the URL to fetch to {prefix}")));
    }
    Ok(target)
}

pub(crate) fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|value| value.to_str().map_err(|_| invalid("invalid_header", format!("{name} must be visible ASCII"))))
        .transpose()
}

async fn proxy_fetch(auth: &AgentAuth, state: &AppState, request: Request) -> Result<Delivered, ApiError> {
    let engine = engine(state)?;
    let form =
        proxy_form(state, request, PROXY_PREFIX, |target| check_url(target, &engine.destinations).map_err(url_error))
            .await?;
    let request = FetchRequest {
        outgoing: Outgoing { method: form.method, url: form.url, headers: form.headers, body: form.body },
        task: form.task,
        max_amount: form.max_amount,
        idempotency_key: form.idempotency_key,
    };
    Ok(purchase::fetch(&state.core, engine, auth, request).await?)
}

/// A proxy form's request, read: x402's and MPP's take the same headers.
pub(crate) struct ProxyForm {
    pub url: reqwest::Url,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub task: String,
    pub max_amount: Option<Micros>,
    pub idempotency_key: Option<String>,
}

/// Reads a proxy form's request under `prefix`; `check` turns the target into the URL fetched.
pub(crate) async fn proxy_form(
    state: &AppState,
    request: Request,
    prefix: &str,
    check: impl FnOnce(&str) -> Result<reqwest::Url, ApiError>,
) -> Result<ProxyForm, ApiError> {
    let (parts, body) = request.into_parts();
    let url = check(&proxy_target_under(&parts.uri, prefix)?)?;
    let method = method(parts.method.as_str())?;
    let headers = &parts.headers;
    let task = label("task", header_text(headers, TASK_HEADER)?.unwrap_or_default(), 128)?;
    let max_amount = match header_text(headers, MAX_AMOUNT_HEADER)? {
        None => None,
        Some(text) => {
            let number: serde_json::Number = text
                .trim()
                .parse()
                .map_err(|_| invalid("amount_malformed", format!("{MAX_AMOUNT_HEADER} must be an integer")))?;
            Some(max_amount(&number)?)
        }
    };
    let idempotency_key = match header_text(headers, IDEMPOTENCY_HEADER)? {
        Some(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Some(key.to_owned())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "X-Spendcap-Idempotency-Key must be 1 to 255 visible ASCII characters",
            ))
        }
        None => idempotency_key(headers)?,
    };
    let mut upstream_headers = HeaderMap::new();
    for (name, value) in headers {
        if *name != header::AUTHORIZATION && forwarded_request_header(name) {
            upstream_headers.append(name.clone(), value.clone());
        }
    }
    if let Some(authorization) = headers.get(UPSTREAM_AUTHORIZATION_HEADER) {
        upstream_headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    let limit = state.limits.body_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    })?;
    Ok(ProxyForm { url, method, headers: upstream_headers, body, task, max_amount, idempotency_key })
}

fn proxy_response(delivered: Delivered) -> Response {
    let Delivered { answer, payment, replayed } = delivered;
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    for (name, value) in &answer.headers {
        if returned_response_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut spendcap = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    match &payment {
        None => {
            spendcap("x-spendcap-payment", "none");
            spendcap("x-spendcap-amount-micros", "0");
        }
        Some(payment) => {
            let status = match payment.status {
                PaymentStatus::Settled => "settled",
                PaymentStatus::Unconfirmed => "unconfirmed",
            };
            spendcap("x-spendcap-payment", status);
            spendcap("x-spendcap-amount-micros", &payment.amount_micros.to_string());
            spendcap("x-spendcap-hold-id", &payment.hold_id);
            spendcap("x-spendcap-nonce", &payment.nonce);
            if let Some(transaction) = &payment.transaction {
                spendcap("x-spendcap-transaction", transaction);
            }
            if let Some(receipt) = payment.receipt.as_ref().and_then(|r| serde_json::to_vec(r).ok()) {
                spendcap("x-spendcap-receipt", &URL_SAFE_NO_PAD.encode(receipt));
            }
        }
    }
    if replayed {
        spendcap("x-spendcap-replayed", "true");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<String, &'static str> {
        proxy_target_under(&uri.parse::<Uri>().expect("test URI"), PROXY_PREFIX).map_err(|err| err.code)
    }

    #[test]
    fn the_proxy_target_is_the_raw_path_and_query() {
        assert_eq!(
            target("/v1/x402/proxy/https://api.example.com/a%20b/c?city=Paris&x=%2F"),
            Ok("https://api.example.com/a%20b/c?city=Paris&x=%2F".to_owned())
        );
        assert_eq!(target("/v1/x402/proxy/https:/api.example.com/x"), Ok("https://api.example.com/x".to_owned()));
        assert_eq!(target("/v1/x402/proxy/http:/127.0.0.1:8080/"), Ok("http://127.0.0.1:8080/".to_owned()));
        assert_eq!(target("/v1/x402/proxy/"), Err("invalid_url"));
    }
}
