//! The two forms of the MPP endpoint, as for x402: `POST /v1/mpp/fetch` (the same JSON body as
//! `/v1/x402/fetch`, answered with JSON) and `ANY /v1/mpp/proxy/<url>` (the upstream response
//! verbatim, plus `X-Spendcap-*` headers).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::flow::{self, Delivered, Engine, FetchRequest};
use crate::api::holds::idempotency_key;
use crate::api::{label, AgentAuth, ApiError, ApiJson, AppState, SharedState};
use crate::protocols::x402::destination::{check_url, UrlError};
use crate::protocols::x402::routes::{
    error_response, invalid, json_answer_parts, json_form_parts, max_amount, method, proxy_form, FetchBody,
};
use crate::protocols::x402::upstream::{returned_response_header, Outgoing};
use crate::receipt::Receipt;

/// The path the target URL is appended to in the proxy form.
pub const PROXY_PREFIX: &str = "/v1/mpp/proxy/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MppPaymentStatus {
    /// The server answered with a `Payment-Receipt`; the hold is settled and `receipt` is set.
    Settled,
    /// The server answered without a receipt: the amount stays held (outcome unknown) until
    /// a retry of the same purchase or an admin resolves it.
    Unconfirmed,
}

/// One MPP payment as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MppPaymentView {
    pub status: MppPaymentStatus,
    pub hold_id: String,
    pub amount_micros: u64,
    /// The payment method (`stripe`).
    pub method: String,
    /// The intent (`charge`).
    pub intent: String,
    /// The server's protection space (the payee).
    pub realm: String,
    /// The challenge answered: one purchase, one challenge, however often it is retried.
    pub challenge_id: String,
    pub currency: String,
    /// Unix seconds; the credential (and its hold) end then.
    pub expires_at: u64,
    /// The server receipt's reference (for `stripe`, the PaymentIntent id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The signed, chained spendcap receipt of the settlement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The upstream's answer, JSON form. Returned with HTTP 200 whatever the upstream's status.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
pub struct MppFetchResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    pub payment: Option<MppPaymentView>,
    pub replayed: bool,
}

fn engine(state: &AppState) -> Result<&Engine, ApiError> {
    state.protocols.mpp.engine().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "mpp_not_configured",
            "MPP payments are not configured on this daemon (no SPENDCAP_MPP_PSP_URL)",
        )
    })
}

fn url_error(err: UrlError) -> ApiError {
    match err {
        UrlError::Refused(refused) => {
            ApiError::new(StatusCode::FORBIDDEN, "mpp_destination_forbidden", refused.to_string())
        }
        other => invalid("invalid_url", other.to_string()),
    }
}

#[utoipa::path(post, path = "/v1/mpp/fetch", operation_id = "mpp_fetch", tag = "mpp", request_body = FetchBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "names the purchase; without it, the same task + method + URL + body is the same purchase")),
    responses(
        (status = 200, body = MppFetchResponse, description = "the upstream answered (its own status is in the body)"),
        (status = 402, description = "budget refusal, a policy refusal (mpp_no_acceptable_challenge, mpp_over_payment_maximum) or mpp_payment_rejected"),
        (status = 403, description = "mpp_destination_forbidden"),
        (status = 409, description = "idempotency_in_flight, mpp_credential_expired, mpp_already_paid"),
        (status = 502, description = "unusable 402 (mpp_no_challenge, ...), PSP failure, or mpp_payment_outcome_unknown"),
        (status = 503, description = "mpp_not_configured")),
    security(("agent" = [])))]
pub async fn fetch(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FetchBody>,
) -> Result<Json<MppFetchResponse>, ApiError> {
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
    let delivered = flow::fetch(&state.core, engine, &auth, request).await?;
    Ok(Json(json_response(delivered)))
}

fn json_response(delivered: Delivered) -> MppFetchResponse {
    let (headers, body, body_base64) = json_answer_parts(&delivered.answer);
    MppFetchResponse {
        status: delivered.answer.status.as_u16(),
        headers,
        body,
        body_base64,
        payment: delivered.payment,
        replayed: delivered.replayed,
    }
}

/// `ANY /v1/mpp/proxy/<url>`: the same headers as x402's proxy form.
pub async fn proxy(auth: AgentAuth, State(state): State<SharedState>, request: Request) -> Response {
    match proxy_fetch(&auth, &state, request).await {
        Ok(delivered) => proxy_response(delivered),
        Err(err) => error_response(err),
    }
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
    Ok(flow::fetch(&state.core, engine, auth, request).await?)
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
                MppPaymentStatus::Settled => "settled",
                MppPaymentStatus::Unconfirmed => "unconfirmed",
            };
            spendcap("x-spendcap-payment", status);
            spendcap("x-spendcap-amount-micros", &payment.amount_micros.to_string());
            spendcap("x-spendcap-hold-id", &payment.hold_id);
            spendcap("x-spendcap-challenge-id", &payment.challenge_id);
            if let Some(reference) = &payment.reference {
                spendcap("x-spendcap-reference", reference);
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
