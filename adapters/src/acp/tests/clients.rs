//! The merchant and PSP clients against wiremock servers over real HTTP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::super::{
    completed_order, pick_delegate_handler, require_ready, session_total, verify_unchanged, AcpError, CancelReason,
    CancelSessionRequest, CheckoutSessionCompleteRequest, CheckoutSessionCreateRequest, CurrencyPolicy,
    DelegatePaymentRequest, Delegation, Item, MerchantClient, PspClient, RetryPolicy, RiskSignal, SessionStatus,
    API_VERSION,
};
use super::{conformance_sink, fixture, key, provider_config, test_card, TempDir, TEST_CARD_NUMBER, TEST_CVC};
use crate::conformance::ConformanceSink;

const MERCHANT_KEY: &str = "sk_test_merchant_key";
const PSP_KEY: &str = "sk_test_psp_key";
const SESSION: &str = "checkout_session_123";
const COMPLETE_PATH: &str = "/checkout_sessions/checkout_session_123/complete";

fn json_response(status: u16, fixture_name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(fixture_name), "application/json")
}

fn merchant(server: &MockServer) -> MerchantClient {
    merchant_with(server, |_| {}, conformance_sink())
}

fn merchant_with(
    server: &MockServer,
    adjust: impl FnOnce(&mut super::super::ProviderConfig),
    sink: ConformanceSink,
) -> MerchantClient {
    let mut config = provider_config(&server.uri(), MERCHANT_KEY);
    adjust(&mut config);
    MerchantClient::new(config, sink).expect("merchant client")
}

fn psp(server: &MockServer, sink: ConformanceSink) -> PspClient {
    PspClient::new(provider_config(&server.uri(), PSP_KEY), sink).expect("psp client")
}

fn header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.headers.get(name).and_then(|value| value.to_str().ok())
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.expect("request recording is on")
}

fn complete_request() -> CheckoutSessionCompleteRequest {
    CheckoutSessionCompleteRequest::with_delegated_token(
        "card_tokenized",
        super::super::DelegatedToken::new("vt_01J8Z3WXYZ9ABC"),
        None,
    )
}

fn merchant_error(error: &AcpError) -> (u16, &str, &str, Option<&str>) {
    let provider = error.provider_error().unwrap_or_else(|| panic!("not a provider error: {error:?}"));
    (provider.http_status, provider.error_type.as_str(), provider.code.as_str(), provider.param.as_deref())
}

#[tokio::test]
async fn acp_retrieve_sends_credentials_and_version_and_reads_the_session() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/checkout_sessions/checkout_session_123"))
        .respond_with(json_response(200, "session_ready.json"))
        .expect(1)
        .mount(&server)
        .await;

    let session = merchant(&server).retrieve_session(SESSION).await.expect("session");
    assert_eq!(session.status, SessionStatus::ReadyForPayment);
    assert_eq!(session_total(&session, &CurrencyPolicy::usd_only()).map(|t| t.amount.get()), Ok(4_800_000));

    let received = requests(&server).await;
    let request = &received[0];
    assert_eq!(header(request, "authorization"), Some("Bearer sk_test_merchant_key"));
    assert_eq!(header(request, "api-version"), Some(API_VERSION));
    assert!(header(request, "request-id").is_some_and(|id| id.starts_with("req_") && id.len() > 20));
    assert_eq!(header(request, "idempotency-key"), None, "a GET is idempotent by itself");
}

#[tokio::test]
async fn acp_complete_posts_the_token_with_the_callers_idempotency_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(200, "session_completed.json"))
        .expect(1)
        .mount(&server)
        .await;

    let completed = merchant(&server)
        .complete_session(SESSION, &complete_request(), &key("hold_01:complete"))
        .await
        .expect("completed");
    assert_eq!(completed_order(&completed).map(|order| order.order_id), Some("ord_abc123"));

    let received = requests(&server).await;
    let request = &received[0];
    assert_eq!(header(request, "idempotency-key"), Some("hold_01:complete"));
    assert_eq!(header(request, "content-type"), Some("application/json"));
    assert_eq!(header(request, "authorization"), Some("Bearer sk_test_merchant_key"));
    assert_eq!(header(request, "api-version"), Some("2026-04-17"));
    assert!(header(request, "request-id").is_some());
    let body: serde_json::Value = serde_json::from_slice(&request.body).expect("json body");
    assert_eq!(
        body,
        serde_json::json!({
            "payment_data": {
                "handler_id": "card_tokenized",
                "instrument": { "type": "card", "credential": { "type": "spt", "token": "vt_01J8Z3WXYZ9ABC" } }
            }
        })
    );
}

#[tokio::test]
async fn acp_an_in_flight_request_is_retried_after_retry_after_with_the_same_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(200, "session_completed.json"))
        .mount(&server)
        .await;

    let started = Instant::now();
    let completed = merchant(&server)
        .complete_session(SESSION, &complete_request(), &key("hold_02:complete"))
        .await
        .expect("completed after the retry");
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was not honoured: {:?}", started.elapsed());
    assert_eq!(completed.status, SessionStatus::Completed);

    let received = requests(&server).await;
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(header(request, "idempotency-key"), Some("hold_02:complete"));
    }
    assert_eq!(header(&received[0], "request-id"), header(&received[1], "request-id"));
    assert_eq!(received[0].body, received[1].body, "a retry repeats the request exactly");
}

#[tokio::test]
async fn acp_in_flight_retries_are_bounded_in_attempts_and_in_waiting() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "0"))
        .mount(&server)
        .await;
    let retry = RetryPolicy { max_attempts: 3, max_total_wait: Duration::from_secs(5), ..RetryPolicy::default() };
    let client = merchant_with(&server, |config| config.retry = retry, conformance_sink());
    let error =
        client.complete_session(SESSION, &complete_request(), &key("hold_03:complete")).await.expect_err("busy");
    assert_eq!(error.code(), "acp_merchant_error");
    assert_eq!(merchant_error(&error), (409, "invalid_request", "idempotency_in_flight", None));
    assert!(error.outcome_unknown(), "the first request may still complete: the hold must stay");
    assert_eq!(requests(&server).await.len(), 3);

    // A Retry-After beyond the total wait budget ends the retries at once, without sleeping.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "30"))
        .mount(&server)
        .await;
    let client = merchant_with(&server, |config| config.retry = retry, conformance_sink());
    let started = Instant::now();
    let error =
        client.complete_session(SESSION, &complete_request(), &key("hold_04:complete")).await.expect_err("busy");
    assert_eq!(merchant_error(&error).2, "idempotency_in_flight");
    assert!(started.elapsed() < Duration::from_secs(5), "slept {:?}", started.elapsed());
    assert_eq!(requests(&server).await.len(), 1);
}

#[tokio::test]
async fn acp_merchant_errors_pass_through_with_their_code_and_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(400, "error_requires_3ds.json"))
        .mount(&server)
        .await;
    let error = merchant(&server)
        .complete_session(SESSION, &complete_request(), &key("hold_05:complete"))
        .await
        .expect_err("refused");
    assert_eq!(error.code(), "acp_merchant_error");
    assert_eq!(merchant_error(&error), (400, "invalid_request", "requires_3ds", Some("$.authentication_result")));
    assert!(error.to_string().contains("requires issuer authentication"), "{error}");
    assert!(!error.outcome_unknown(), "a 4xx refusal is definite: the hold can be voided");
    assert_eq!(requests(&server).await.len(), 1, "only an in-flight conflict is retried");

    // A key reused with another body is a permanent error, not retried either.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(json_response(422, "error_idempotency_conflict.json").insert_header("Retry-After", "0"))
        .mount(&server)
        .await;
    let items = vec![Item::new("item_123")];
    let error = merchant(&server)
        .create_session(&CheckoutSessionCreateRequest::new(items, "usd"), &key("hold_06:create"))
        .await
        .expect_err("conflict");
    assert_eq!(merchant_error(&error), (422, "invalid_request", "idempotency_conflict", None));
    assert_eq!(requests(&server).await.len(), 1);

    // A server error leaves the outcome open.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_json(serde_json::json!({
            "type": "service_unavailable", "code": "maintenance", "message": "Back soon"
        })))
        .mount(&server)
        .await;
    let error = merchant(&server)
        .complete_session(SESSION, &complete_request(), &key("hold_07:complete"))
        .await
        .expect_err("unavailable");
    assert_eq!(merchant_error(&error), (503, "service_unavailable", "maintenance", None));
    assert!(error.outcome_unknown());
}

#[tokio::test]
async fn acp_a_slow_merchant_is_a_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(200, "session_completed.json").set_delay(Duration::from_secs(3)))
        .mount(&server)
        .await;
    let client = merchant_with(&server, |config| config.timeout = Duration::from_millis(200), conformance_sink());
    let started = Instant::now();
    let error =
        client.complete_session(SESSION, &complete_request(), &key("hold_08:complete")).await.expect_err("slow");
    assert_eq!(error, AcpError::Timeout(super::super::Provider::Merchant));
    assert_eq!(error.code(), "acp_timeout");
    assert!(error.outcome_unknown(), "the merchant may have charged before the answer was lost");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn acp_malformed_answers_are_errors_not_panics() {
    let cases: [(u16, &str, &str); 5] = [
        (200, "session_malformed_missing_fields.json", ""),
        (200, "session_malformed_total_string.json", ""),
        (200, "", "<html>upstream error</html>"),
        (502, "", "<html>bad gateway</html>"),
        (404, "", "{\"error\": \"not found\"}"),
    ];
    for (status, fixture_name, raw) in cases {
        let server = MockServer::start().await;
        let body = if fixture_name.is_empty() { raw.to_owned() } else { fixture(fixture_name) };
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status).set_body_raw(body, "application/json"))
            .mount(&server)
            .await;
        let error = merchant(&server).retrieve_session(SESSION).await.expect_err("malformed");
        assert_eq!(error.code(), "acp_malformed_response", "HTTP {status} {fixture_name}{raw}: {error}");
        assert!(matches!(error, AcpError::MalformedResponse { http_status, .. } if http_status == status));
    }

    // A body far beyond any checkout session is not buffered.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(vec![b' '; 3 * 1024 * 1024], "application/json"))
        .mount(&server)
        .await;
    let error = merchant(&server).retrieve_session(SESSION).await.expect_err("too big");
    assert!(error.to_string().contains("exceeds"), "{error}");
}

#[tokio::test]
async fn acp_an_answer_for_another_session_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/checkout_sessions/cs_other"))
        .respond_with(json_response(200, "session_ready.json"))
        .mount(&server)
        .await;
    let error = merchant(&server).retrieve_session("cs_other").await.expect_err("mismatch");
    assert_eq!(error, AcpError::SessionMismatch { expected: "cs_other".into(), got: "checkout_session_123".into() });
}

#[tokio::test]
async fn acp_session_ids_cannot_steer_the_request() {
    let server = MockServer::start().await;
    Mock::given(wiremock::matchers::any()).respond_with(json_response(200, "session_ready.json")).mount(&server).await;
    let client = merchant(&server);
    for id in ["../agentic_commerce/delegate_payment", "cs_1/cancel", "cs_1?x=1", "", "cs 1", "cs_1%2F"] {
        let error = client.retrieve_session(id).await.expect_err("refused");
        assert_eq!(error.code(), "acp_invalid_input", "{id:?}");
    }
    assert!(requests(&server).await.is_empty(), "nothing was sent");
}

#[tokio::test]
async fn acp_an_unreachable_provider_is_a_transport_error_with_a_known_outcome() {
    // A port that was free a moment ago, with nothing listening on it now.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let client = MerchantClient::new(provider_config(&uri, MERCHANT_KEY), conformance_sink()).expect("client");
    let error =
        client.complete_session(SESSION, &complete_request(), &key("hold_09:complete")).await.expect_err("down");
    assert_eq!(error.code(), "acp_transport_error", "{error:?}");
    assert!(!error.outcome_unknown(), "a refused connection carried nothing to the merchant");
}

#[tokio::test]
async fn acp_create_and_cancel_sessions() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/checkout_sessions"))
        .respond_with(json_response(201, "session_ready.json"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/checkout_sessions/checkout_session_123/cancel"))
        .respond_with(json_response(200, "session_canceled.json"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/checkout_sessions/checkout_session_123/cancel"))
        .respond_with(ResponseTemplate::new(405).set_body_json(serde_json::json!({
            "type": "invalid_request", "code": "session_canceled", "message": "The session is already canceled"
        })))
        .mount(&server)
        .await;
    let client = merchant(&server);

    let request = CheckoutSessionCreateRequest::new(vec![Item::new("item_123")], "USD");
    let created = client.create_session(&request, &key("hold_10:create")).await.expect("created");
    assert_eq!((created.id.as_str(), created.status.clone()), (SESSION, SessionStatus::ReadyForPayment));

    let cancel = CancelSessionRequest::with_reason(CancelReason::Other, Some("spend cap reached"));
    let canceled = client.cancel_session(SESSION, &cancel, &key("hold_10:cancel")).await.expect("canceled");
    assert_eq!(canceled.status, SessionStatus::Canceled);
    let again = client.cancel_session(SESSION, &cancel, &key("hold_11:cancel")).await.expect_err("already canceled");
    assert_eq!(merchant_error(&again), (405, "invalid_request", "session_canceled", None));

    let received = requests(&server).await;
    let bodies: Vec<serde_json::Value> =
        received.iter().map(|r| serde_json::from_slice(&r.body).expect("json body")).collect();
    assert_eq!(
        bodies[0],
        serde_json::json!({
            "line_items": [{ "id": "item_123" }],
            "currency": "usd",
            "capabilities": { "interventions": { "supported": [] } }
        })
    );
    assert_eq!(
        bodies[1],
        serde_json::json!({ "intent_trace": { "reason_code": "other", "trace_summary": "spend cap reached" } })
    );
    assert_eq!(header(&received[0], "idempotency-key"), Some("hold_10:create"));
    assert_eq!(header(&received[1], "idempotency-key"), Some("hold_10:cancel"));
}

#[tokio::test]
async fn acp_psp_errors_carry_the_psps_code() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/agentic_commerce/delegate_payment"))
        .respond_with(json_response(400, "psp_error_invalid_card.json"))
        .mount(&server)
        .await;
    let error = psp(&server, conformance_sink())
        .delegate_payment(&delegate_request(&super::session("session_ready.json")), &key("hold_12:delegate"))
        .await
        .expect_err("invalid card");
    assert_eq!(error.code(), "acp_psp_error");
    assert_eq!(merchant_error(&error), (400, "invalid_request", "invalid_card", Some("payment_method.number")));
    assert!(!error.to_string().contains(TEST_CARD_NUMBER));
}

fn delegate_request(session: &super::super::CheckoutSession) -> DelegatePaymentRequest {
    let handler = pick_delegate_handler(session, "stripe").expect("handler");
    let total = session_total(session, &CurrencyPolicy::usd_only()).expect("total");
    DelegatePaymentRequest::for_session(Delegation {
        card: &test_card(),
        billing_address: None,
        total: &total,
        handler,
        expires_at_ms: 1_760_000_000_000,
        risk_signals: vec![RiskSignal::cap_authorized()],
        metadata: BTreeMap::from([("hold_id".to_owned(), "hold_13".to_owned())]),
    })
    .expect("delegate request")
}

/// The whole purchase as the daemon runs it: read, check, delegate, complete, verify. Returns the
/// result of the final check, and what the PSP and merchant received.
async fn purchase(
    completed_fixture: &str,
    sink: ConformanceSink,
) -> (Result<(), AcpError>, Vec<Request>, Vec<Request>) {
    let merchant_server = MockServer::start().await;
    let psp_server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/checkout_sessions/checkout_session_123"))
        .respond_with(json_response(200, "session_ready.json"))
        .mount(&merchant_server)
        .await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(200, completed_fixture))
        .mount(&merchant_server)
        .await;
    Mock::given(method("POST"))
        .and(path("/agentic_commerce/delegate_payment"))
        .respond_with(json_response(201, "psp_delegate_payment_response.json"))
        .mount(&psp_server)
        .await;
    let merchant = merchant_with(&merchant_server, |_| {}, sink.clone());
    let psp = psp(&psp_server, sink);

    let session = merchant.retrieve_session(SESSION).await.expect("session");
    require_ready(&session).expect("ready");
    let total = session_total(&session, &CurrencyPolicy::usd_only()).expect("total");
    let handler = pick_delegate_handler(&session, "stripe").expect("handler");
    let delegated = psp.delegate_payment(&delegate_request(&session), &key("hold_13:delegate")).await.expect("token");
    let complete = CheckoutSessionCompleteRequest::with_delegated_token(&handler.id, delegated.id, None);
    let completed = merchant.complete_session(SESSION, &complete, &key("hold_13:complete")).await.expect("completed");
    let verdict = verify_unchanged(&total, &completed);
    if verdict.is_ok() {
        let order = completed_order(&completed).expect("an order");
        assert_eq!(order.permalink_url, Some("https://www.testshop.com/orders/ord_abc123"));
    }
    (verdict, requests(&psp_server).await, requests(&merchant_server).await)
}

#[tokio::test]
async fn acp_a_purchase_delegates_exactly_the_total_and_pays_with_the_token() {
    let (verdict, psp_requests, merchant_requests) = purchase("session_completed.json", conformance_sink()).await;
    assert_eq!(verdict, Ok(()));

    let delegate = &psp_requests[0];
    assert_eq!(header(delegate, "authorization"), Some("Bearer sk_test_psp_key"));
    assert_eq!(header(delegate, "api-version"), Some(API_VERSION));
    assert_eq!(header(delegate, "idempotency-key"), Some("hold_13:delegate"));
    assert_eq!(header(delegate, "content-type"), Some("application/json"));
    assert!(header(delegate, "request-id").is_some());
    let body: serde_json::Value = serde_json::from_slice(&delegate.body).expect("json");
    assert_eq!(body["allowance"]["max_amount"], 480);
    assert_eq!(body["allowance"]["merchant_id"], "acct_1234567890");
    assert_eq!(body["allowance"]["checkout_session_id"], SESSION);
    assert_eq!(body["payment_method"]["number"], TEST_CARD_NUMBER, "the PSP gets the real card");

    let complete = &merchant_requests[1];
    let body: serde_json::Value = serde_json::from_slice(&complete.body).expect("json");
    assert_eq!(body["payment_data"]["instrument"]["credential"]["token"], "vt_01J8Z3WXYZ9ABC");
    assert_eq!(body["payment_data"]["handler_id"], "card_tokenized");
}

#[tokio::test]
async fn acp_a_purchase_completed_at_another_total_is_refused() {
    let (verdict, _, _) = purchase("session_completed_total_changed.json", conformance_sink()).await;
    let error = verdict.expect_err("the total changed");
    assert_eq!(error.code(), "acp_total_changed");
    assert_eq!(error.to_string(), "the merchant completed at 830 usd, but the total read before paying was 480 usd");
}

#[tokio::test]
async fn acp_every_request_body_is_recorded_for_conformance_without_secrets() {
    let dir = TempDir::new("conformance");
    let sink = ConformanceSink::to_dir(&dir.0);
    let (verdict, _, _) = purchase("session_completed.json", sink.clone()).await;
    assert_eq!(verdict, Ok(()));

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/checkout_sessions"))
        .respond_with(json_response(201, "session_ready.json"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/checkout_sessions/checkout_session_123/cancel"))
        .respond_with(json_response(200, "session_canceled.json"))
        .mount(&server)
        .await;
    let client = merchant_with(&server, |_| {}, sink);
    let create = CheckoutSessionCreateRequest::new(vec![Item::new("item_123")], "usd");
    client.create_session(&create, &key("hold_14:create")).await.expect("created");
    client.cancel_session(SESSION, &CancelSessionRequest::default(), &key("hold_14:cancel")).await.expect("canceled");

    let read = |message_type: &str| -> Vec<String> {
        let folder = dir.0.join("acp").join(message_type);
        let files = std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
        files.map(|f| std::fs::read_to_string(f.expect("entry").path()).expect("recorded file")).collect()
    };
    for message_type in [
        "CheckoutSessionCreateRequest",
        "CheckoutSessionCompleteRequest",
        "CancelSessionRequest",
        "DelegatePaymentRequest",
    ] {
        assert_eq!(read(message_type).len(), 1, "{message_type} recorded once");
    }
    let delegate: serde_json::Value = serde_json::from_str(&read("DelegatePaymentRequest")[0]).expect("json");
    assert_eq!(delegate["payment_method"]["number"], "************4242");
    assert_eq!(delegate["payment_method"]["cvc"], "***");
    assert_eq!(delegate["allowance"]["max_amount"], 480);
    let complete = &read("CheckoutSessionCompleteRequest")[0];
    for recorded in [&read("DelegatePaymentRequest")[0], complete] {
        assert!(!recorded.contains(TEST_CARD_NUMBER) && !recorded.contains(&format!("\"{TEST_CVC}\"")));
        assert!(!recorded.contains("vt_01J8Z3WXYZ9ABC"), "the delegated token is recorded: {recorded}");
    }
}

#[tokio::test]
async fn acp_a_huge_retry_after_after_one_retry_ends_the_retries_instead_of_overflowing() {
    // The first 409 asks for one second; the second names the largest number of seconds there
    // is. Adding it to the second already waited overflowed a Duration (a panic).
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(json_response(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(COMPLETE_PATH))
        .respond_with(
            json_response(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "18446744073709551615"),
        )
        .mount(&server)
        .await;
    let retry = RetryPolicy { max_attempts: 5, max_total_wait: Duration::from_secs(5), ..RetryPolicy::default() };
    let client = merchant_with(&server, |config| config.retry = retry, conformance_sink());
    let started = Instant::now();
    let error =
        client.complete_session(SESSION, &complete_request(), &key("hold_09:complete")).await.expect_err("busy");
    assert_eq!(merchant_error(&error), (409, "invalid_request", "idempotency_in_flight", None));
    assert!(error.outcome_unknown(), "the first request may still complete: the hold must stay");
    assert!(started.elapsed() < Duration::from_secs(5), "slept {:?}", started.elapsed());
    assert_eq!(requests(&server).await.len(), 2);
}
