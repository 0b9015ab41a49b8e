//! The dashboard in headless Chromium: `tests/browser/dashboard.mjs` (playwright-core) loads
//! it, sees an agent's bar move after a payment, revokes the agent with the button and sees the
//! next payment refused; it saves `target/dashboard.png`. Needs `node`, Debian's `chromium` and
//! `npm ci` in `tests/browser` (`scripts/test` installs them).

use std::path::Path;
use std::process::Command;

use reqwest::Method;
use serde_json::json;

use crate::support::{spawn_app, ADMIN_TOKEN};

#[tokio::test]
async fn dashboard_pays_revokes_and_refuses_in_a_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "run `npm ci --prefix tests/browser` and `apt-get install chromium` first (scripts/test does)"
    );
    let app = spawn_app().await;
    let agent = app.create_agent("browser-agent", 5_000_000, None).await;
    let sub = app.create_agent("browser-sub", 1_000_000, Some(&agent.id)).await;
    // Some history for the report panels.
    let (status, _) = app
        .agent_call(
            &sub.token,
            Method::POST,
            "/v1/tasks/t0/outcome",
            Some(json!({ "outcome": "success", "task_type": "research" })),
        )
        .await;
    assert_eq!(status, 200);

    let screenshot = root.join("target/dashboard.png");
    std::fs::create_dir_all(root.join("target")).expect("target dir");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(&browser_dir)
            .env("BASE", &app.base)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AGENT_TOKEN", &agent.token)
            .env("HANDLE", "browser-agent")
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
    assert!(stdout.contains("dashboard test: ok"), "{stdout}");
    assert!(root.join("target/dashboard.png").exists());
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
