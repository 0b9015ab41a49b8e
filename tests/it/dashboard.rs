//! The dashboard in headless Chromium: `tests/browser/dashboard.mjs` (playwright-core) loads
//! it after the `spendcap demo` scenario ran, checks the backfilled events, totals, chart and
//! tree headings, sees an agent's bar move after a payment, creates a sub-agent, changes its cap,
//! revokes its parent and sees the inherited state, revokes an agent and sees its next payment
//! refused; it saves `target/screenshots/dashboard.png`. Needs `node`, Debian's `chromium` and
//! `npm ci` in `tests/browser` (`scripts/test` installs them). The endpoints the page reads
//! (session, recent events, spend series) are tested over HTTP below.

use std::path::Path;
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use spendcap::sim::Providers;

use crate::support::{spawn_app, spawn_app_with, AppOptions, ADMIN_TOKEN};

#[tokio::test]
async fn dashboard_is_a_console_over_the_demo_fleet_in_a_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "run `npm ci --prefix tests/browser` and `apt-get install chromium` first (scripts/test does)"
    );
    let providers = Providers::start().await.expect("simulated providers");
    let protocols = providers.protocol_config().expect("configuration for the providers");
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;
    spendcap::demo::scenario(&app.base, ADMIN_TOKEN, &providers).await.expect("the demo scenario");
    let agent = app.create_agent("browser-agent", 5_000_000, None).await;
    let sub = app.create_agent("browser-sub", 1_000_000, Some(&agent.id)).await;
    let (status, _) = app
        .agent_call(
            &sub.token,
            Method::POST,
            "/v1/tasks/t0/outcome",
            Some(json!({ "outcome": "success", "task_type": "research" })),
        )
        .await;
    assert_eq!(status, 200);

    let screenshot = root.join("target/screenshots/dashboard.png");
    std::fs::create_dir_all(root.join("target/screenshots")).expect("screenshots dir");
    let _ = std::fs::remove_file(&screenshot);
    let shot = screenshot.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(&browser_dir)
            .env("BASE", &app.base)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AGENT_TOKEN", &agent.token)
            .env("HANDLE", "browser-agent")
            .env("SCREENSHOT", &shot)
            .output()
            .map(|o| (o, app, providers))
    })
    .await
    .expect("join");
    let (output, _app, _providers) = output.expect("node must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("dashboard test: ok"), "{stdout}");
    println!("{stdout}");
    assert!(screenshot.exists());
}

/// `tests/browser/roles.mjs`: the page with a viewer token (everything shown, no action offered,
/// an action forced from the page refused) and with an operator token (revoke, reinstate,
/// approval decisions, a lower cap and tighter controls from the forms; no "New agent"; a raise
/// refused with a clear message); saves `target/screenshots/dashboard-operator.png`.
#[tokio::test]
async fn the_dashboard_offers_a_viewer_and_an_operator_only_their_actions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(browser_dir.join("node_modules/playwright-core").exists(), "run `npm ci --prefix tests/browser` first");
    let app = spawn_app().await;
    let agent = app.create_agent("ops-agent", 5_000_000, None).await;
    let looper = app.create_agent("ops-looper", 5_000_000, None).await;
    app.create_agent("ops-target", 1_000_000, None).await;
    let rule = json!({ "approval": { "above_micros": 1_000_000, "ttl_secs": 600 } });
    assert_eq!(app.admin(Method::PUT, "/v1/agents/ops-agent/controls", Some(rule)).await.0, 200);
    let (status, waiting) = app.hold(&agent, 2_000_000).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    let approval = waiting["approval_id"].as_str().expect("approval id").to_owned();
    let breaker = json!({ "breaker": { "max_repeats": 1 } });
    assert_eq!(app.admin(Method::PUT, "/v1/agents/ops-looper/controls", Some(breaker)).await.0, 200);
    for _ in 0..3 {
        app.hold(&looper, 1_000).await;
    }
    assert_eq!(app.show("ops-looper").await["state"], "suspended");
    let mut tokens = Vec::new();
    for (name, role) in [("vera", "viewer"), ("otto", "operator")] {
        let (status, body) =
            app.admin(Method::POST, "/v1/operators", Some(json!({ "name": name, "role": role }))).await;
        assert_eq!(status, 201, "{body}");
        tokens.push(body["token"].as_str().expect("token").to_owned());
    }
    let screenshot = root.join("target/screenshots/dashboard-operator.png");
    std::fs::create_dir_all(root.join("target/screenshots")).expect("screenshots dir");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("roles.mjs")
            .current_dir(&browser_dir)
            .env("BASE", &app.base)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("VIEWER_TOKEN", &tokens[0])
            .env("OPERATOR_TOKEN", &tokens[1])
            .env("APPROVAL_ID", &approval)
            .env("SCREENSHOT", &screenshot)
            .output()
            .map(|o| (o, app))
    })
    .await
    .expect("join");
    let (output, _app) = output.expect("node must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("roles dashboard test: ok"), "{stdout}");
    println!("{stdout}");
}

/// The session names the token's role and the actions it allows (the page renders from it);
/// without the admin token there is none.
#[tokio::test]
async fn the_session_carries_the_role_and_its_actions() {
    let app = spawn_app().await;
    let (status, session) = app.admin(Method::GET, "/v1/dashboard/session", None).await;
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["role"], "admin");
    let actions: Vec<&str> = session["actions"].as_array().expect("actions").iter().filter_map(Value::as_str).collect();
    assert_eq!(
        actions,
        ["create_agent", "set_cap", "set_controls", "set_expiry", "reinstate", "revoke", "decide_approval"]
    );
    let agent = app.create_agent("not-admin", 1_000, None).await;
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/dashboard/session", None).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("admin_only")));
    let (status, _) = app.agent_call("wrong", Method::GET, "/v1/dashboard/session", None).await;
    assert_eq!(status, 401);
}

/// `/v1/events/recent` answers the latest entries of every tree, oldest first, at most `limit`.
#[tokio::test]
async fn recent_events_are_the_latest_of_every_tree() {
    let app = spawn_app().await;
    let (status, empty) = app.admin(Method::GET, "/v1/events/recent", None).await;
    assert_eq!((status, empty["entries"].as_array().map(Vec::len)), (200, Some(0)));
    let a = app.create_agent("recent-a", 10_000_000, None).await;
    let b = app.create_agent("recent-b", 10_000_000, None).await;
    for i in 0..5 {
        for agent in [&a, &b] {
            let (status, hold) = app.hold(agent, 1_000 + i).await;
            assert_eq!(status, 201, "{hold}");
            app.settle(agent, hold["hold_id"].as_str().expect("hold id"), 1_000 + i).await;
        }
    }
    // 2 creates + 20 hold/settle entries; the last 4 are a's and b's last hold and settle.
    let (status, recent) = app.admin(Method::GET, "/v1/events/recent?limit=4", None).await;
    assert_eq!(status, 200);
    let entries = recent["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 4, "{recent}");
    let amounts: Vec<u64> = entries.iter().filter_map(|e| e["amount"].as_u64()).collect();
    assert_eq!(amounts, [1_004; 4], "{recent}");
    assert!(entries.windows(2).all(|w| w[0]["ts_ms"].as_u64() <= w[1]["ts_ms"].as_u64()), "oldest first");
    let (_, all) = app.admin(Method::GET, "/v1/events/recent?limit=1000", None).await;
    assert_eq!(all["entries"].as_array().map(Vec::len), Some(22), "every entry, up to 500");
    let (status, bad) = app.admin(Method::GET, "/v1/events/recent?limit=many", None).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_query")));
}

/// The spend series sums settled amounts per hour or day and per agent (named by handle), tree
/// (named by its root's handle) or protocol; holds and voids do not count.
#[tokio::test]
async fn the_spend_series_buckets_settlements_from_the_log() {
    let app = spawn_app().await;
    let root = app.create_agent("series-root", 10_000_000, None).await;
    let child = app.create_agent("series-child", 5_000_000, Some("series-root")).await;
    let other = app.create_agent("series-other", 5_000_000, None).await;
    for (agent, amount) in [(&root, 100_000), (&child, 250_000), (&child, 50_000), (&other, 7_000)] {
        let (_, hold) = app.hold(agent, amount).await;
        let (status, _) = app.settle(agent, hold["hold_id"].as_str().expect("hold id"), amount).await;
        assert_eq!(status, 200);
    }
    let (_, voided) = app.hold(&other, 999_000).await;
    let (status, _) = app
        .agent_call(
            &other.token,
            Method::POST,
            &format!("/v1/holds/{}/void", voided["hold_id"].as_str().expect("id")),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);

    let series = |query: &'static str| {
        let app = &app;
        async move { app.admin(Method::GET, &format!("/v1/reports/series{query}"), None).await }
    };
    let (status, by_agent) = series("").await;
    assert_eq!(status, 200, "{by_agent}");
    assert_eq!((by_agent["by"].as_str(), by_agent["bucket"].as_str()), (Some("agent"), Some("hour")));
    assert_eq!(by_agent["starts_ms"].as_array().map(Vec::len), Some(24), "the last 24 hours");
    let totals = |v: &Value| -> Vec<(String, u64)> {
        v["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|s| (s["label"].as_str().unwrap_or("").to_owned(), s["total_micros"].as_u64().unwrap_or(0)))
            .collect()
    };
    assert_eq!(
        totals(&by_agent),
        [("series-child".to_owned(), 300_000), ("series-root".to_owned(), 100_000), ("series-other".to_owned(), 7_000)]
    );
    let last: u64 =
        by_agent["series"][0]["points"].as_array().expect("points").last().and_then(Value::as_u64).expect("u64");
    assert_eq!(last, 300_000, "this hour's bucket holds it");

    let (_, by_tree) = series("?by=tree&bucket=day").await;
    assert_eq!(totals(&by_tree), [("series-root".to_owned(), 400_000), ("series-other".to_owned(), 7_000)]);
    assert_eq!(by_tree["series"][0]["key"], root.tree.as_str());
    assert_eq!(by_tree["starts_ms"].as_array().map(Vec::len), Some(30));
    let (_, by_protocol) = series("?by=protocol").await;
    assert_eq!(totals(&by_protocol), [("generic".to_owned(), 407_000)]);

    let (status, future) =
        app.admin(Method::GET, &format!("/v1/reports/series?since_ms={}", app.clock.now_ms() + 3_600_000), None).await;
    assert_eq!((status, future["code"].as_str()), (422, Some("invalid_range")), "{future}");
    let (status, long) = series("?bucket=hour&since_ms=0").await;
    assert_eq!((status, long["code"].as_str()), (422, Some("range_too_long")));
    let (status, bad) = series("?by=color").await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_query")));
}

/// The page may only run its own script (by hash), talk to its own origin and never be framed;
/// no answer is cached or sniffed, token-bearing ones included. The browser test above runs the
/// page under this policy, so a wrong hash would stop it.
#[tokio::test]
async fn dashboard_and_api_answers_carry_security_headers() {
    let app = spawn_app().await;
    let http = reqwest::Client::new();
    let page = http.get(app.url("/dashboard")).send().await.expect("dashboard");
    let header = |r: &reqwest::Response, name: &str| {
        r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    let csp = header(&page, "content-security-policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.split(';').any(|d| d.trim().starts_with("script-src") && d.contains("unsafe")), "{csp}");
    assert_eq!(header(&page, "x-frame-options"), "DENY");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");

    let created = http
        .post(app.url("/v1/agents"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"handle": "headers", "cap_micros": 1000}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    assert_eq!(header(&created, "cache-control"), "no-store", "an answer with a token is never cached");
    assert_eq!(header(&created, "x-content-type-options"), "nosniff");
    let id = created.json::<serde_json::Value>().await.expect("json")["agent"]["id"].as_str().expect("id").to_owned();
    let rotated = http
        .post(app.url(&format!("/v1/agents/{id}/rotate-token")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("rotate");
    assert_eq!((rotated.status().as_u16(), header(&rotated, "cache-control")), (200, "no-store".to_owned()));
}
