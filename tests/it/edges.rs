//! Issue 14's edges: no path from an agent to Redis or the daemon, strict JSON bodies, error
//! bodies on every status, CSV cells that are not formulas, a revoked agent that writes nothing,
//! handles that cannot pass for ids.

use adapters::x402::EvmSigner;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::x402::X402Config;
use spendcap::protocols::ProtocolConfig;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{spawn_app, spawn_app_with, AppOptions, RedisServer, ADMIN_TOKEN};

/// The public Hardhat/Anvil key #0.
const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// Connections Redis has accepted since it started (`INFO stats`).
fn connections_received(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "stats"]).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_connections_received")
}

#[tokio::test]
async fn no_agent_reaches_redis_or_the_daemon_whatever_the_allow_list() {
    let x402 = X402Config {
        signer: Some(EvmSigner::from_hex(TEST_KEY).expect("test key")),
        allow_private: vec!["127.0.0.0/8".parse().expect("network"), "::1".parse().expect("address")],
        ..X402Config::default()
    };
    let app =
        spawn_app_with(AppOptions { protocols: ProtocolConfig { x402, ..Default::default() }, ..Default::default() })
            .await;
    let redis = app.redis.clone().expect("a Redis ledger");
    let agent = app.create_agent("prober", 1_000_000, None).await;
    // A provider on the allow-listed loopback network is still reached.
    let provider = MockServer::start().await;
    Mock::given(path("/free")).respond_with(ResponseTemplate::new(200).set_body_string("free")).mount(&provider).await;
    let fetch = |url: String| {
        let app = &app;
        let token = agent.token.clone();
        async move {
            let (status, body) =
                app.agent_call(&token, Method::POST, "/v1/x402/fetch", Some(json!({ "url": url }))).await;
            (status, body)
        }
    };
    let (status, body) = fetch(format!("http://127.0.0.1:{}/free", provider.address().port())).await;
    assert_eq!((status, body["body"].as_str()), (200, Some("free")), "{body}");

    let before = connections_received(&redis);
    let daemon_port = app.base.rsplit(':').next().expect("port").to_owned();
    for port in [redis.port.to_string(), daemon_port] {
        for host in [
            "127.0.0.1",
            "localhost",
            "[::ffff:127.0.0.1]",
            "2130706433",
            "0x7f000001",
            "127.0.0.2",
            "0.0.0.0",
            "[::1]",
            "[::]",
        ] {
            let url = format!("http://{host}:{port}/");
            let (status, body) = fetch(url.clone()).await;
            assert_eq!((status, body["code"].as_str()), (403, Some("x402_destination_forbidden")), "{url}: {body}");
        }
        let proxied = format!("{}/v1/x402/proxy/http://localhost:{port}/", app.base);
        let response = app.http.post(proxied).bearer_auth(&agent.token).body("PING").send().await.expect("proxy");
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["x-spendcap-error"], "x402_destination_forbidden");
    }
    // The only connection Redis accepted since is the one that asks it (INFO itself).
    assert_eq!(connections_received(&redis), before + 1, "an agent's fetch opened a connection to Redis");
    assert_eq!(app.show(&agent.id).await["spent_micros"], 0);
}

#[tokio::test]
async fn duplicate_keys_are_refused_at_every_depth_and_change_nothing() {
    let app = spawn_app().await;
    let agent = app.create_agent("dupes", 5_000_000, None).await;
    let before = app.show(&agent.id).await;
    let send = |method: Method, path: String, token: String, body: &'static str| {
        let request = app
            .http
            .request(method, app.url(&path))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON error body"))
        }
    };
    let admin = || ADMIN_TOKEN.to_owned();
    let cases = [
        (
            Method::PUT,
            format!("/v1/agents/{}/controls", agent.id),
            admin(),
            r#"{"limits": {"daily": 1, "daily": 999999}}"#,
        ),
        (Method::PUT, format!("/v1/agents/{}/cap", agent.id), admin(), r#"{"cap_micros": 1, "cap_micros": 9000000}"#),
        (
            Method::POST,
            "/v1/agents".to_owned(),
            admin(),
            r#"{"handle": "twin", "cap_micros": 1, "labels": {"team": "a", "t\u0065am": "b"}}"#,
        ),
        (
            Method::POST,
            "/v1/holds".to_owned(),
            agent.token.clone(),
            r#"{"amount_micros": 1000, "service": "s", "details": [{"x": {"y": 1, "y": 2}}]}"#,
        ),
        (
            Method::POST,
            "/v1/tasks/t1/outcome".to_owned(),
            agent.token.clone(),
            r#"{"outcome": "success", "outcome": "failed"}"#,
        ),
    ];
    for (method, path, token, body) in cases {
        let (status, answer) = send(method, path.clone(), token, body).await;
        assert_eq!((status, answer["code"].as_str()), (422, Some("duplicate_key")), "{path} {body}: {answer}");
    }
    assert_eq!(app.show(&agent.id).await, before, "nothing changed");
    let (status, _) = app.admin(Method::GET, "/v1/agents/twin", None).await;
    assert_eq!(status, 404, "no agent was created");
    assert!(app.log().await.iter().all(|entry| entry["ev"] != "hold" && entry["ev"] != "outcome"));
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_huge_headers_get_code_and_detail() {
    let app = spawn_app().await;
    let response = app.http.get(app.url("/v1/nothing-here")).send().await.expect("404");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["code"], "not_found", "{body}");
    assert!(body["detail"].is_string());

    let response = app.http.delete(app.url("/v1/me")).bearer_auth(ADMIN_TOKEN).send().await.expect("405");
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["code"], "method_not_allowed", "{body}");
    assert!(body["detail"].is_string());

    // Too many headers, and headers too large.
    let mut many = app.http.get(app.url("/v1/me")).bearer_auth(ADMIN_TOKEN);
    for i in 0..150 {
        many = many.header(format!("x-extra-{i}"), "1");
    }
    let large = app.http.get(app.url("/v1/me")).bearer_auth(ADMIN_TOKEN).header("x-large", "a".repeat(64 * 1024));
    for request in [many, large] {
        let response = request.send().await.expect("431");
        assert_eq!(response.status(), 431);
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(body["code"], "headers_too_large", "{body}");
        assert!(body["detail"].is_string());
    }
    // The daemon still serves after them.
    assert_eq!(app.http.get(app.url("/healthz")).send().await.expect("healthz").status(), 200);
}

/// Every cell of a CSV text (RFC 4180: quoted cells may hold commas, quotes and line breaks).
fn csv_cells(text: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) => quoted = true,
            (',' | '\n', false) => cells.push(std::mem::take(&mut cell)),
            (c, _) => cell.push(c),
        }
    }
    cells
}

#[tokio::test]
async fn csv_exports_never_hold_a_formula() {
    let app = spawn_app().await;
    let agent = app.create_agent("csv", 5_000_000, None).await;
    let (service, task, task_type) = ("=HYPERLINK(\"http://evil.example\",\"x\")", "+SUM(1,2)", "@cmd");
    let (status, hold) = app
        .agent_call(
            &agent.token,
            Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": 1000, "service": service, "task": task })),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let hold = hold["hold_id"].as_str().expect("hold id").to_owned();
    assert_eq!(app.settle(&agent, &hold, 1000).await.0, 200);
    let (status, body) = app
        .agent_call(
            &agent.token,
            Method::POST,
            &format!("/v1/tasks/{}/outcome", urlencode(task)),
            Some(json!({ "outcome": "success", "task_type": task_type })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, refused) = app
        .agent_call(
            &agent.token,
            Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": 9_000_000, "service": "-1+2", "task": task })),
        )
        .await;
    assert_eq!(refused["code"], "cap_exceeded");

    for path in ["/v1/log?format=csv", "/v1/reports?format=csv"] {
        let response = app.http.get(app.url(path)).bearer_auth(ADMIN_TOKEN).send().await.expect("export");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("csv");
        let cells = csv_cells(&text);
        for cell in &cells {
            assert!(!cell.starts_with(['=', '+', '-', '@', '\t', '\r']), "{path}: a formula cell {cell:?} in\n{text}");
        }
        // The values are all there, as text.
        let values = if path.starts_with("/v1/log") { [service, task, "-1+2"] } else { [service, task_type, "-1+2"] };
        for value in values {
            assert!(cells.contains(&format!("'{value}")), "{path}: {value:?} missing from\n{text}");
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[tokio::test]
async fn a_handle_cannot_pass_for_an_id() {
    let app = spawn_app().await;
    let victim = app.create_agent("victim", 1_000_000, None).await;
    for handle in
        [victim.id.clone(), "ag_anything".to_owned(), "hd_x".to_owned(), "sct_x".to_owned(), victim.tree.clone()]
    {
        let (status, body) =
            app.admin(Method::POST, "/v1/agents", Some(json!({ "handle": handle, "cap_micros": 1 }))).await;
        assert_eq!((status, body["code"].as_str()), (422, Some("invalid_handle")), "{handle}: {body}");
    }
    // An admin action by the victim's id still reaches the victim, and only it.
    let (status, body) =
        app.admin(Method::POST, &format!("/v1/agents/{}/revoke", victim.id), Some(json!({ "reason": "test" }))).await;
    assert_eq!(status, 200, "{body}");
    let (status, list) = app.admin(Method::GET, "/v1/agents", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["agents"].as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test]
async fn a_revoked_agent_writes_nothing_to_the_log() {
    let providers = spendcap::sim::Providers::start().await.expect("simulated providers");
    let protocols = providers.protocol_config().expect("protocol config");
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;
    let parent = app.create_agent("parent", 5_000_000, None).await;
    let agent = app.create_agent("worker", 1_000_000, Some(&parent.id)).await;
    let child = app.create_agent("child", 1_000_000, Some(&agent.id)).await;
    let (status, body) =
        app.admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({ "reason": "done" }))).await;
    assert_eq!(status, 200, "{body}");
    let lines = app.log().await.len();

    // The revoked agent and its sub-agent (revoked through its ancestor) write nothing.
    for who in [&agent, &child] {
        let (status, body) = app
            .agent_call(
                &who.token,
                Method::POST,
                "/v1/tasks/t1/outcome",
                Some(json!({ "outcome": "success", "task_type": "research" })),
            )
            .await;
        assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
        let (status, body) = app.agent_call(&who.token, Method::GET, "/v1/ap2/key", None).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
        let (status, body) = app
            .agent_call(
                &who.token,
                Method::POST,
                "/v1/ap2/payments",
                Some(json!({ "checkout_jwt": "x", "open_checkout_mandate": "x", "open_payment_mandate": "x" })),
            )
            .await;
        assert!(status >= 400 && body["code"].is_string(), "{status} {body}");
        // It still reads its own state.
        let (status, me) = app.agent_call(&who.token, Method::GET, "/v1/me", None).await;
        assert_eq!(status, 200, "{me}");
    }
    let log = app.log().await;
    assert_eq!(log.len(), lines, "new log lines after revocation: {:?}", &log[lines..]);
    // The parent, not revoked, still records outcomes.
    let (status, body) = app
        .agent_call(
            &parent.token,
            Method::POST,
            "/v1/tasks/t1/outcome",
            Some(json!({ "outcome": "success", "task_type": "r" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_provider_configured_at_the_redis_address_stops_start_up() {
    let redis = RedisServer::start();
    let providers = spendcap::sim::Providers::start().await.expect("simulated providers");
    for spelling in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"] {
        let mut protocols = providers.protocol_config().expect("protocol config");
        let file = protocols.acp.file.as_mut().expect("an ACP configuration");
        file.merchants[0].base_url = format!("http://{spelling}:{}/acp", redis.port);
        let config = spendcap::server::Config {
            ledger: spendcap::server::LedgerConfig::Redis(crate::support::redis_config(&redis, "sc")),
            admin_token: spendcap::identity::AdminToken::new(ADMIN_TOKEN.into()).expect("admin token"),
            signer: spendcap::receipt::ReceiptSigner::generate(),
            limits: Default::default(),
            clock: spendcap::clock::Clock::system(),
            protocols,
            sweep_interval: None,
            alerts: None,
            max_clock_skew: std::time::Duration::from_secs(2),
        };
        let error = spendcap::server::build_state(config).await.err().expect("start-up refused");
        assert!(error.to_string().contains("a Redis node of the ledger"), "{spelling}: {error}");
    }
}
