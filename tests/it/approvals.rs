//! Approval holds: a payment an approval rule matches is held atomically with every cap, waits
//! `pending_approval` (202 `approval_required`, nothing sent) until a person decides, and the
//! agent's repeated request resumes it exactly once.

use std::sync::Arc;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, Agent, AppOptions, Backend, TestApp};

async fn set_approval(app: &TestApp, agent: &str, rule: Value) {
    let (status, shown) =
        app.admin(Method::PUT, &format!("/v1/agents/{agent}/controls"), Some(json!({ "approval": rule }))).await;
    assert_eq!(status, 200, "{shown}");
    assert!(shown["approval"].is_object(), "{shown}");
}

/// `POST /v1/holds` with an idempotency key.
async fn keyed_hold(app: &TestApp, agent: &Agent, key: &str, amount: u64, service: &str) -> (u16, Value) {
    let response = app
        .http
        .post(app.url("/v1/holds"))
        .bearer_auth(&agent.token)
        .header("Idempotency-Key", key)
        .json(&json!({ "amount_micros": amount, "service": service, "task": "t" }))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn decide(app: &TestApp, id: &str, decision: &str, note: &str) -> (u16, Value) {
    app.admin(Method::POST, &format!("/v1/approvals/{id}/{decision}"), Some(json!({ "note": note }))).await
}

async fn held(app: &TestApp, agent: &Agent) -> u64 {
    app.show(&agent.id).await["held_micros"].as_u64().expect("held")
}

async fn approve_then_resume_settles_once(app: TestApp) {
    let agent = app.create_agent("big-spender", 10_000_000, None).await;
    set_approval(&app, "big-spender", json!({ "above_micros": 1_000_000, "ttl_secs": 600 })).await;
    // Small payments go through as before.
    let (status, small) = keyed_hold(&app, &agent, "small", 500_000, "api.example.com").await;
    assert_eq!(status, 201, "{small}");

    let (status, waiting) = keyed_hold(&app, &agent, "big", 3_000_000, "api.example.com").await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert_eq!(waiting["reason"], "above_amount");
    assert_eq!(waiting["amount_micros"], 3_000_000);
    assert_eq!(waiting["idempotency_key"], "big");
    let id = waiting["approval_id"].as_str().expect("approval id").to_owned();
    // The reservation counts as held at once.
    assert_eq!(held(&app, &agent).await, 3_500_000);
    // Nothing can settle it before the decision.
    let (status, early) = app.settle(&agent, &id, 3_000_000).await;
    assert_eq!((status, early["code"].as_str()), (409, Some("hold_pending_approval")), "{early}");
    // Repeating the request while pending: 202 again, same approval.
    let (status, again) = keyed_hold(&app, &agent, "big", 3_000_000, "api.example.com").await;
    assert_eq!((status, again["approval_id"].as_str()), (202, Some(id.as_str())), "{again}");
    // The agent sees its own approval; another agent does not.
    let (status, own) = app.agent_call(&agent.token, Method::GET, &format!("/v1/me/approvals/{id}"), None).await;
    assert_eq!((status, own["state"].as_str()), (200, Some("pending")), "{own}");
    let other = app.create_agent("nosy", 1_000_000, None).await;
    let (status, _) = app.agent_call(&other.token, Method::GET, &format!("/v1/me/approvals/{id}"), None).await;
    assert_eq!(status, 404);
    let (status, listed) = app.admin(Method::GET, "/v1/approvals?state=pending", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["approvals"].as_array().map(Vec::len), Some(1), "{listed}");

    let (status, decided) = decide(&app, &id, "approve", "ok for the quarterly report").await;
    assert_eq!((status, decided["state"].as_str()), (200, Some("approved")), "{decided}");
    assert_eq!(decided["by"], "admin");
    // Deciding again the same way replays; the other way is refused.
    assert_eq!(decide(&app, &id, "approve", "").await.0, 200);
    let (status, conflict) = decide(&app, &id, "deny", "").await;
    assert_eq!((status, conflict["code"].as_str()), (409, Some("approval_decided")), "{conflict}");

    let (status, resumed) = keyed_hold(&app, &agent, "big", 3_000_000, "api.example.com").await;
    assert_eq!((status, resumed["hold_id"].as_str()), (201, Some(id.as_str())), "{resumed}");
    assert_eq!(held(&app, &agent).await, 3_500_000, "the resume reuses the reservation");
    let (status, settled) = app.settle(&agent, &id, 2_500_000).await;
    assert_eq!(status, 200, "{settled}");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(2_500_000), Some(500_000)));

    let log = app.log().await;
    let hold = log.iter().find(|e| e["event"] == "hold" && e["hold"] == id.as_str()).expect("hold entry");
    assert_eq!(hold["approval"], "above_amount", "{hold}");
    let approve = log.iter().find(|e| e["event"] == "approve").expect("approve entry");
    assert_eq!(approve["hold"], id.as_str());
    assert!(approve["detail"].as_str().unwrap_or("").contains("quarterly report"), "{approve}");
}

#[tokio::test]
async fn an_approved_payment_resumes_from_its_reservation_on_redis() {
    approve_then_resume_settles_once(spawn_app().await).await;
}

#[tokio::test]
async fn an_approved_payment_resumes_from_its_reservation_in_memory() {
    approve_then_resume_settles_once(
        spawn_app_with(AppOptions { backend: Backend::Memory, ..Default::default() }).await,
    )
    .await;
}

async fn denial_releases_money(app: TestApp) {
    let agent = app.create_agent("denied", 5_000_000, None).await;
    set_approval(&app, "denied", json!({ "services": ["*.casino.example"] })).await;
    let (status, waiting) = keyed_hold(&app, &agent, "bet", 4_000_000, "slots.casino.example").await;
    assert_eq!((status, waiting["reason"].as_str()), (202, Some("listed_service")), "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    // Only the reservation's headroom is left meanwhile.
    let (status, refused) = keyed_hold(&app, &agent, "other", 1_500_000, "api.example.com").await;
    assert_eq!((status, refused["code"].as_str()), (402, Some("cap_exceeded")), "{refused}");
    let (status, decided) = decide(&app, &id, "deny", "no gambling").await;
    assert_eq!((status, decided["state"].as_str()), (200, Some("denied")), "{decided}");
    assert_eq!(held(&app, &agent).await, 0, "denial releases the reservation");
    let (status, answer) = keyed_hold(&app, &agent, "bet", 4_000_000, "slots.casino.example").await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("approval_denied")), "{answer}");
    assert_eq!(answer["note"], "no gambling");
    let (status, _) = keyed_hold(&app, &agent, "other-2", 1_500_000, "api.example.com").await;
    assert_eq!(status, 201, "the released money is spendable again");
    let log = app.log().await;
    let void = log.iter().find(|e| e["event"] == "void" && e["hold"] == id.as_str()).expect("void entry");
    assert_eq!(void["reason"], "approval_denied", "{void}");
}

#[tokio::test]
async fn denial_releases_the_reservation_on_redis() {
    denial_releases_money(spawn_app().await).await;
}

#[tokio::test]
async fn denial_releases_the_reservation_in_memory() {
    denial_releases_money(spawn_app_with(AppOptions { backend: Backend::Memory, ..Default::default() }).await).await;
}

async fn expiry_without_sweeper(app: TestApp) {
    let agent = app.create_agent("lapsing", 5_000_000, None).await;
    set_approval(&app, "lapsing", json!({ "new_service": true, "ttl_secs": 60 })).await;
    let (status, waiting) = keyed_hold(&app, &agent, "k", 1_000_000, "new.example.com").await;
    assert_eq!((status, waiting["reason"].as_str()), (202, Some("new_service")), "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    // The ledger's clock (the test seam) passes the approval's time; no sweeper runs.
    app.clock.advance_ms(61_000);
    assert_eq!(held(&app, &agent).await, 0, "the lapsed approval's money is back");
    let (status, answer) = keyed_hold(&app, &agent, "k", 1_000_000, "new.example.com").await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("approval_expired")), "{answer}");
    let (status, late) = decide(&app, &id, "approve", "too late").await;
    assert_eq!((status, late["code"].as_str()), (409, Some("approval_expired")), "{late}");
    let (_, shown) = app.admin(Method::GET, &format!("/v1/approvals/{id}"), None).await;
    assert_eq!(shown["state"], "expired");
    let log = app.log().await;
    let lapse = log.iter().find(|e| e["event"] == "expire" && e["hold"] == id.as_str()).expect("expire entry");
    assert_eq!(lapse["reason"], "approval_expired", "{lapse}");

    // A service the agent settled with is no longer new.
    let (status, waiting) = keyed_hold(&app, &agent, "k2", 1_000_000, "new.example.com").await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    assert_eq!(decide(&app, &id, "approve", "").await.0, 200);
    assert_eq!(keyed_hold(&app, &agent, "k2", 1_000_000, "new.example.com").await.0, 201);
    assert_eq!(app.settle(&agent, &id, 1_000_000).await.0, 200);
    let (status, again) = keyed_hold(&app, &agent, "k3", 1_000_000, "new.example.com").await;
    assert_eq!(status, 201, "a seen service needs no approval: {again}");
}

#[tokio::test]
async fn an_unapproved_payment_lapses_by_the_ledger_clock_without_a_sweeper_on_redis() {
    expiry_without_sweeper(spawn_app().await).await;
}

#[tokio::test]
async fn an_unapproved_payment_lapses_by_the_ledger_clock_without_a_sweeper_in_memory() {
    expiry_without_sweeper(spawn_app_with(AppOptions { backend: Backend::Memory, ..Default::default() }).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_racing_payments_never_overtake_a_payment_waiting_for_approval() {
    let a = spawn_app().await;
    let redis = a.redis.clone().expect("redis");
    let b =
        spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), clock: a.clock.clone(), ..Default::default() })
            .await;
    let cap = 10_000_000;
    let agent = a.create_agent("racer", cap, None).await;
    set_approval(&a, "racer", json!({ "above_micros": 5_000_000 })).await;
    let (status, waiting) = keyed_hold(&a, &agent, "the-big-one", 6_000_000, "api.example.com").await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    // 50 payments of 100,000 race on both instances (only 4,000,000 of headroom is left) while
    // the decision lands in the middle of them.
    let apps = [&a, &b];
    let agent = Arc::new(agent);
    let racing = join_all((0..50).map(|i| {
        let agent = agent.clone();
        async move { keyed_hold(apps[i % 2], &agent, &format!("small-{i}"), 100_000, "api.example.com").await }
    }));
    let deciding = decide(&b, &id, "approve", "go");
    let (outcomes, (status, decided)) = tokio::join!(racing, deciding);
    assert_eq!(status, 200, "{decided}");
    let granted = outcomes.iter().filter(|(s, _)| *s == 201).count() as u64;
    for (status, body) in &outcomes {
        assert!(*status == 201 || (*status == 402 && body["code"] == "cap_exceeded"), "{status} {body}");
    }
    assert_eq!(granted, 40, "exactly the headroom left beside the reservation was granted");
    // The approved payment always completes: resumed on the other instance, settled once.
    let (status, resumed) = keyed_hold(&a, &agent, "the-big-one", 6_000_000, "api.example.com").await;
    assert_eq!((status, resumed["hold_id"].as_str()), (201, Some(id.as_str())), "{resumed}");
    assert_eq!(a.settle(&agent, &id, 6_000_000).await.0, 200);
    let shown = a.show(&agent.id).await;
    assert_eq!(shown["spent_micros"].as_u64(), Some(6_000_000));
    assert_eq!(shown["held_micros"].as_u64(), Some(4_000_000));
}

#[tokio::test]
async fn a_long_poll_wakes_on_the_decision() {
    let app = spawn_app().await;
    let agent = app.create_agent("waiter", 5_000_000, None).await;
    set_approval(&app, "waiter", json!({ "protocols": ["generic"] })).await;
    let (status, waiting) = keyed_hold(&app, &agent, "k", 1_000_000, "api.example.com").await;
    assert_eq!((status, waiting["reason"].as_str()), (202, Some("listed_protocol")), "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    let started = std::time::Instant::now();
    let path = format!("/v1/me/approvals/{id}?wait_secs=30");
    let wait = app.agent_call(&agent.token, Method::GET, &path, None);
    let later = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        decide(&app, &id, "deny", "not now").await
    };
    let ((status, seen), (decided, _)) = tokio::join!(wait, later);
    assert_eq!(decided, 200);
    assert_eq!((status, seen["state"].as_str()), (200, Some("denied")), "{seen}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "woke on the decision");
    let (status, bad) =
        app.agent_call(&agent.token, Method::GET, &format!("/v1/me/approvals/{id}?wait_secs=61"), None).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_query")));
}

#[tokio::test]
async fn bad_approval_rules_and_decisions_have_stable_codes() {
    let app = spawn_app().await;
    app.create_agent("ruled", 5_000_000, None).await;
    for (rule, code) in [
        (json!({ "ttl_secs": 60 }), "invalid_approval"),
        (json!({ "above_micros": 1, "ttl_secs": 0 }), "invalid_approval"),
        (json!({ "protocols": ["paypal"] }), "unknown_protocol"),
        (json!({ "above_micros": 1, "colour": "red" }), "invalid_controls"),
    ] {
        let (status, body) =
            app.admin(Method::PUT, "/v1/agents/ruled/controls", Some(json!({ "approval": rule }))).await;
        assert_eq!((status, body["code"].as_str()), (422, Some(code)), "{body}");
    }
    let (status, body) = decide(&app, "hd_nope", "approve", "").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("approval_not_found")), "{body}");
    let (status, body) = app.admin(Method::GET, "/v1/approvals?state=maybe", None).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_state")), "{body}");
}

#[tokio::test]
async fn an_x402_authorization_is_signed_only_after_approval_and_its_window_starts_then() {
    use adapters::x402::PaymentPayload;
    let app = crate::x402::app_with(crate::x402::config()).await;
    let server = crate::x402::v2_server("10000").await;
    let agent = app.create_agent("x402-approved", 1_000_000, None).await;
    set_approval(&app, "x402-approved", json!({ "above_micros": 5_000, "ttl_secs": 300 })).await;
    let body = json!({ "url": format!("{}/weather", server.uri()), "task": "weather" });

    let (status, waiting) = crate::x402::fetch(&app, &agent.token, body.clone(), Some("buy-1")).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert!(crate::x402::payments(&server).await.is_empty(), "nothing is signed or sent before approval");
    assert_eq!(held(&app, &agent).await, 10_000, "the price is held meanwhile");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();

    // The person decides 100 s later (the ledger's clock, the test seam).
    app.clock.advance_ms(100_000);
    let approved_secs = app.clock.now_ms() / 1000;
    assert_eq!(decide(&app, &id, "approve", "weather is fine").await.0, 200);
    let (status, paid) = crate::x402::fetch(&app, &agent.token, body.clone(), Some("buy-1")).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["payment"]["status"], "settled", "{paid}");
    let sent = crate::x402::payments(&server).await;
    assert_eq!(sent.len(), 1);
    let PaymentPayload::V2(v2) = &sent[0] else { panic!("a v2 payment") };
    let valid_before: u64 = v2.payload.authorization.valid_before.parse().expect("number");
    assert!(
        (approved_secs + 55..=approved_secs + 61).contains(&valid_before),
        "validBefore {valid_before} starts from the approval at {approved_secs}"
    );
    // Exactly once: the same request again replays the purchase.
    let (status, again) = crate::x402::fetch(&app, &agent.token, body, Some("buy-1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    assert_eq!(crate::x402::payments(&server).await.len(), 1);
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(10_000), Some(0)));
}

#[tokio::test]
async fn the_readme_approval_rule_is_accepted_as_written() {
    let readme = include_str!("../../README.md");
    let at = readme.find("<!-- approvals-rule").expect("README has the approvals-rule block");
    let open = readme[at..].find("```json\n").expect("a json block") + at + "```json\n".len();
    let close = readme[open..].find("```").expect("block ends") + open;
    let body: Value = serde_json::from_str(&readme[open..close]).expect("the block is JSON");
    let app = spawn_app().await;
    let agent = app.create_agent("readme-approvals", 10_000_000, None).await;
    let (status, shown) = app.admin(Method::PUT, "/v1/agents/readme-approvals/controls", Some(body)).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["approval"]["ttl_secs"], 900);
    let (status, waiting) = keyed_hold(&app, &agent, "k", 6_000_000, "api.example.com").await;
    assert_eq!((status, waiting["reason"].as_str()), (202, Some("above_amount")), "{waiting}");
}

#[tokio::test]
async fn approval_requests_and_decisions_are_signed_webhooks() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).and(path("/hooks")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let app = crate::alerts::app_with_alerts(&receiver, None).await;
    let agent = app.create_agent("hooked", 10_000_000, None).await;
    set_approval(&app, "hooked", json!({ "above_micros": 1_000_000 })).await;
    let (_, first) = keyed_hold(&app, &agent, "a", 2_000_000, "api.example.com").await;
    let (_, second) = keyed_hold(&app, &agent, "b", 3_000_000, "api.example.com").await;
    let (first, second) = (first["approval_id"].as_str().expect("id"), second["approval_id"].as_str().expect("id"));
    assert_eq!(decide(&app, first, "approve", "fine").await.0, 200);
    assert_eq!(decide(&app, second, "deny", "too much").await.0, 200);
    crate::support::wait_for("the approval webhooks", std::time::Duration::from_secs(20), || async {
        let alerts = crate::alerts::received(&receiver, &app).await;
        alerts.iter().filter(|a| a["type"] == "approval.requested").count() >= 2
            && alerts.iter().filter(|a| a["type"] == "approval.decided").count() >= 2
    })
    .await;
    let alerts = crate::alerts::received(&receiver, &app).await;
    let requested = alerts.iter().find(|a| a["type"] == "approval.requested" && a["data"]["approval_id"] == first);
    let requested = requested.expect("requested");
    assert_eq!(
        (requested["data"]["reason"].as_str(), requested["data"]["amount_micros"].as_u64()),
        (Some("above_amount"), Some(2_000_000))
    );
    let decided = |id: &str| {
        alerts
            .iter()
            .find(|a| a["type"] == "approval.decided" && a["data"]["approval_id"] == id)
            .expect("decided")
            .clone()
    };
    assert_eq!(
        (decided(first)["data"]["decision"].as_str(), decided(first)["data"]["note"].as_str()),
        (Some("approved"), Some("fine"))
    );
    assert_eq!(
        (decided(second)["data"]["decision"].as_str(), decided(second)["data"]["by"].as_str()),
        (Some("denied"), Some("admin"))
    );
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_approves_and_denies() {
    let app = spawn_app().await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(args)
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", crate::support::ADMIN_TOKEN)
            .output()
            .expect("runs the CLI");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let agent = app.create_agent("cli-approvals", 10_000_000, None).await;
    set_approval(&app, "cli-approvals", json!({ "above_micros": 1_000_000 })).await;
    let (ok, empty) = cli(&["approvals", "list"]);
    assert!(ok && empty.starts_with("no approvals"), "{empty}");
    let (_, a) = keyed_hold(&app, &agent, "a", 2_000_000, "api.example.com").await;
    let (_, b) = keyed_hold(&app, &agent, "b", 3_000_000, "api.example.com").await;
    let (a, b) = (a["approval_id"].as_str().expect("id"), b["approval_id"].as_str().expect("id"));
    let (ok, listed) = cli(&["approvals", "list", "--state", "pending"]);
    assert!(ok && listed.contains(a) && listed.contains(b) && listed.contains("above_amount"), "{listed}");
    let (ok, approved) = cli(&["approvals", "approve", a, "--note", "fine"]);
    assert!(ok && approved.contains("approved"), "{approved}");
    let (ok, denied) = cli(&["approvals", "deny", b, "--note", "no"]);
    assert!(ok && denied.contains("denied"), "{denied}");
    assert_eq!(held(&app, &agent).await, 2_000_000, "the denied one is released");
    let (ok, pending) = cli(&["approvals", "list", "--state", "pending"]);
    assert!(ok && pending.starts_with("no approvals"), "{pending}");
    let (ok, json_out) = cli(&["approvals", "list", "--json"]);
    assert!(ok, "{json_out}");
    let parsed: Value = serde_json::from_str(&json_out).expect("JSON");
    assert_eq!(parsed["approvals"].as_array().map(Vec::len), Some(2));
}

/// A query string that does not parse is a JSON `400 invalid_query`, on both approval reads
/// (the API fuzzer found `wait_secs=-1` answered with axum's plain-text rejection).
#[tokio::test]
async fn a_bad_wait_is_a_json_invalid_query() {
    let app = spawn_app().await;
    let agent = app.create_agent("bad-wait", 1_000_000, None).await;
    let id = format!("hd_{}_000000000000000000000000", agent.tree);
    let (status, body) = app.admin(Method::GET, &format!("/v1/approvals/{id}?wait_secs=-1"), None).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_query")), "{body}");
    let (status, body) =
        app.agent_call(&agent.token, Method::GET, &format!("/v1/me/approvals/{id}?wait_secs=-1"), None).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_query")), "{body}");
}

/// An agent withdraws a protocol payment that waits for approval (nothing was signed or sent for
/// it) through the generic void; once approved, the same void is refused again, since the
/// payment may then be in flight.
async fn withdraw_a_waiting_x402_payment(backend: Backend) {
    use spendcap::protocols::ProtocolConfig;
    let protocols = ProtocolConfig { x402: crate::x402::config(), ..Default::default() };
    let app = spawn_app_with(AppOptions { protocols, backend, ..Default::default() }).await;
    let server = crate::x402::v2_server("10000").await;
    let agent = app.create_agent("x402-withdrawn", 1_000_000, None).await;
    set_approval(&app, "x402-withdrawn", json!({ "above_micros": 5_000, "ttl_secs": 300 })).await;
    let body = json!({ "url": format!("{}/weather", server.uri()), "task": "weather" });
    let void = |id: String| {
        let app = &app;
        let token = agent.token.clone();
        async move {
            app.agent_call(
                &token,
                Method::POST,
                &format!("/v1/holds/{id}/void"),
                Some(json!({ "reason": "user_said_no" })),
            )
            .await
        }
    };

    let (status, waiting) = crate::x402::fetch(&app, &agent.token, body.clone(), Some("buy-1")).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    assert_eq!(held(&app, &agent).await, 10_000);
    let (status, voided) = void(id.clone()).await;
    assert_eq!((status, voided["released_micros"].as_u64()), (200, Some(10_000)), "{voided}");
    assert_eq!(held(&app, &agent).await, 0, "the withdrawn payment's money is back at once");
    let (status, again) = void(id.clone()).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    let (_, shown) = app.admin(Method::GET, &format!("/v1/approvals/{id}"), None).await;
    assert_eq!(shown["state"], "canceled", "{shown}");
    let (status, late) = decide(&app, &id, "approve", "too late").await;
    assert_eq!((status, late["code"].as_str()), (409, Some("approval_decided")), "{late}");
    let (status, answer) = crate::x402::fetch(&app, &agent.token, body.clone(), Some("buy-1")).await;
    assert_eq!((status, answer["code"].as_str()), (409, Some("hold_voided")), "{answer}");
    assert!(crate::x402::payments(&server).await.is_empty(), "nothing was ever signed or sent");

    // Once approved, the hold is an x402 purchase's: the agent cannot void it.
    let (status, waiting) = crate::x402::fetch(&app, &agent.token, body, Some("buy-2")).await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    assert_eq!(decide(&app, &id, "approve", "fine").await.0, 200);
    let (status, refused) = void(id).await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("hold_protocol_mismatch")), "{refused}");
    assert_eq!(held(&app, &agent).await, 10_000);
}

#[tokio::test]
async fn an_agent_withdraws_a_protocol_payment_waiting_for_approval_on_redis() {
    withdraw_a_waiting_x402_payment(Backend::Redis).await;
}

#[tokio::test]
async fn an_agent_withdraws_a_protocol_payment_waiting_for_approval_in_memory() {
    withdraw_a_waiting_x402_payment(Backend::Memory).await;
}

/// AP2 v0.1 (a merchant-signed CartMandate paid with a PaymentMandate): a cart an approval rule
/// matches is held and waits (202); no PaymentMandate reaches the processor until a person
/// approves; the same request then pays exactly once. A denied cart is refused
/// `approval_denied`, its money released and nothing sent.
#[tokio::test]
async fn an_ap2_v01_cart_waits_for_approval_and_pays_once_or_is_denied() {
    use crate::ap2::{cart_request, pay_cart, received, USD};
    let (app, processor, _cp, _shop) = crate::ap2::v01_world().await;
    let agent = app.create_agent("v01-approved", 500 * USD, None).await;
    set_approval(&app, "v01-approved", json!({ "above_micros": 10 * USD, "ttl_secs": 600 })).await;
    let now = (app.clock.now_ms() / 1000) as i64;

    let cart = cart_request(now, "cart_approved", 2_500, "t-approved");
    let (status, waiting) = pay_cart(&app, &agent, Some("v01-a"), &cart).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert_eq!((waiting["reason"].as_str(), waiting["amount_micros"].as_u64()), (Some("above_amount"), Some(25 * USD)));
    assert!(received(&processor).await.is_empty(), "no PaymentMandate before the decision");
    assert_eq!(held(&app, &agent).await, 25 * USD, "held meanwhile");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    let (status, again) = pay_cart(&app, &agent, Some("v01-a"), &cart).await;
    assert_eq!((status, again["approval_id"].as_str()), (202, Some(id.as_str())), "still waiting: {again}");
    assert!(received(&processor).await.is_empty());

    assert_eq!(decide(&app, &id, "approve", "gift cards are fine").await.0, 200);
    let (status, paid) = pay_cart(&app, &agent, Some("v01-a"), &cart).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["hold_id"].as_str(), Some(id.as_str()), "the approved reservation paid: {paid}");
    let (status, replayed) = pay_cart(&app, &agent, Some("v01-a"), &cart).await;
    assert_eq!((status, replayed["replayed"].as_bool()), (200, Some(true)), "{replayed}");
    assert_eq!(received(&processor).await.len(), 1, "one PaymentMandate presented");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(25 * USD), Some(0)));

    let denied_cart = cart_request(now, "cart_denied", 3_000, "t-denied");
    let (status, waiting) = pay_cart(&app, &agent, Some("v01-d"), &denied_cart).await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    assert_eq!(decide(&app, &id, "deny", "not this one").await.0, 200);
    let (status, refused) = pay_cart(&app, &agent, Some("v01-d"), &denied_cart).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("approval_denied")), "{refused}");
    assert_eq!(received(&processor).await.len(), 1, "nothing more reached the processor");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(25 * USD), Some(0)));
}

/// MPP (`stripe` charge through the official `mpp` crate's server): a charge an approval rule
/// matches is held and waits (202) with no Shared Payment Token minted and no credential sent to
/// the shop; approved, the same request pays exactly once; denied, it is `approval_denied` with
/// its money released and nothing minted or charged.
#[tokio::test]
async fn an_mpp_charge_waits_for_approval_and_pays_once_or_is_denied() {
    use std::sync::atomic::Ordering;
    let world = crate::mpp::world().await;
    let app = &world.app;
    let minted = || world.stripe.mint_requests.load(Ordering::SeqCst);
    let charges = || world.stripe.charges.lock().expect("lock").len();
    let credentials = || world.shop.credentials.lock().expect("lock").len();
    let agent = app.create_agent("mpp-approved", 1_000_000, None).await;
    set_approval(app, "mpp-approved", json!({ "protocols": ["mpp"], "ttl_secs": 600 })).await;

    let (status, waiting) = crate::mpp::fetch(&world, &agent.token, Some("mpp-a"), None).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert_eq!(
        (waiting["reason"].as_str(), waiting["amount_micros"].as_u64()),
        (Some("listed_protocol"), Some(100_000))
    );
    assert_eq!((minted(), charges(), credentials()), (0, 0, 0), "nothing minted, charged or sent before approval");
    assert_eq!(held(app, &agent).await, 100_000, "the price is held meanwhile");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();

    assert_eq!(decide(app, &id, "approve", "ok").await.0, 200);
    let (status, paid) = crate::mpp::fetch(&world, &agent.token, Some("mpp-a"), None).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(
        (paid["payment"]["status"].as_str(), paid["body"].as_str()),
        (Some("settled"), Some("the paid content"))
    );
    let (status, again) = crate::mpp::fetch(&world, &agent.token, Some("mpp-a"), None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!((minted(), charges()), (1, 1), "paid exactly once");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(100_000), Some(0)));

    let (status, waiting) = crate::mpp::fetch(&world, &agent.token, Some("mpp-d"), None).await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();
    let sent = credentials();
    assert_eq!(decide(app, &id, "deny", "no").await.0, 200);
    let (status, refused) = crate::mpp::fetch(&world, &agent.token, Some("mpp-d"), None).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("approval_denied")), "{refused}");
    assert_eq!((minted(), charges(), credentials()), (1, 1, sent), "nothing more minted, charged or sent");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(100_000), Some(0)));
}

// Keyed APIs (`/v1/apis/...`) under an approval rule, against the simulated LLM provider, which
// counts the calls it billed.

async fn keyed_api_app(provider: &spendcap::sim::llm::LlmProvider) -> TestApp {
    let api = spendcap::protocols::api::ApiConfig::from_json(&provider.apis_json().to_string()).expect("valid APIs");
    let protocols = spendcap::protocols::ProtocolConfig { api, ..Default::default() };
    spawn_app_with(AppOptions { protocols, ..Default::default() }).await
}

/// A chat completion through the daemon, with `key` as its `Idempotency-Key` when given.
async fn keyed_api_call(app: &TestApp, agent: &Agent, key: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let body = json!({ "model": "sim-gpt", "max_tokens": 5, "messages": [ { "role": "user", "content": "Hi" } ] });
    let mut request =
        app.http.post(app.url("/v1/apis/openai/v1/chat/completions")).bearer_auth(&agent.token).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("request");
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, headers, response.json().await.expect("json"))
}

#[tokio::test]
async fn a_keyed_api_call_waits_for_approval_and_its_resume_calls_the_provider_exactly_once() {
    let provider = spendcap::sim::llm::LlmProvider::start().await.expect("LLM provider");
    let app = keyed_api_app(&provider).await;
    let agent = app.create_agent("llm-approved", 10_000_000, None).await;
    set_approval(&app, "llm-approved", json!({ "services": ["openai"], "ttl_secs": 600 })).await;

    let (status, _, waiting) = keyed_api_call(&app, &agent, Some("chat-1")).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert_eq!(waiting["idempotency_key"], "chat-1", "{waiting}");
    let id = waiting["approval_id"].as_str().expect("approval id").to_owned();
    let bound = waiting["amount_micros"].as_u64().expect("amount");
    assert_eq!((provider.billed_calls(), held(&app, &agent).await), (0, bound), "held, nothing sent");
    // Repeated while pending: the same approval, still nothing sent.
    let (status, _, again) = keyed_api_call(&app, &agent, Some("chat-1")).await;
    assert_eq!((status, again["approval_id"].as_str()), (202, Some(id.as_str())), "{again}");
    assert_eq!(provider.billed_calls(), 0);

    let (status, decided) = decide(&app, &id, "approve", "ok").await;
    assert_eq!(status, 200, "{decided}");
    let (status, headers, answer) = keyed_api_call(&app, &agent, Some("chat-1")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(headers["x-spendcap-payment"], "settled");
    assert_eq!(headers["x-spendcap-hold-id"].to_str().ok(), Some(id.as_str()), "the approved hold pays the call");
    assert!(answer["choices"][0]["message"]["content"].is_string(), "{answer}");
    assert_eq!(provider.billed_calls(), 1);
    let shown = app.show(&agent.id).await;
    assert_eq!(shown["held_micros"], 0, "{shown}");
    assert!(shown["spent_micros"].as_u64().is_some_and(|spent| spent > 0 && spent <= bound), "{shown}");
    // The key's call was made: a further repeat is not sent again.
    let (status, headers, replayed) = keyed_api_call(&app, &agent, Some("chat-1")).await;
    assert_eq!((status, replayed["code"].as_str()), (409, Some("api_already_called")), "{replayed}");
    assert_eq!((replayed["replayed"].as_bool(), replayed["hold_id"].as_str()), (Some(true), Some(id.as_str())));
    assert_eq!(headers["x-spendcap-error"], "api_already_called");
    assert_eq!(provider.billed_calls(), 1, "paid once");

    // Without an Idempotency-Key, the 202 names the key the daemon gave the call; resuming with
    // it calls the provider once more.
    let (status, _, waiting) = keyed_api_call(&app, &agent, None).await;
    assert_eq!(status, 202, "{waiting}");
    let key = waiting["idempotency_key"].as_str().expect("a key to resume with").to_owned();
    let id = waiting["approval_id"].as_str().expect("approval id").to_owned();
    assert_eq!(decide(&app, &id, "approve", "").await.0, 200);
    let (status, _, answer) = keyed_api_call(&app, &agent, Some(&key)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(provider.billed_calls(), 2);
}

#[tokio::test]
async fn a_denied_keyed_api_call_sends_nothing_and_releases_its_bound() {
    let provider = spendcap::sim::llm::LlmProvider::start().await.expect("LLM provider");
    let app = keyed_api_app(&provider).await;
    let agent = app.create_agent("llm-denied", 10_000_000, None).await;
    set_approval(&app, "llm-denied", json!({ "protocols": ["api"] })).await;
    let (status, _, waiting) = keyed_api_call(&app, &agent, Some("chat-2")).await;
    assert_eq!(status, 202, "{waiting}");
    let id = waiting["approval_id"].as_str().expect("approval id").to_owned();
    assert_eq!(decide(&app, &id, "deny", "not today").await.0, 200);
    let (status, headers, answer) = keyed_api_call(&app, &agent, Some("chat-2")).await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("approval_denied")), "{answer}");
    assert_eq!(headers["x-spendcap-error"], "approval_denied");
    assert_eq!(provider.billed_calls(), 0, "nothing was sent");
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["held_micros"].as_u64(), shown["spent_micros"].as_u64()), (Some(0), Some(0)), "{shown}");
}

/// An agent lists its own approvals (and only its own), in one state or all: how a process that
/// did not make the payment finds what waits for a person.
#[tokio::test]
async fn an_agent_lists_its_own_approvals_and_no_one_else_s() {
    let app = spawn_app().await;
    let agent = app.create_agent("lister", 10_000_000, None).await;
    let other = app.create_agent("other-lister", 10_000_000, None).await;
    for handle in ["lister", "other-lister"] {
        set_approval(&app, handle, json!({ "above_micros": 1_000 })).await;
    }
    let (status, first) = keyed_hold(&app, &agent, "a", 2_000, "api.example.com").await;
    assert_eq!(status, 202, "{first}");
    let (status, second) = keyed_hold(&app, &agent, "b", 3_000, "api.example.com").await;
    assert_eq!(status, 202, "{second}");
    let (status, theirs) = keyed_hold(&app, &other, "c", 4_000, "api.example.com").await;
    assert_eq!(status, 202, "{theirs}");
    assert_eq!(decide(&app, first["approval_id"].as_str().expect("id"), "deny", "no").await.0, 200);

    let ids = |list: &Value| -> Vec<String> {
        list["approvals"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|a| a["approval_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let (status, all) = app.agent_call(&agent.token, Method::GET, "/v1/me/approvals", None).await;
    assert_eq!(status, 200, "{all}");
    let mut expected = vec![
        second["approval_id"].as_str().expect("id").to_owned(),
        first["approval_id"].as_str().expect("id").to_owned(),
    ];
    let mut got = ids(&all);
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "its own two, not the other agent's");
    let (status, pending) = app.agent_call(&agent.token, Method::GET, "/v1/me/approvals?state=pending", None).await;
    assert_eq!(status, 200, "{pending}");
    assert_eq!(ids(&pending), vec![second["approval_id"].as_str().expect("id").to_owned()]);
    let (status, bad) = app.agent_call(&agent.token, Method::GET, "/v1/me/approvals?state=maybe", None).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_state")), "{bad}");
    let (status, _) = app.agent_call("sct_not_a_token", Method::GET, "/v1/me/approvals", None).await;
    assert_eq!(status, 401);
}
