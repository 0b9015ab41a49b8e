//! The HTTP API: auth boundaries, bad input, expiry, receipts, OpenAPI.

use reqwest::Method;
use serde_json::{json, Value};
use spendcap::api::Limits;

use crate::support::{spawn_app, spawn_app_with, AppOptions, TestApp, ADMIN_TOKEN};

/// Everything a bad request must leave untouched: the agent's figures and the log length.
async fn snapshot(app: &TestApp, agent: &str) -> (Value, usize) {
    let shown = app.show(agent).await;
    let figures = json!([shown["cap_micros"], shown["spent_micros"], shown["held_micros"]]);
    (figures, app.log().await.len())
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_changes_nothing() {
    let app =
        spawn_app_with(AppOptions { limits: Limits { body_bytes: 4096, ..Limits::default() }, ..Default::default() })
            .await;
    let agent = app.create_agent("bad-input", 1_000_000, None).await;
    let other = app.create_agent("someone-else", 1_000_000, None).await;
    let (_, hold) = app.hold(&other, 10).await;
    let others_hold = hold["hold_id"].as_str().expect("hold id").to_owned();
    let before = snapshot(&app, &agent.id).await;
    let before_other = snapshot(&app, &other.id).await;

    let big = "x".repeat(5000);
    // The token with its last hex digit changed (to another digit: a token ending in 0 stays forged).
    let (head, last) = agent.token.split_at(agent.token.len() - 1);
    let forged = format!("{head}{}", if last == "0" { "1" } else { "0" });
    // (description, token, path, raw body, content type, expected status, expected code)
    type Case<'a> = (&'a str, Option<&'a str>, String, String, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "negative",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":-5,"service":"s"}"#.into(),
            "application/json",
            422,
            "amount_negative",
        ),
        (
            "zero",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":0,"service":"s"}"#.into(),
            "application/json",
            422,
            "amount_zero",
        ),
        (
            "fractional micro",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":1.5,"service":"s"}"#.into(),
            "application/json",
            422,
            "amount_fractional",
        ),
        (
            "over 10^15",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":1000000000000001,"service":"s"}"#.into(),
            "application/json",
            422,
            "amount_too_large",
        ),
        (
            "over u64",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":99999999999999999999999,"service":"s"}"#.into(),
            "application/json",
            422,
            "amount_too_large",
        ),
        (
            "amount as text",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":"10","service":"s"}"#.into(),
            "application/json",
            422,
            "invalid_body",
        ),
        (
            "unknown field",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s","cap":1}"#.into(),
            "application/json",
            422,
            "invalid_body",
        ),
        (
            "missing field",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10}"#.into(),
            "application/json",
            422,
            "invalid_body",
        ),
        (
            "malformed JSON",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"#.into(),
            "application/json",
            400,
            "malformed_json",
        ),
        (
            "not JSON",
            Some(&agent.token),
            "/v1/holds".into(),
            "amount=10".into(),
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            "over the size limit",
            Some(&agent.token),
            "/v1/holds".into(),
            format!(r#"{{"amount_micros":10,"service":"{big}"}}"#),
            "application/json",
            413,
            "body_too_large",
        ),
        (
            "empty service",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":""}"#.into(),
            "application/json",
            422,
            "invalid_label",
        ),
        (
            "control characters",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"a\nb"}"#.into(),
            "application/json",
            422,
            "invalid_label",
        ),
        (
            "ttl too long",
            Some(&agent.token),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s","ttl_secs":99999999}"#.into(),
            "application/json",
            422,
            "invalid_ttl",
        ),
        (
            "missing token",
            None,
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s"}"#.into(),
            "application/json",
            401,
            "invalid_token",
        ),
        (
            "malformed token",
            Some("sct_nope"),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s"}"#.into(),
            "application/json",
            401,
            "invalid_token",
        ),
        (
            "forged token",
            Some(&forged),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s"}"#.into(),
            "application/json",
            401,
            "invalid_token",
        ),
        (
            "admin token is not an agent",
            Some(ADMIN_TOKEN),
            "/v1/holds".into(),
            r#"{"amount_micros":10,"service":"s"}"#.into(),
            "application/json",
            401,
            "invalid_token",
        ),
        (
            "another agent's hold",
            Some(&agent.token),
            format!("/v1/holds/{others_hold}/settle"),
            r#"{"amount_micros":1}"#.into(),
            "application/json",
            404,
            "unknown_hold",
        ),
        (
            "another agent's void",
            Some(&agent.token),
            format!("/v1/holds/{others_hold}/void"),
            r#"{}"#.into(),
            "application/json",
            404,
            "unknown_hold",
        ),
        (
            "garbage hold id",
            Some(&agent.token),
            "/v1/holds/hd_zz/settle".into(),
            r#"{"amount_micros":1}"#.into(),
            "application/json",
            404,
            "unknown_hold",
        ),
        (
            "agent on admin route",
            Some(&agent.token),
            "/v1/agents".into(),
            r#"{"handle":"x","cap_micros":1}"#.into(),
            "application/json",
            403,
            "admin_only",
        ),
        (
            "agent revoking another",
            Some(&agent.token),
            format!("/v1/agents/{}/revoke", other.id),
            r#"{"reason":"x"}"#.into(),
            "application/json",
            403,
            "admin_only",
        ),
        (
            "negative cap",
            Some(ADMIN_TOKEN),
            format!("/v1/agents/{}/cap", agent.id),
            r#"{"cap_micros":-1}"#.into(),
            "application/json",
            422,
            "amount_negative",
        ),
        (
            "bad revoke reason",
            Some(ADMIN_TOKEN),
            format!("/v1/agents/{}/revoke", agent.id),
            r#"{"reason":"has spaces"}"#.into(),
            "application/json",
            422,
            "invalid_reason",
        ),
    ];
    for (what, token, path, body, content_type, status, code) in cases {
        let method = if path.ends_with("/cap") { Method::PUT } else { Method::POST };
        let mut request = app.http.request(method, app.url(&path)).header("content-type", content_type).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let got_status = response.status().as_u16();
        let got: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!((got_status, got["code"].as_str().unwrap_or("")), (status, code), "{what}: {got}");
    }
    // Reading another agent's budget with one's own token is impossible: /v1/me is always one's own.
    let (_, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(me["agent_id"], agent.id.as_str());
    assert_eq!(snapshot(&app, &agent.id).await, before, "nothing changed for the agent");
    assert_eq!(snapshot(&app, &other.id).await, before_other, "nothing changed for the other agent");
}

#[tokio::test]
async fn holds_expire_and_release_their_money_with_no_sweeper() {
    let app = spawn_app().await;
    let agent = app.create_agent("expiring", 100_000, None).await;
    let (status, hold) = app
        .agent_call(
            &agent.token,
            Method::POST,
            "/v1/holds",
            Some(json!({"amount_micros": 100_000, "service": "s", "ttl_secs": 60})),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let (status, _) = app.hold(&agent, 1).await;
    assert_eq!(status, 402, "the cap is fully held");
    app.clock.advance_ms(60_000);
    let (_, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!((me["held_micros"].as_u64(), me["available_micros"].as_u64()), (Some(0), Some(100_000)));
    let (status, body) = app.settle(&agent, hold["hold_id"].as_str().expect("id"), 1).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("hold_expired")));
    let log = app.log().await;
    let expiry = log.iter().find(|e| e["event"] == "expire").expect("expiry logged");
    assert_eq!(expiry["hold"], hold["hold_id"]);
    assert_eq!(expiry["amount"], 100_000);
}

#[tokio::test]
async fn settle_returns_a_receipt_the_cli_verifies_and_tampering_fails() {
    let app = spawn_app().await;
    let root = app.create_agent("chain-root", 10_000_000, None).await;
    let child = app.create_agent("chain-child", 10_000_000, Some("chain-root")).await;
    let mut receipts = Vec::new();
    for (i, agent) in [&root, &child, &root, &child, &child].into_iter().enumerate() {
        let (_, hold) = app.hold(agent, 1_000 * (i as u64 + 1)).await;
        let (status, settled) = app.settle(agent, hold["hold_id"].as_str().expect("id"), 500).await;
        assert_eq!(status, 200, "{settled}");
        assert_eq!(settled["released_micros"], 1_000 * (i as u64 + 1) - 500);
        receipts.push(settled["receipt"].clone());
    }
    assert_eq!(receipts[4]["receipt"]["seq"], 5);
    let response =
        app.http.get(app.url("/v1/receipts?agent=chain-child")).bearer_auth(ADMIN_TOKEN).send().await.expect("export");
    let chain = response.text().await.expect("text");
    assert_eq!(chain.lines().count(), 5);
    let exported: Vec<Value> = chain.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(exported, receipts, "the chain holds exactly the receipts the settles returned");
    let (_, key) = app.admin(Method::GET, "/v1/receipt-key", None).await;
    let key = key["public_key"].as_str().expect("key").to_owned();

    let dir = std::env::temp_dir().join(format!("spendcap-receipts-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("dir");
    let verify = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(["receipt", "verify"])
            .arg(&path)
            .args(["--public-key", &key])
            .output()
            .expect("runs the CLI")
    };
    let ok = verify("chain.jsonl", &chain);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("5 receipt(s)"));

    let single = verify("one.json", &serde_json::to_string_pretty(&receipts[0]).expect("json"));
    assert!(single.status.success(), "a single pretty receipt verifies");

    let mut lines: Vec<String> = chain.lines().map(str::to_owned).collect();
    let tampered = lines[2].replace("\"amount_micros\":500", "\"amount_micros\":5");
    assert_ne!(tampered, lines[2]);
    let mut edited = lines.clone();
    edited[2] = tampered;
    let out = verify("edited.jsonl", &edited.join("\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature"), "{}", String::from_utf8_lossy(&out.stderr));

    lines.remove(3);
    let out = verify("deleted.jsonl", &lines.join("\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain broken"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).expect("cleanup");
}

#[tokio::test]
async fn openapi_document_describes_the_api() {
    let app = spawn_app_with(AppOptions { backend: crate::support::Backend::Memory, ..Default::default() }).await;
    let doc: Value = app.http.get(app.url("/openapi.json")).send().await.expect("get").json().await.expect("json");
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
    for path in [
        "/v1/agents",
        "/v1/holds",
        "/v1/holds/{hold}/settle",
        "/v1/holds/{hold}/resolve",
        "/v1/agents/{agent}/revoke",
        "/v1/log",
        "/v1/me",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    assert!(doc["components"]["schemas"]["HoldRequestBody"]["properties"]["amount_micros"].is_object());
    assert!(doc["paths"]["/v1/holds"]["get"].is_object(), "the unknown-holds listing is documented");
    assert!(doc["components"]["schemas"]["ResolveRequest"]["properties"]["outcome"].is_object());
    assert!(doc["components"]["securitySchemes"]["agent"].is_object());
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_agents_against_a_running_daemon() {
    let app = spawn_app().await;
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(args)
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("runs the CLI")
    };
    let created = cli(&["agent", "create", "--handle", "cli-agent", "--cap", "2.50", "--json"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).expect("json");
    assert_eq!(created["agent"]["cap_micros"], 2_500_000);
    assert!(created["token"].as_str().expect("token").starts_with("sct_ag_"));

    let set = cli(&["agent", "set-cap", "cli-agent", "3", "--json"]);
    assert!(set.status.success());
    assert_eq!(app.show("cli-agent").await["cap_micros"], 3_000_000);

    let table = cli(&["agent", "list"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("cli-agent") && table.contains("$3.00 "), "{table}");

    let revoked = cli(&["agent", "revoke", "cli-agent", "--reason", "manual_stop"]);
    assert!(revoked.status.success());
    assert_eq!(app.show("cli-agent").await["revoked"], "manual_stop");

    let bad = cli(&["agent", "set-cap", "cli-agent", "-1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("negative"));
    let unknown = cli(&["agent", "show", "nobody-here"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown_agent"));

    let export = cli(&["log", "export", "--format", "csv"]);
    let csv = String::from_utf8_lossy(&export.stdout).into_owned();
    assert!(csv.starts_with("id,tree,ts_ms,time,event"), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",revoke,") && l.contains("manual_stop")), "{csv}");
}

#[tokio::test]
async fn rotated_tokens_stop_at_once_and_revocation_survives_a_restart() {
    let app = spawn_app().await;
    let agent = app.create_agent("rotating", 1_000, None).await;
    let (_, rotated) = app.admin(Method::POST, &format!("/v1/agents/{}/rotate-token", agent.id), None).await;
    let (status, _) = app.hold(&agent, 1).await;
    assert_eq!(status, 401, "the old token is dead");
    let fresh = crate::support::Agent {
        id: agent.id.clone(),
        token: rotated["token"].as_str().expect("token").to_owned(),
        tree: agent.tree.clone(),
    };
    let (status, _) = app.hold(&fresh, 1).await;
    assert_eq!(status, 201);
    app.admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({"reason": "stolen"}))).await;
    // A second daemon on the same Redis (a restart) sees the revocation.
    let redis = app.redis.clone().expect("redis");
    let restarted = spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), ..Default::default() }).await;
    drop(app);
    let (status, body) = restarted.hold(&fresh, 1).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")));
}

/// A client command against a daemon that is not running says where it looked and what to check,
/// once, instead of the HTTP library's error chain twice.
#[test]
fn a_client_command_without_a_daemon_says_how_to_fix_it() {
    let url = format!("http://127.0.0.1:{}", crate::support::free_port());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["agent", "list"])
        .env("SPENDCAP_URL", &url)
        .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("runs the CLI");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.trim(),
        format!(
            "error: cannot reach spendcap at {url} — is `spendcap serve` running? (set SPENDCAP_URL or pass --url)"
        )
    );
}

/// The ledger calls of the generic pair, as Redis saw them (see `calls.rs`): one hold, one
/// settle (the receipt signed ahead and linked in the same call — also for a tree's first
/// receipt, whose chain head the hold is asked for).
/// Settles of one tree that run at once cannot all link the receipt they signed ahead (one
/// sequence number, one winner). The others are linked after their settles, grouped: every
/// receipt is signed and offered to the chain once, whatever the concurrency. (They were once
/// linked each by its own settle, which signed every receipt between the head and its own and
/// raced the others to link them.)
#[tokio::test]
async fn concurrent_settles_of_one_tree_offer_each_receipt_to_the_chain_once() {
    const SETTLES: usize = 30;
    let app = spawn_app().await;
    let (status, created) = app
        .admin(
            Method::POST,
            "/v1/agents",
            Some(json!({ "handle": "busy", "cap_micros": 1_000_000_000, "controls": { "breaker": null } })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let agent = crate::support::Agent {
        id: created["agent"]["id"].as_str().expect("id").to_owned(),
        token: created["token"].as_str().expect("token").to_owned(),
        tree: created["agent"]["tree"].as_str().expect("tree").to_owned(),
    };
    let redis = app.redis.clone().expect("a Redis ledger");
    let mut holds = Vec::new();
    for _ in 0..SETTLES {
        let (status, hold) = app.hold(&agent, 2_000).await;
        assert_eq!(status, 201, "{hold}");
        holds.push(hold["hold_id"].as_str().expect("id").to_owned());
    }
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let settles = holds.iter().map(|hold| app.settle(&agent, hold, 1_500));
    let settled = futures::future::join_all(settles).await;
    let lines = calls.stop_lines(&redis);
    let mut receipts: Vec<Value> = settled
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 200, "{body}");
            body["receipt"].clone()
        })
        .collect();
    receipts.sort_by_key(|r| r["receipt"]["seq"].as_u64());
    let seqs: Vec<u64> = receipts.iter().map(|r| r["receipt"]["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, (1..=SETTLES as u64).collect::<Vec<_>>(), "one receipt per settle, in one chain");
    let response =
        app.http.get(app.url("/v1/receipts?agent=busy")).bearer_auth(ADMIN_TOKEN).send().await.expect("export");
    let exported: Vec<Value> =
        response.text().await.expect("text").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(exported, receipts, "the chain holds exactly the receipts the settles returned");
    // Receipts offered to the chain: signed ahead in a settle, or in a link call's groups of five.
    let offered: usize = lines
        .iter()
        .map(|line| crate::calls::monitor_arguments(line))
        .map(|args| match (args.first().map(|a| a.to_ascii_uppercase()), args.get(1).map(String::as_str)) {
            (Some(fcall), Some("spendcap_receipt_link")) if fcall == "FCALL" => (args.len() - 4) / 5,
            _ => 0,
        })
        .sum();
    assert!(offered <= SETTLES, "{offered} receipts offered to spendcap_receipt_link for {SETTLES} settles");
}

#[tokio::test]
async fn a_hold_and_settle_pair_costs_two_ledger_calls() {
    let app = spawn_app().await;
    let agent = app.create_agent("counted", 10_000_000, None).await;
    let redis = app.redis.clone().expect("a Redis ledger");
    for round in ["first receipt of the tree", "second"] {
        let calls = crate::calls::LedgerCalls::watch(&redis);
        let (_, hold) = app.hold(&agent, 2_000).await;
        let (status, settled) = app.settle(&agent, hold["hold_id"].as_str().expect("id"), 1_500).await;
        let calls = crate::calls::purchase_calls(calls.stop(&redis));
        assert_eq!(status, 200, "{settled}");
        assert_eq!(calls, ["FCALL spendcap_hold", "FCALL spendcap_settle"], "ledger calls of the {round} pair");
    }
}
