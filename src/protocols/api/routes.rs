//! The HTTP face of keyed APIs, `ANY /v1/apis/{name}/{*path}`: reads the agent's request (its
//! token as the API key, the raw path, the body within the limit) into a [`flow::ApiRequest`],
//! and answers with the upstream's response verbatim plus `X-Spendcap-*` headers, or with the
//! failure's `{code, detail}` body and `X-Spendcap-Error`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::flow::{self, ApiRequest, Delivered, Outcome, Paid, API_KEY_HEADER};
use crate::api::holds::idempotency_key;
use crate::api::{label, AgentAuth, ApiError, SharedState};
use crate::identity::AgentToken;
use crate::protocols::x402::upstream::returned_response_header;

const PREFIX: &str = "/v1/apis/";
const TASK_HEADER: &str = "x-spendcap-task";

/// `ANY /v1/apis/{name}/{*path}`.
pub async fn call(State(state): State<SharedState>, request: Request) -> Response {
    let response = match run(state, request).await {
        Ok(Outcome::Delivered(delivered)) => return respond(*delivered),
        Ok(Outcome::Replayed(reply)) => {
            let code = reply.body["code"].as_str().and_then(|code| HeaderValue::from_str(code).ok());
            (crate::api::status::reply(reply), code)
        }
        Err(err) => return crate::protocols::x402::routes::error_response(err),
    };
    let (mut response, code) = response;
    if let Some(code) = code {
        response.headers_mut().insert(HeaderName::from_static("x-spendcap-error"), code);
    }
    response
}

/// The agent, by its token as `Authorization: Bearer` (OpenAI-style SDKs) or `x-api-key`
/// (Anthropic-style SDKs). The ledger checks the token inside the hold.
fn agent(headers: &HeaderMap) -> Result<AgentAuth, ApiError> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = text(&header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let key = text(&HeaderName::from_static(API_KEY_HEADER)).map(str::trim);
    let token: AgentToken = bearer.or(key).and_then(|t| t.parse().ok()).ok_or_else(ApiError::unauthorized)?;
    Ok(AgentAuth { agent: token.agent().clone(), token_hash: token.hash() })
}

/// The API's name and the rest of the raw path (still percent-encoded, starting with `/`).
fn split_path(path: &str) -> Result<(&str, &str), ApiError> {
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let (name, rest) =
        rest.split_once('/').map_or((rest, ""), |(name, rest)| (name, &path[path.len() - rest.len() - 1..]));
    let dot_segment = rest.split('/').any(|segment| {
        let lower = segment.to_ascii_lowercase().replace("%2e", ".");
        lower == "." || lower == ".."
    });
    if dot_segment || rest.contains('\\') || rest.to_ascii_lowercase().contains("%2f") {
        return Err(ApiError::bad_request(
            "api_invalid_path",
            "the path may not contain '.' or '..' segments or encoded slashes",
        ));
    }
    Ok((name, rest))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|value| {
            value.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_header",
                    format!("{name} must be visible ASCII"),
                )
            })
        })
        .transpose()
}

async fn run(state: SharedState, request: Request) -> Result<Outcome, ApiError> {
    let engine = state.protocols.api.engine().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_not_configured",
            "keyed APIs are not configured on this daemon (no SPENDCAP_APIS_CONFIG)",
        )
    })?;
    let (parts, body) = request.into_parts();
    let auth = agent(&parts.headers)?;
    let (name, path) = split_path(parts.uri.path())?;
    let target = flow::resolve(&engine, name, &parts.method, path, parts.uri.query())?;
    let task = label("task", header_text(&parts.headers, TASK_HEADER)?.unwrap_or_default(), 128)?;
    let idempotency_key = idempotency_key(&parts.headers)?;
    let limit = engine.max_request_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    })?;
    let request = ApiRequest { api: target, method: parts.method, headers: parts.headers, body, task, idempotency_key };
    Ok(flow::call(&state.core, &engine, &auth, request).await?)
}

/// The upstream's answer (status, headers, body) with spendcap's own headers.
fn respond(delivered: Delivered) -> Response {
    let Delivered { status, headers: upstream, body, hold, paid } = delivered;
    let body = match body {
        flow::Body::Whole(bytes) => Body::from(bytes),
        flow::Body::Stream(stream) => Body::from_stream(stream),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    for (name, value) in &upstream {
        if returned_response_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut spendcap = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    spendcap("x-spendcap-hold-id", hold.as_str());
    match paid {
        Paid::Settled { amount, receipt } => {
            spendcap("x-spendcap-payment", "settled");
            spendcap("x-spendcap-amount-micros", &amount.get().to_string());
            if let Some(receipt) = receipt.and_then(|r| serde_json::to_vec(&r).ok()) {
                spendcap("x-spendcap-receipt", &URL_SAFE_NO_PAD.encode(receipt));
            }
        }
        Paid::Voided => {
            spendcap("x-spendcap-payment", "voided");
            spendcap("x-spendcap-amount-micros", "0");
        }
        Paid::Failed => spendcap("x-spendcap-payment", "unsettled"),
        Paid::Pending => spendcap("x-spendcap-payment", "pending"),
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_after_the_name_is_kept_raw_and_dot_segments_are_refused() {
        assert_eq!(split_path("/v1/apis/openai/v1/chat/completions").ok(), Some(("openai", "/v1/chat/completions")));
        assert_eq!(split_path("/v1/apis/search/q%20x").ok(), Some(("search", "/q%20x")));
        for bad in
            ["/v1/apis/openai/../admin", "/v1/apis/openai/v1/%2e%2E/x", "/v1/apis/openai/a%2Fb", "/v1/apis/o/./x"]
        {
            assert_eq!(split_path(bad).map_err(|e| e.code).err(), Some("api_invalid_path"), "{bad}");
        }
    }
}
