//! Orchestrators fund sub-agents (issue 18): `POST /v1/me/agents` within the caller's remaining
//! budget and controls, decided atomically by the ledger; the parent revokes its own sub-agents;
//! task-scoped tokens whose payments are the task's, refused after expiry (by the ledger's
//! clock), with revocation or with their agent's.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app_with, Agent, AppOptions, Backend, TestApp};

async fn app(backend: Backend) -> TestApp {
    spawn_app_with(AppOptions { backend, ..Default::default() }).await
}

/// `POST /v1/me/agents` as `parent`.
async fn spawn_child(app: &TestApp, parent: &Agent, body: Value) -> (u16, Value) {
    app.agent_call(&parent.token, Method::POST, "/v1/me/agents", Some(body)).await
}

fn child_of(created: &Value) -> Agent {
    Agent {
        id: created["agent"]["id"].as_str().expect("id").to_owned(),
        token: created["token"].as_str().expect("token").to_owned(),
        tree: created["agent"]["tree"].as_str().expect("tree").to_owned(),
    }
}

fn assert_exceeds(status: u16, body: &Value, bound: &str) {
    assert_eq!((status, body["code"].as_str()), (403, Some("sub_agent_exceeds_parent")), "{body}");
    assert_eq!(body["bound"], bound, "{body}");
}

async fn sub_agent_budget_is_what_the_parent_has_left(backend: Backend) {
    let app = app(backend).await;
    let root = app.create_agent("root", 50_000_000, None).await;
    let parent = app.create_agent("orchestrator", 10_000_000, Some(&root.id)).await;
    // 3 USD held (open) and 1 USD settled: 6 USD left.
    let (status, held) = app.hold(&parent, 3_000_000).await;
    assert_eq!(status, 201, "{held}");
    let (_, spent) = app.hold(&parent, 1_000_000).await;
    let (status, _) = app.settle(&parent, spent["hold_id"].as_str().expect("hold id"), 1_000_000).await;
    assert_eq!(status, 200);
    let log_before = app.log().await.len();

    let (status, body) = spawn_child(&app, &parent, json!({"handle": "too-big", "cap_micros": 6_000_001})).await;
    assert_exceeds(status, &body, "cap");
    assert_eq!(app.log().await.len(), log_before, "a refused creation logs nothing");
    let (status, list) = app.agent_call(&parent.token, Method::GET, "/v1/me/agents", None).await;
    assert_eq!((status, list["agents"].as_array().map(Vec::len)), (200, Some(0)), "{list}");

    let (status, created) = spawn_child(&app, &parent, json!({"handle": "exact", "cap_micros": 6_000_000})).await;
    assert_eq!(status, 201, "at exactly what is left: {created}");
    assert_eq!(created["agent"]["parent"], parent.id.as_str());
    assert_eq!(app.log().await.len(), log_before + 1, "one create entry");
    // The first sub-agent has all of it: nothing is left to give, not even 1 micro.
    let (status, body) = spawn_child(&app, &parent, json!({"handle": "one-more", "cap_micros": 1})).await;
    assert_exceeds(status, &body, "cap");

    // The child's spend is the parent's (and the root's).
    let child = child_of(&created);
    let (status, hold) = app.hold(&child, 2_000_000).await;
    assert_eq!(status, 201, "{hold}");
    app.settle(&child, hold["hold_id"].as_str().expect("hold id"), 2_000_000).await;
    let shown = app.show(&parent.id).await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(3_000_000), Some(3_000_000)));
    assert_eq!(app.show(&root.id).await["spent_micros"], 3_000_000);
    // The child's own money is not given twice: still nothing left for another sub-agent.
    let (status, body) = spawn_child(&app, &parent, json!({"handle": "after-spend", "cap_micros": 1})).await;
    assert_exceeds(status, &body, "cap");
    // Revoking the child gives its unused grant back to the parent (its 2 USD stay spent).
    let (status, body) = app
        .agent_call(
            &parent.token,
            Method::POST,
            &format!("/v1/me/agents/{}/revoke", child.id),
            Some(json!({"reason": "done"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = spawn_child(&app, &parent, json!({"handle": "second", "cap_micros": 4_000_000})).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_sub_agent_gets_at_most_what_the_parent_has_left_redis() {
    sub_agent_budget_is_what_the_parent_has_left(Backend::Redis).await;
}

#[tokio::test]
async fn a_sub_agent_gets_at_most_what_the_parent_has_left_memory() {
    sub_agent_budget_is_what_the_parent_has_left(Backend::Memory).await;
}

async fn looser_controls_are_refused(backend: Backend) {
    let app = app(backend).await;
    let parent = app.create_agent("controlled", 100_000_000, None).await;
    let (status, body) = app
        .admin(
            Method::PUT,
            &format!("/v1/agents/{}/controls", parent.id),
            Some(json!({
                "task_cap_micros": 5_000_000,
                "limits": {"per_payment": 2_000_000, "daily": 10_000_000},
                "services": {"allow": ["api.example.com", "*.tools.example"], "deny": ["bad.tools.example"]},
                "protocols": {"deny": ["acp"]},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, hold) = app.hold(&parent, 1_500_000).await;
    assert_eq!(status, 201, "{hold}");
    let log_before = app.log().await.len();
    let cases = [
        (json!({"limits": {"per_payment": 2_000_001}}), "per_payment"),
        (json!({"task_cap_micros": 6_000_000}), "task"),
        // 1.5 USD of today's 10 is used: 8.5 left.
        (json!({"limits": {"daily": 8_500_001}}), "daily"),
        (json!({"services": {"allow": ["other.example.com"]}}), "svc_allow"),
        (json!({"services": {"deny": ["something.else"]}}), "svc_deny"),
        (json!({"protocols": {"deny": ["ap2"]}}), "proto_deny"),
    ];
    for (i, (controls, bound)) in cases.iter().enumerate() {
        let (status, body) = spawn_child(
            &app,
            &parent,
            json!({"handle": format!("loose-{i}"), "cap_micros": 1_000_000, "controls": controls}),
        )
        .await;
        assert_exceeds(status, &body, bound);
    }
    let (status, body) =
        app.admin(Method::PUT, &format!("/v1/agents/{}/expiry", parent.id), Some(json!({"ttl_secs": 3600}))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        spawn_child(&app, &parent, json!({"handle": "late", "cap_micros": 1_000_000, "ttl_secs": 7200})).await;
    assert_exceeds(status, &body, "expires_at");
    assert_eq!(app.log().await.len(), log_before + 1, "refusals log nothing (the expiry change is one entry)");

    // As tight or tighter: allowed.
    let (status, body) = spawn_child(
        &app,
        &parent,
        json!({"handle": "tight", "cap_micros": 1_000_000, "ttl_secs": 1800, "controls": {
            "task_cap_micros": 5_000_000,
            "limits": {"per_payment": 1_000_000, "daily": 8_500_000},
            "services": {"allow": ["a.tools.example"], "deny": ["bad.tools.example", "worse.example"]},
            "protocols": {"deny": ["acp", "ap2"]},
        }}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // Stating nothing inherits the parent's controls, which apply to the sub-agent anyway.
    let (status, created) = spawn_child(&app, &parent, json!({"handle": "plain", "cap_micros": 1_000_000})).await;
    assert_eq!(status, 201, "{created}");
    let plain = child_of(&created);
    let (status, body) = app
        .agent_call(
            &plain.token,
            Method::POST,
            "/v1/holds",
            Some(json!({"amount_micros": 100, "service": "elsewhere.example.org"})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (402, Some("service_denied")), "{body}");
}

#[tokio::test]
async fn looser_controls_are_refused_redis() {
    looser_controls_are_refused(Backend::Redis).await;
}

#[tokio::test]
async fn looser_controls_are_refused_memory() {
    looser_controls_are_refused(Backend::Memory).await;
}

#[tokio::test]
async fn concurrent_sub_agent_creations_never_promise_more_than_the_parent_has() {
    let app = Arc::new(app(Backend::Redis).await);
    let parent = Arc::new(app.create_agent("racer", 10_000_000, None).await);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (app, parent) = (app.clone(), parent.clone());
        tasks.push(tokio::spawn(async move {
            spawn_child(&app, &parent, json!({"handle": format!("racer-{i}"), "cap_micros": 1_000_000})).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        match status {
            201 => created += 1,
            403 => assert_eq!(body["bound"], "cap", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 10, "exactly the parent's 10 USD was given out");
    let (_, list) = app.agent_call(&parent.token, Method::GET, "/v1/me/agents", None).await;
    let caps: u64 =
        list["agents"].as_array().expect("agents").iter().map(|a| a["cap_micros"].as_u64().expect("cap")).sum();
    assert_eq!(caps, 10_000_000, "{list}");
}

#[tokio::test]
async fn the_parent_revokes_its_own_sub_agents_and_nobody_else_s() {
    let app = app(Backend::Redis).await;
    let parent = app.create_agent("boss", 10_000_000, None).await;
    let other = app.create_agent("stranger", 10_000_000, None).await;
    let (_, created) = spawn_child(&app, &parent, json!({"handle": "worker", "cap_micros": 2_000_000})).await;
    let child = child_of(&created);
    let (_, created) = spawn_child(&app, &child, json!({"handle": "grandchild", "cap_micros": 1_000_000})).await;
    let grandchild = child_of(&created);
    let (_, created) = spawn_child(&app, &other, json!({"handle": "not-yours", "cap_micros": 1_000_000})).await;
    let foreign = child_of(&created);

    // The parent lists its descendants (both levels), the child only its own.
    let (_, list) = app.agent_call(&parent.token, Method::GET, "/v1/me/agents", None).await;
    let mut ids: Vec<&str> =
        list["agents"].as_array().expect("agents").iter().map(|a| a["id"].as_str().expect("id")).collect();
    ids.sort();
    let mut want = vec![child.id.as_str(), grandchild.id.as_str()];
    want.sort();
    assert_eq!(ids, want);

    // Another agent's child, the parent itself, its own parent, a stranger: all 404.
    for (who, target) in [(&parent, &foreign.id), (&parent, &parent.id), (&child, &parent.id), (&other, &child.id)] {
        let (status, body) = app
            .agent_call(
                &who.token,
                Method::POST,
                &format!("/v1/me/agents/{target}/revoke"),
                Some(json!({"reason": "x"})),
            )
            .await;
        assert_eq!((status, body["code"].as_str()), (404, Some("unknown_agent")), "{body}");
    }
    let (status, _) = app.hold(&foreign, 1).await;
    assert_eq!(status, 201, "the stranger's child was not touched");

    let (status, body) = app
        .agent_call(
            &parent.token,
            Method::POST,
            &format!("/v1/me/agents/{}/revoke", child.id),
            Some(json!({"reason": "runaway"})),
        )
        .await;
    assert_eq!((status, body["already_revoked"].as_bool()), (200, Some(false)), "{body}");
    for agent in [&child, &grandchild] {
        let (status, body) = app.hold(agent, 1).await;
        assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");
    }
    // A revoked agent (the child) creates nothing, and logs nothing trying.
    let log_before = app.log().await.len();
    let (status, body) = spawn_child(&app, &child, json!({"handle": "late-spawn", "cap_micros": 1})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
    let (status, body) = spawn_child(&app, &grandchild, json!({"handle": "late-spawn-2", "cap_micros": 1})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
    assert_eq!(app.log().await.len(), log_before);
}

#[tokio::test]
async fn a_revoked_parent_s_children_are_refused() {
    let app = app(Backend::Redis).await;
    let parent = app.create_agent("fallen", 10_000_000, None).await;
    let (_, created) = spawn_child(&app, &parent, json!({"handle": "orphan", "cap_micros": 2_000_000})).await;
    let child = child_of(&created);
    let (status, _) = app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", parent.id), Some(json!({"reason": "compromised"})))
        .await;
    assert_eq!(status, 200);
    let (status, body) = app.hold(&child, 1).await;
    assert_eq!(
        (status, body["code"].as_str(), body["limited_by"].as_str()),
        (402, Some("agent_revoked"), Some(parent.id.as_str())),
        "{body}"
    );
    let (status, body) = spawn_child(&app, &parent, json!({"handle": "new-orphan", "cap_micros": 1})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
}

/// `POST /v1/me/tokens` as `agent`.
async fn task_token(app: &TestApp, agent: &Agent, body: Value) -> (u16, Value) {
    app.agent_call(&agent.token, Method::POST, "/v1/me/tokens", Some(body)).await
}

async fn task_tokens_pay_for_their_task_until_they_expire(backend: Backend) {
    let app = app(backend).await;
    let agent = app.create_agent("tasker", 10_000_000, None).await;
    let (status, created) = task_token(&app, &agent, json!({"task": "summarise-q3", "ttl_secs": 60})).await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with(&format!("sct_{}_t", agent.id)), "{token}");
    let scoped = Agent {
        token: token.clone(),
        ..Agent { id: agent.id.clone(), token: String::new(), tree: agent.tree.clone() }
    };

    // Its payment is the task's, whatever the request names.
    let (status, body) = app
        .agent_call(
            &token,
            Method::POST,
            "/v1/holds",
            Some(json!({"amount_micros": 1_000, "service": "api.example.com", "task": "something-else"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let hold_id = body["hold_id"].as_str().expect("hold id").to_owned();
    let entry = app
        .log()
        .await
        .into_iter()
        .find(|e| e["event"] == "hold" && e["hold"] == hold_id.as_str())
        .expect("hold entry");
    assert_eq!(entry["task"], "summarise-q3", "{entry}");
    let (status, me) = app.agent_call(&token, Method::GET, "/v1/me", None).await;
    assert_eq!((status, me["held_micros"].as_u64()), (200, Some(1_000)), "{me}");

    // A task token manages nothing.
    let (status, body) = spawn_child(&app, &scoped, json!({"handle": "nope", "cap_micros": 1})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("task_token_not_allowed")), "{body}");
    let (status, body) = task_token(&app, &scoped, json!({"task": "t", "ttl_secs": 60})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("task_token_not_allowed")), "{body}");

    // After its TTL (the ledger's clock, moved by the test seam) it is refused, and logs nothing.
    app.clock.advance_ms(61_000);
    let log_before = app.log().await.len();
    let (status, body) = app.hold(&scoped, 1_000).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("token_expired")), "{body}");
    let (status, body) = app.agent_call(&token, Method::GET, "/v1/me", None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("token_expired")), "{body}");
    assert_eq!(app.log().await.len(), log_before);
    // The hold it made can still be ended with it: a known charge is always settled.
    let (status, body) = app.settle(&scoped, &hold_id, 1_000).await;
    assert_eq!(status, 200, "{body}");
    let (_, list) = app.agent_call(&agent.token, Method::GET, "/v1/me/tokens", None).await;
    assert_eq!(list["tokens"][0]["state"], "expired", "{list}");
}

#[tokio::test]
async fn task_tokens_pay_for_their_task_until_they_expire_redis() {
    task_tokens_pay_for_their_task_until_they_expire(Backend::Redis).await;
}

#[tokio::test]
async fn task_tokens_pay_for_their_task_until_they_expire_memory() {
    task_tokens_pay_for_their_task_until_they_expire(Backend::Memory).await;
}

#[tokio::test]
async fn task_tokens_die_with_revocation_and_only_descendants_get_them() {
    let app = app(Backend::Redis).await;
    let parent = app.create_agent("lead", 10_000_000, None).await;
    let other = app.create_agent("outsider", 10_000_000, None).await;
    let (_, created) = spawn_child(&app, &parent, json!({"handle": "helper", "cap_micros": 2_000_000})).await;
    let child = child_of(&created);

    // For a sub-agent: allowed; for anyone else (or its own parent): 404.
    let (status, for_child) =
        task_token(&app, &parent, json!({"task": "crawl", "ttl_secs": 600, "agent": child.id})).await;
    assert_eq!((status, for_child["agent_id"].as_str()), (201, Some(child.id.as_str())), "{for_child}");
    for (who, target) in [(&parent, &other.id), (&child, &parent.id), (&other, &child.id)] {
        let (status, body) = task_token(&app, who, json!({"task": "crawl", "ttl_secs": 600, "agent": target})).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("unknown_agent")), "{body}");
    }
    let child_token = for_child["token"].as_str().expect("token").to_owned();
    let (status, _) = app
        .agent_call(
            &child_token,
            Method::POST,
            "/v1/holds",
            Some(json!({"amount_micros": 10, "service": "api.example.com"})),
        )
        .await;
    assert_eq!(status, 201);

    // Revoking a token by id: only the owner's ancestors (or itself) can; then it is dead at once.
    let token_id = for_child["token_id"].as_str().expect("id").to_owned();
    let (status, body) = app.agent_call(&other.token, Method::DELETE, &format!("/v1/me/tokens/{token_id}"), None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_token")), "{body}");
    let (status, body) =
        app.agent_call(&parent.token, Method::DELETE, &format!("/v1/me/tokens/{token_id}"), None).await;
    assert_eq!((status, body["already_revoked"].as_bool()), (200, Some(false)), "{body}");
    let (status, body) = app.agent_call(&child_token, Method::GET, "/v1/me", None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("token_revoked")), "{body}");

    // The admin's task token for the child; revoking the child (by its parent) kills it.
    let (status, admin_token) = app
        .admin(
            Method::POST,
            &format!("/v1/agents/{}/tokens", child.id),
            Some(json!({"task": "index", "ttl_secs": 600})),
        )
        .await;
    assert_eq!(status, 201, "{admin_token}");
    let admin_token = admin_token["token"].as_str().expect("token").to_owned();
    let (status, _) = app
        .agent_call(
            &parent.token,
            Method::POST,
            &format!("/v1/me/agents/{}/revoke", child.id),
            Some(json!({"reason": "done"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = app
        .agent_call(
            &admin_token,
            Method::POST,
            "/v1/holds",
            Some(json!({"amount_micros": 10, "service": "api.example.com"})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");
    let (status, list) = app.admin(Method::GET, &format!("/v1/agents/{}/tokens", child.id), None).await;
    assert_eq!(status, 200, "{list}");
    let states: Vec<&str> =
        list["tokens"].as_array().expect("tokens").iter().map(|t| t["state"].as_str().expect("state")).collect();
    assert_eq!(states, vec!["revoked", "revoked"], "{list}");
    // A revoked agent mints no tokens.
    let (status, body) = app
        .admin(
            Method::POST,
            &format!("/v1/agents/{}/tokens", child.id),
            Some(json!({"task": "index", "ttl_secs": 600})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_revoked")), "{body}");
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_issues_a_task_token_that_pays_for_its_task() {
    let app = app(Backend::Redis).await;
    let agent = app.create_agent("cli-tasker", 5_000_000, None).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["agent", "token", "cli-tasker", "--task", "nightly-crawl", "--ttl", "1h"])
        .env("SPENDCAP_URL", &app.base)
        .env("SPENDCAP_ADMIN_TOKEN", crate::support::ADMIN_TOKEN)
        .output()
        .expect("runs the CLI");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout} {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("for task nightly-crawl"), "{stdout}");
    let token = stdout.rsplit("SPENDCAP_AGENT_TOKEN=").next().expect("token line").trim().to_owned();
    assert!(token.starts_with(&format!("sct_{}_t", agent.id)), "{stdout}");
    let (status, body) = app
        .agent_call(&token, Method::POST, "/v1/holds", Some(json!({"amount_micros": 5, "service": "api.example.com"})))
        .await;
    assert_eq!(status, 201, "{body}");
    // An hour by the ledger's clock later it is refused.
    app.clock.advance_ms(3_600_000);
    let (status, body) = app.agent_call(&token, Method::GET, "/v1/me", None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("token_expired")), "{body}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["agent", "token", "cli-tasker", "--task", "t", "--ttl", "1w"])
        .env("SPENDCAP_URL", &app.base)
        .env("SPENDCAP_ADMIN_TOKEN", crate::support::ADMIN_TOKEN)
        .output()
        .expect("runs the CLI");
    assert!(!bad.status.success());
}

/// `POST /mcp` (initialize) with `token`: the status and body.
async fn mcp_initialize(app: &TestApp, token: &str) -> (u16, String) {
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let response = app
        .http
        .post(app.url("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize)
        .send()
        .await
        .expect("daemon answers");
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_task_token_opens_mcp_until_it_expires_and_a_lapsed_parent_creates_nothing() {
    let app = app(Backend::Redis).await;
    let agent = app.create_agent("mcp-tasker", 5_000_000, None).await;
    let (_, created) = task_token(&app, &agent, json!({"task": "mcp-task", "ttl_secs": 30})).await;
    let token = created["token"].as_str().expect("token").to_owned();
    let (status, body) = mcp_initialize(&app, &token).await;
    assert_eq!(status, 200, "{body}");

    // An agent that expired (by the ledger's clock) creates no sub-agent and mints no token.
    let (status, body) =
        app.admin(Method::PUT, &format!("/v1/agents/{}/expiry", agent.id), Some(json!({"ttl_secs": 10}))).await;
    assert_eq!(status, 200, "{body}");
    app.clock.advance_ms(31_000);
    let (status, body) = mcp_initialize(&app, &token).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token_expired"), "{body}");
    let log_before = app.log().await.len();
    let (status, body) = spawn_child(&app, &agent, json!({"handle": "too-late", "cap_micros": 1})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_expired")), "{body}");
    let (status, body) = task_token(&app, &agent, json!({"task": "again", "ttl_secs": 30})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("agent_expired")), "{body}");
    assert_eq!(app.log().await.len(), log_before);
}
