//! Keyed APIs (`/v1/apis/{name}/...`): agents call OpenAI- and Anthropic-style APIs with their
//! spendcap token as the API key; the daemon holds the call's bound, forwards it with the
//! owner's key, and settles the cost from the answer's usage. Upstreams are wiremock servers (and
//! one raw TCP server that cuts a stream).

use std::sync::Arc;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::api::ApiConfig;
use spendcap::protocols::ProtocolConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::support::{spawn_app_with, wait_for, Agent, AppOptions, TestApp};

const OWNER_KEY: &str = "sk-owner-secret-key-do-not-leak";
/// 1 micro-USD per input token, 2 per output token: costs are easy to check by hand.
const GPT_PRICE: (u64, u64) = (1_000_000, 2_000_000);

fn apis_json(upstream: &str) -> Value {
    json!({
        "allow_private": ["127.0.0.1"],
        "apis": [
            { "name": "openai", "base_url": upstream,
              "credential": { "header": "authorization", "scheme": "Bearer", "value": OWNER_KEY },
              "pricing": { "kind": "openai_usage", "default_max_output_tokens": 50,
                           "models": { "gpt-test": { "input": GPT_PRICE.0, "cached_input": 500_000, "output": GPT_PRICE.1 } } } },
            { "name": "anthropic", "base_url": upstream,
              "credential": { "header": "x-api-key", "value": OWNER_KEY },
              "pricing": { "kind": "anthropic_usage",
                           "models": { "claude-test": { "input": 3_000_000, "cached_input": 300_000, "cache_write": 3_750_000, "output": 15_000_000 } } } },
            { "name": "search", "base_url": format!("{upstream}/api"),
              "credential": { "header": "x-subscription-token", "value": OWNER_KEY },
              "pricing": { "kind": "per_request", "price_micros": 5_000,
                           "routes": [ { "method": "GET", "path": "/deep/*", "price_micros": 20_000 } ] } },
            { "name": "scraper", "base_url": upstream,
              "credential": { "header": "authorization", "scheme": "Bearer", "value": OWNER_KEY },
              "pricing": { "kind": "response_header", "header": "x-request-cost", "max_micros": 100_000 } }
        ]
    })
}

async fn app_for(upstream: &str) -> TestApp {
    let mut api = ApiConfig::from_json(&apis_json(upstream).to_string()).expect("valid APIs configuration");
    api.conformance = ConformanceSink::to_dir(ConformanceSink::sdk_test_dir());
    spawn_app_with(AppOptions { protocols: ProtocolConfig { api, ..Default::default() }, ..Default::default() }).await
}

async fn balance(app: &TestApp, agent: &Agent) -> (u64, u64) {
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{body}");
    (body["spent_micros"].as_u64().unwrap_or(u64::MAX), body["held_micros"].as_u64().unwrap_or(u64::MAX))
}

/// The agent's settle / void log lines, with `detail` parsed.
async fn ends(app: &TestApp, agent: &Agent) -> Vec<Value> {
    app.log()
        .await
        .into_iter()
        .filter(|e| e["agent"] == agent.id.as_str() && (e["event"] == "settle" || e["event"] == "void"))
        .map(|mut e| {
            let detail =
                e["detail"].as_str().and_then(|d| serde_json::from_str::<Value>(d).ok()).unwrap_or(Value::Null);
            e["detail"] = detail;
            e
        })
        .collect()
}

fn bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("json")
}

async fn post(app: &TestApp, path: &str, auth: (&str, &str), body: Vec<u8>) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .header(auth.0, auth.1)
        .header("content-type", "application/json")
        .header("x-spendcap-task", "summarise")
        .body(body)
        .send()
        .await
        .expect("request")
}

fn sse(events: &[Value]) -> String {
    events.iter().map(|e| format!("data: {e}\n\n")).collect::<String>() + "data: [DONE]\n\n"
}

#[tokio::test]
async fn an_openai_call_is_held_forwarded_with_the_owner_key_and_settled_from_its_usage() {
    let upstream = MockServer::start().await;
    let answer = json!({ "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
        "choices": [ { "index": 0, "message": { "role": "assistant", "content": "Hi" }, "finish_reason": "stop" } ],
        "usage": { "prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
                   "prompt_tokens_details": { "cached_tokens": 10 } } });
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {OWNER_KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(&answer).insert_header("openai-processing-ms", "12"))
        .expect(1)
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("writer", 1_000_000, None).await;
    let request =
        json!({ "model": "gpt-test", "max_tokens": 100, "messages": [ { "role": "user", "content": "Say hi" } ] });

    let response = post(
        &app,
        "/v1/apis/openai/v1/chat/completions",
        ("authorization", &format!("Bearer {}", agent.token)),
        bytes(&request),
    )
    .await;

    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    // 30 uncached input tokens at 1, 10 cached at 0.5, 7 output at 2: 30 + 5 + 14 = 49 micro-USD.
    assert_eq!(headers.get("x-spendcap-amount-micros").and_then(|v| v.to_str().ok()), Some("49"));
    assert_eq!(headers.get("x-spendcap-payment").and_then(|v| v.to_str().ok()), Some("settled"));
    assert!(headers.get("x-spendcap-receipt").is_some());
    assert_eq!(headers.get("openai-processing-ms").and_then(|v| v.to_str().ok()), Some("12"));
    assert_eq!(response.json::<Value>().await.expect("json"), answer, "the answer comes back verbatim");
    assert_eq!(balance(&app, &agent).await, (49, 0));

    // Upstream saw the owner's key, never the agent's token, and the body byte for byte.
    let received = upstream.received_requests().await.expect("recorded");
    assert_eq!(received.len(), 1);
    let sent_headers = format!("{:?}", received[0].headers);
    assert!(!sent_headers.contains(&agent.token), "the agent token was forwarded: {sent_headers}");
    assert_eq!(received[0].body, bytes(&request));

    let ends = ends(&app, &agent).await;
    assert_eq!(ends.len(), 1);
    assert_eq!(
        (ends[0]["event"].as_str(), ends[0]["protocol"].as_str(), ends[0]["service"].as_str()),
        (Some("settle"), Some("api"), Some("openai"))
    );
    assert_eq!(ends[0]["task"], "summarise");
    assert_eq!(ends[0]["detail"]["model"], "gpt-test");
    assert_eq!(
        (ends[0]["detail"]["input_tokens"].as_str(), ends[0]["detail"]["output_tokens"].as_str()),
        (Some("40"), Some("7"))
    );
    // The hold was the bound: the body's bytes at the dearest input price plus 100 output tokens.
    let hold =
        app.log().await.into_iter().find(|e| e["agent"] == agent.id.as_str() && e["event"] == "hold").expect("hold");
    assert_eq!(hold["amount"].as_u64(), Some(bytes(&request).len() as u64 + 200));
    // Reports show the spend by service and model, with the tokens.
    let (status, report) = app.admin(Method::GET, "/v1/reports", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["api_models"],
        json!([ { "service": "openai", "model": "gpt-test", "calls": 1, "spent_micros": 49,
                  "input_tokens": 40, "output_tokens": 7, "cost_unknown": 0 } ])
    );
    // The owner's key is in no answer and no log line.
    assert!(!app.log().await.iter().any(|e| e.to_string().contains(OWNER_KEY)));
}

#[tokio::test]
async fn an_anthropic_call_authenticates_the_agent_by_x_api_key_and_prices_cache_tokens() {
    let upstream = MockServer::start().await;
    let answer = json!({ "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [ { "type": "text", "text": "Hello" } ], "stop_reason": "end_turn",
        "usage": { "input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20, "output_tokens": 4 } });
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", OWNER_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_json(&answer))
        .expect(1)
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("claude-user", 1_000_000, None).await;
    let request =
        json!({ "model": "claude-test", "max_tokens": 64, "messages": [ { "role": "user", "content": "Hi" } ] });

    let response = post(&app, "/v1/apis/anthropic/v1/messages", ("x-api-key", &agent.token), bytes(&request)).await;

    assert_eq!(response.status(), 200);
    // 10 × 3 + 100 × 0.3 + 20 × 3.75 + 4 × 15 = 30 + 30 + 75 + 60 = 195 micro-USD.
    assert_eq!(response.headers().get("x-spendcap-amount-micros").and_then(|v| v.to_str().ok()), Some("195"));
    assert_eq!(response.json::<Value>().await.expect("json"), answer);
    assert_eq!(balance(&app, &agent).await, (195, 0));
    let received = upstream.received_requests().await.expect("recorded");
    assert!(!format!("{:?}", received[0].headers).contains(&agent.token));

    // A task token of the agent works as `x-api-key` too, until it expires (then nothing is sent:
    // the mock expects exactly the one call above).
    let (status, created) = app
        .agent_call(&agent.token, reqwest::Method::POST, "/v1/me/tokens", Some(json!({"task": "chat", "ttl_secs": 5})))
        .await;
    assert_eq!(status, 201, "{created}");
    let task_token = created["token"].as_str().expect("token").to_owned();
    app.clock.advance_ms(6_000);
    let response = post(&app, "/v1/apis/anthropic/v1/messages", ("x-api-key", &task_token), bytes(&request)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.json::<Value>().await.expect("json")["code"], "token_expired");
    assert_eq!(balance(&app, &agent).await, (195, 0));
}

#[tokio::test]
async fn an_openai_stream_passes_through_and_the_usage_chunk_the_agent_did_not_ask_for_is_taken_out() {
    let upstream = MockServer::start().await;
    let chunks = [
        json!({ "id": "c", "object": "chat.completion.chunk", "choices": [ { "index": 0, "delta": { "content": "Hel" } } ], "usage": null }),
        json!({ "id": "c", "object": "chat.completion.chunk", "choices": [ { "index": 0, "delta": { "content": "lo" }, "finish_reason": "stop" } ], "usage": null }),
    ];
    let usage_chunk = json!({ "id": "c", "object": "chat.completion.chunk", "choices": [], "usage": { "prompt_tokens": 20, "completion_tokens": 2 } });
    let mut all = chunks.to_vec();
    all.push(usage_chunk);
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(sse(&all)),
        )
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("streamer", 1_000_000, None).await;
    let request = json!({ "model": "gpt-test", "stream": true, "max_completion_tokens": 10, "messages": [] });

    let response = post(
        &app,
        "/v1/apis/openai/v1/chat/completions",
        ("authorization", &format!("Bearer {}", agent.token)),
        bytes(&request),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-spendcap-payment").and_then(|v| v.to_str().ok()), Some("pending"));
    let text = response.text().await.expect("the whole stream");

    assert_eq!(text, sse(&chunks), "the stream, less the usage chunk");
    let received = upstream.received_requests().await.expect("recorded");
    let sent: Value = serde_json::from_slice(&received[0].body).expect("json");
    assert_eq!(sent["stream_options"]["include_usage"], true, "the daemon asked for usage");
    // Settled before the stream ended: 20 + 2 × 2 = 24 micro-USD.
    assert_eq!(balance(&app, &agent).await, (24, 0));
}

#[tokio::test]
async fn openai_responses_and_anthropic_streams_pass_unchanged_and_settle_from_their_final_usage() {
    let upstream = MockServer::start().await;
    let responses = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
        event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":30,\"output_tokens\":5,\"total_tokens\":35}}}\n\n";
    let messages = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
        event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
        event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n\
        event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    for (route, body) in [("/v1/responses", responses), ("/v1/messages", messages)] {
        Mock::given(method("POST"))
            .and(path(route))
            .respond_with(
                ResponseTemplate::new(200).insert_header("content-type", "text/event-stream").set_body_string(body),
            )
            .mount(&upstream)
            .await;
    }
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("both", 1_000_000, None).await;

    let request = json!({ "model": "gpt-test", "stream": true, "max_output_tokens": 10, "input": "hi" });
    let response = post(
        &app,
        "/v1/apis/openai/v1/responses",
        ("authorization", &format!("Bearer {}", agent.token)),
        bytes(&request),
    )
    .await;
    assert_eq!(response.text().await.expect("stream"), responses);
    let received = upstream.received_requests().await.expect("recorded");
    assert_eq!(received[0].body, bytes(&request), "a responses stream is forwarded unchanged");
    assert_eq!(balance(&app, &agent).await, (30 + 10, 0));

    let request = json!({ "model": "claude-test", "stream": true, "max_tokens": 10, "messages": [] });
    let response = post(&app, "/v1/apis/anthropic/v1/messages", ("x-api-key", &agent.token), bytes(&request)).await;
    assert_eq!(response.text().await.expect("stream"), messages);
    // 12 × 3 + 3 × 15 = 81 micro-USD.
    assert_eq!(balance(&app, &agent).await, (40 + 81, 0));
}

#[tokio::test]
async fn an_upstream_error_is_not_billed_so_its_hold_is_voided() {
    let upstream = MockServer::start().await;
    let error = json!({ "error": { "message": "Rate limit reached", "type": "rate_limit_exceeded" } });
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).set_body_json(&error).insert_header("retry-after", "2"))
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("limited", 1_000_000, None).await;
    let request = json!({ "model": "gpt-test", "max_tokens": 10, "messages": [] });

    let response = post(
        &app,
        "/v1/apis/openai/v1/chat/completions",
        ("authorization", &format!("Bearer {}", agent.token)),
        bytes(&request),
    )
    .await;

    assert_eq!(response.status(), 429);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    assert_eq!(response.headers().get("x-spendcap-payment").and_then(|v| v.to_str().ok()), Some("voided"));
    assert_eq!(response.json::<Value>().await.expect("json"), error);
    assert_eq!(balance(&app, &agent).await, (0, 0));
    let ends = ends(&app, &agent).await;
    assert_eq!((ends[0]["event"].as_str(), ends[0]["reason"].as_str()), (Some("void"), Some("upstream_status_429")));
}

/// An upstream that answers 200 with the start of an SSE stream, then closes the connection
/// without finishing the chunked body.
async fn cutting_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the request head and its body (Content-Length).
                loop {
                    let Ok(n) = socket.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if seen.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let event = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n";
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(chunk.as_bytes()).await;
                let _ = socket.flush().await;
                // Closed here, mid-stream.
            });
        }
    });
    base
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_settles_the_hold_and_says_why() {
    let app = app_for(&cutting_upstream().await).await;
    let agent = app.create_agent("cut", 1_000_000, None).await;
    let request = json!({ "model": "claude-test", "stream": true, "max_tokens": 10, "messages": [] });

    let response = post(&app, "/v1/apis/anthropic/v1/messages", ("x-api-key", &agent.token), bytes(&request)).await;
    assert_eq!(response.status(), 200);
    let read = response.text().await;

    assert!(read.is_err(), "the agent sees a cut stream, not a clean end: {read:?}");
    // The bound prices every input byte at the dearest input price (cache writes, 3.75).
    let held = (bytes(&request).len() as u64 * 3_750_000).div_ceil(1_000_000) + 10 * 15;
    assert_eq!(balance(&app, &agent).await, (held, 0), "the cost is unknown: the whole hold is settled");
    let ends = ends(&app, &agent).await;
    assert_eq!(ends[0]["event"], "settle");
    assert_eq!(ends[0]["detail"]["cost_unknown"], "stream_cut");
}

#[tokio::test]
async fn bad_calls_get_stable_codes_hold_nothing_and_never_reach_the_upstream() {
    let upstream = MockServer::start().await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("careless", 1_000_000, None).await;
    let bearer = format!("Bearer {}", agent.token);
    let cases = [
        (
            "/v1/apis/anthropic/v1/messages",
            json!({ "model": "claude-test", "messages": [] }),
            422,
            "api_max_tokens_required",
        ),
        (
            "/v1/apis/openai/v1/chat/completions",
            json!({ "model": "gpt-5-unpriced", "max_tokens": 5 }),
            422,
            "api_unknown_model",
        ),
        ("/v1/apis/openai/v1/chat/completions", json!({ "max_tokens": 5 }), 422, "api_model_missing"),
        ("/v1/apis/nope/v1/chat/completions", json!({}), 404, "api_unknown"),
    ];
    for (route, body, status, code) in cases {
        let response = post(&app, route, ("authorization", &bearer), bytes(&body)).await;
        assert_eq!(response.status().as_u16(), status, "{route} {body}");
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["code"], code, "{answer}");
    }
    let response = post(
        &app,
        "/v1/apis/openai/v1/chat/completions",
        ("authorization", "Bearer sk-not-a-spendcap-token"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(response.status(), 401);
    assert_eq!(balance(&app, &agent).await, (0, 0));
    assert!(upstream.received_requests().await.expect("recorded").is_empty());
}

#[tokio::test]
async fn a_revoked_agent_reaches_no_upstream() {
    let upstream = MockServer::start().await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("revoked", 1_000_000, None).await;
    let (status, _) =
        app.admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({ "reason": "test" }))).await;
    assert_eq!(status, 200);
    let request = json!({ "model": "gpt-test", "max_tokens": 5, "messages": [] });
    let response = post(
        &app,
        "/v1/apis/openai/v1/chat/completions",
        ("authorization", &format!("Bearer {}", agent.token)),
        bytes(&request),
    )
    .await;
    assert_eq!(response.status(), 402);
    assert_eq!(response.json::<Value>().await.expect("json")["code"], "agent_revoked");
    assert!(upstream.received_requests().await.expect("recorded").is_empty());
}

#[tokio::test]
async fn per_request_and_response_header_apis_settle_their_price() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/deep/news"))
        .and(header("x-subscription-token", OWNER_KEY))
        .respond_with(ResponseTemplate::new(200).set_body_string("results"))
        .mount(&upstream)
        .await;
    Mock::given(method("POST"))
        .and(path("/scrape"))
        .respond_with(ResponseTemplate::new(200).insert_header("x-request-cost", "0.0042").set_body_string("page"))
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("searcher", 1_000_000, None).await;

    let response =
        app.http.get(app.url("/v1/apis/search/deep/news")).bearer_auth(&agent.token).send().await.expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-spendcap-amount-micros").and_then(|v| v.to_str().ok()), Some("20000"));
    assert_eq!(response.text().await.expect("body"), "results");
    let response = post(&app, "/v1/apis/scraper/scrape", ("x-api-key", &agent.token), b"{}".to_vec()).await;
    assert_eq!(response.headers().get("x-spendcap-amount-micros").and_then(|v| v.to_str().ok()), Some("4200"));
    assert_eq!(balance(&app, &agent).await, (24_200, 0));
}

/// An API configured by name whose name comes to mean a Redis node or this daemon after start-up
/// (DNS re-pointed): the call is refused when the client connects, its hold is voided and the
/// upstream on that address never hears of it.
#[tokio::test]
async fn an_api_name_re_pointed_at_a_reserved_address_is_refused_when_it_connects() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("results"))
        .mount(&upstream)
        .await;
    let port = upstream.address().port();
    let mut config = apis_json(&format!("http://localhost:{port}"));
    config["allow_private"] = json!(["127.0.0.1", "::1"]);
    let api = ApiConfig::from_json(&config.to_string()).expect("valid APIs configuration");
    let protocols = ProtocolConfig { api, ..Default::default() };
    let reserved = protocols.reserved.clone();
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;
    let agent = app.create_agent("repointed", 1_000_000, None).await;

    // The start-up check passed; now `localhost` on that port is reserved (a Redis node, say).
    reserved.add(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let response = app.http.get(app.url("/v1/apis/search/news")).bearer_auth(&agent.token).send().await.expect("get");
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], "api_destination_forbidden", "{body}");
    assert_eq!(balance(&app, &agent).await, (0, 0));
    assert!(upstream.received_requests().await.expect("recorded").is_empty());
}

/// Answers like the upstream, each call after `delay`, with a usage whose cost is exactly the
/// hold's bound (so no call releases money another could use, and the count is exact).
struct ExactUsage {
    delay: Duration,
    output_tokens: u64,
}

impl wiremock::Respond for ExactUsage {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_delay(self.delay)
            .set_body_json(json!({ "id": "c", "object": "chat.completion", "choices": [],
                "usage": { "prompt_tokens": request.body.len(), "completion_tokens": self.output_tokens } }))
    }
}

#[tokio::test]
async fn fifty_concurrent_calls_on_a_cap_that_fits_ten_forward_exactly_the_ten_whose_holds_fit() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ExactUsage { delay: Duration::from_millis(200), output_tokens: 100 })
        .mount(&upstream)
        .await;
    let app = Arc::new(app_for(&upstream.uri()).await);
    let request =
        bytes(&json!({ "model": "gpt-test", "max_tokens": 100, "messages": [ { "role": "user", "content": "go" } ] }));
    let bound = request.len() as u64 * GPT_PRICE.0 / 1_000_000 + 100 * GPT_PRICE.1 / 1_000_000;
    let agent = Arc::new(app.create_agent("racer", 10 * bound, None).await);

    let calls = (0..50).map(|_| {
        let (app, agent, request) = (app.clone(), agent.clone(), request.clone());
        tokio::spawn(async move {
            let response = post(
                &app,
                "/v1/apis/openai/v1/chat/completions",
                ("authorization", &format!("Bearer {}", agent.token)),
                request,
            )
            .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        })
    });
    let results: Vec<(u16, Value)> =
        futures::future::join_all(calls).await.into_iter().map(|r| r.expect("task")).collect();

    let forwarded = results.iter().filter(|(status, _)| *status == 200).count();
    let refused: Vec<&Value> = results.iter().filter(|(status, _)| *status == 402).map(|(_, body)| body).collect();
    assert_eq!((forwarded, refused.len()), (10, 40), "{results:?}");
    assert!(refused.iter().all(|body| body["code"] == "cap_exceeded"), "{refused:?}");
    assert_eq!(
        upstream.received_requests().await.expect("recorded").len(),
        10,
        "the upstream saw only the calls whose holds fit"
    );
    let (spent, held) = balance(&app, &agent).await;
    assert_eq!((spent, held), (10 * bound, 0));
    assert!(spent <= 10 * bound);
}

#[tokio::test]
async fn the_conformance_sink_records_the_requests_sent() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "usage": { "input_tokens": 1, "output_tokens": 1 } })),
        )
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("recorded", 1_000_000, None).await;
    let dir = ConformanceSink::sdk_test_dir().join("api").join("AnthropicRequest");
    let before = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let request = json!({ "model": "claude-test", "max_tokens": 1, "messages": [] });
    let response = post(&app, "/v1/apis/anthropic/v1/messages", ("x-api-key", &agent.token), bytes(&request)).await;
    assert_eq!(response.status(), 200);
    wait_for("a recorded request", Duration::from_secs(5), || {
        let dir = dir.clone();
        async move { std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) > before }
    })
    .await;
}

/// The README's configuration file parses as written, and its worked example of the hold bound is
/// what the daemon computes.
#[test]
fn the_readme_configuration_file_and_hold_example_are_right() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("### The configuration file").expect("README has the section")..];
    let start = section.find("```json\n").expect("a json block") + "```json\n".len();
    let text = &section[start..start + section[start..].find("```").expect("the block ends")];
    let env = |name: &str| Some(format!("secret-of-{name}"));
    let file = spendcap::protocols::api::ApisFile::parse(text, &env).expect("the README's file parses");
    let names: Vec<&str> = file.apis.iter().map(|api| api.name.as_str()).collect();
    assert_eq!(names, ["openai", "anthropic", "search", "scraper"]);
    let mini = file.apis[0].pricing.models().and_then(|table| table.price("gpt-4o-mini").ok()).expect("priced");
    assert!(readme.contains("holds 2,000 × 0.15 + 500 × 0.60 = 600 micro-USD"));
    assert_eq!(mini.bound(2_000, 500).map(|m| m.get()), Ok(600));
    let request = json!({ "model": "gpt-4o-mini", "max_tokens": 500, "messages": [] });
    let call = adapters::api::prepare(
        adapters::api::Style::OpenAi,
        "/v1/chat/completions",
        &bytes(&request),
        file.apis[0].pricing.models().expect("table"),
    )
    .expect("prepared");
    assert_eq!(call.bound.get(), (bytes(&request).len() as u64 * 150_000 + 500 * 600_000).div_ceil(1_000_000));
}

#[tokio::test]
async fn spending_controls_apply_to_keyed_apis_by_protocol_and_service_name() {
    let upstream = MockServer::start().await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("controlled", 1_000_000, None).await;
    let request = json!({ "model": "gpt-test", "max_tokens": 5, "messages": [] });
    let call = || post(&app, "/v1/apis/openai/v1/chat/completions", ("x-api-key", &agent.token), bytes(&request));
    for (controls, code) in [
        (json!({ "protocols": { "deny": ["api"] } }), "protocol_denied"),
        (json!({ "services": { "deny": ["openai"] } }), "service_denied"),
    ] {
        let (status, shown) = app.admin(Method::PUT, "/v1/agents/controlled/controls", Some(controls)).await;
        assert_eq!(status, 200, "{shown}");
        let response = call().await;
        assert_eq!(response.status(), 402);
        assert_eq!(response.json::<Value>().await.expect("json")["code"], code);
    }
    assert!(upstream.received_requests().await.expect("recorded").is_empty());
    assert_eq!(balance(&app, &agent).await, (0, 0));
}

/// The ledger calls and upstream requests of one keyed-API call, as Redis and the upstream saw
/// them (see `calls.rs`): one hold of the bound, one settle from the usage (with its receipt
/// signed ahead and linked in the same call), one upstream request.
#[tokio::test]
async fn a_keyed_api_call_costs_two_ledger_calls_and_one_upstream_request() {
    let upstream = MockServer::start().await;
    let answer = json!({ "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
        "choices": [ { "index": 0, "message": { "role": "assistant", "content": "Hi" }, "finish_reason": "stop" } ],
        "usage": { "prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47 } });
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&answer))
        .expect(1)
        .mount(&upstream)
        .await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("counted", 1_000_000, None).await;
    let redis = app.redis.clone().expect("a Redis ledger");
    let request =
        json!({ "model": "gpt-test", "max_tokens": 100, "messages": [ { "role": "user", "content": "Say hi" } ] });
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let auth = format!("Bearer {}", agent.token);
    let response = post(&app, "/v1/apis/openai/v1/chat/completions", ("authorization", &auth), bytes(&request)).await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await;
    let calls = crate::calls::purchase_calls(calls.stop(&redis));
    assert_eq!(calls, ["FCALL spendcap_hold", "FCALL spendcap_settle"], "ledger calls of one keyed-API call");
    assert_eq!(upstream.received_requests().await.expect("recorded").len(), 1, "upstream requests");
}

#[tokio::test]
async fn a_call_that_needs_approval_is_held_and_answered_202_before_anything_is_forwarded() {
    let upstream = MockServer::start().await;
    let app = app_for(&upstream.uri()).await;
    let agent = app.create_agent("approval-caller", 1_000_000, None).await;
    let rule = json!({ "approval": { "services": ["search"] } });
    let (status, shown) = app.admin(Method::PUT, "/v1/agents/approval-caller/controls", Some(rule)).await;
    assert_eq!(status, 200, "{shown}");
    let response = app
        .http
        .get(app.url("/v1/apis/search/res/v1/web/search?q=rust"))
        .bearer_auth(&agent.token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 202);
    let body: Value = response.json().await.expect("json");
    assert_eq!((body["code"].as_str(), body["reason"].as_str()), (Some("approval_required"), Some("listed_service")));
    assert_eq!(body["amount_micros"], 5_000);
    assert!(upstream.received_requests().await.unwrap_or_default().is_empty(), "nothing was forwarded");
    assert_eq!(balance(&app, &agent).await, (0, 5_000), "the bound is held while it waits");
}
