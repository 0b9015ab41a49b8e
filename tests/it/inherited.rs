//! Inherited state (issue 19, item 1): a sub-agent of a revoked, suspended or expired agent shows
//! that state "via" the ancestor in every view — `GET /v1/agents`, `GET /v1/agents/{id}`,
//! `/v1/me` (nothing available), `/v1/me/budget` and the CLI — exactly as its next hold is
//! refused (same code, `limited_by` the ancestor). The dashboard's side is in dashboard.rs.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, Agent, TestApp, ADMIN_TOKEN};

/// The views of `handle` from the admin list and show, and the agent's own `/v1/me` and budget.
async fn views(app: &TestApp, handle: &str, agent: &Agent) -> [Value; 4] {
    let (status, list) = app.admin(Method::GET, "/v1/agents", None).await;
    assert_eq!(status, 200, "{list}");
    let listed = list["agents"].as_array().expect("agents").iter().find(|a| a["handle"] == handle).cloned();
    let shown = app.show(handle).await;
    let (status, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");
    let (status, budget) = app.agent_call(&agent.token, Method::GET, "/v1/me/budget", None).await;
    assert_eq!(status, 200, "{budget}");
    [listed.expect("listed"), shown, me, budget]
}

/// Every view of `agent` says `state` via `via` (id and handle), nothing is available, and a hold
/// is refused with the matching code, limited by `via`.
async fn assert_inherited(app: &TestApp, handle: &str, agent: &Agent, state: &str, via: &Agent, via_handle: &str) {
    let [listed, shown, me, budget] = views(app, handle, agent).await;
    for (name, view) in [("list", &listed), ("show", &shown), ("me", &me)] {
        assert_eq!(view["state"], state, "{name}: {view}");
        assert_eq!(view["state_via"]["id"], via.id.as_str(), "{name}: {view}");
        assert_eq!(view["state_via"]["handle"], via_handle, "{name}: {view}");
    }
    assert_eq!((budget["state"].as_str(), budget["limited_by"].as_str()), (Some(state), Some(via.id.as_str())));
    assert_eq!(me["available_micros"], 0, "{me}");
    assert_eq!(budget["available_micros"], 0, "{budget}");
    let (status, refused) = app.hold(agent, 1).await;
    assert_eq!(
        (status, refused["code"].as_str(), refused["limited_by"].as_str()),
        (402, Some(format!("agent_{state}").as_str()), Some(via.id.as_str())),
        "the views say what the hold does: {refused}"
    );
}

async fn assert_active(app: &TestApp, handle: &str, agent: &Agent, available: u64) {
    let [listed, shown, me, _] = views(app, handle, agent).await;
    for view in [&listed, &shown, &me] {
        assert_eq!((view["state"].as_str(), &view["state_via"]), (Some("active"), &Value::Null), "{view}");
    }
    assert_eq!(me["available_micros"], available, "{me}");
}

fn cli(app: &TestApp, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(args)
        .env("SPENDCAP_URL", &app.base)
        .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("runs the CLI");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The CLI table line of `handle` (its first column, indented by depth).
fn line_of<'a>(table: &'a str, handle: &str) -> &'a str {
    table.lines().find(|l| l.split_whitespace().next() == Some(handle)).unwrap_or_else(|| panic!("{handle} in {table}"))
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agents_sub_agents_show_as_revoked_via_it_everywhere() {
    let app = spawn_app().await;
    let research = app.create_agent("research", 5_000_000, None).await;
    let sub = app.create_agent("research-sub", 1_500_000, Some("research")).await;
    let leaf = app.create_agent("research-leaf", 500_000, Some("research-sub")).await;
    let other = app.create_agent("other", 1_000_000, None).await;
    assert_active(&app, "research-sub", &sub, 1_500_000).await;

    let (status, _) =
        app.admin(Method::POST, "/v1/agents/research/revoke", Some(json!({ "reason": "runaway_loop" }))).await;
    assert_eq!(status, 200);
    assert_inherited(&app, "research-sub", &sub, "revoked", &research, "research").await;
    assert_inherited(&app, "research-leaf", &leaf, "revoked", &research, "research").await;
    let [_, shown, me, _] = views(&app, "research-sub", &sub).await;
    assert_eq!(
        (shown["revoked"].as_str(), shown["revoked_via"]["handle"].as_str()),
        (Some("runaway_loop"), Some("research"))
    );
    assert_eq!(
        (me["revoked"].as_str(), me["revoked_via"]["id"].as_str()),
        (Some("runaway_loop"), Some(research.id.as_str()))
    );
    // The revoked agent itself: its own state, no `via`; another tree is untouched.
    let root = app.show("research").await;
    assert_eq!(
        (root["state"].as_str(), &root["state_via"], &root["revoked_via"]),
        (Some("revoked"), &Value::Null, &Value::Null)
    );
    assert_active(&app, "other", &other, 1_000_000).await;

    let list = cli(&app, &["agent", "list"]);
    assert!(line_of(&list, "research-sub").ends_with("revoked (via research)"), "{list}");
    assert!(line_of(&list, "research-leaf").ends_with("revoked (via research)"), "{list}");
    assert!(line_of(&list, "research").ends_with("revoked (runaway_loop)"), "{list}");
    assert!(line_of(&list, "other").ends_with("active"), "{list}");
    let show = cli(&app, &["agent", "show", "research-leaf"]);
    assert!(line_of(&show, "research-leaf").ends_with("revoked (via research)"), "{show}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_and_expiry_are_inherited_and_lifted_with_the_ancestors() {
    let app = spawn_app().await;
    let parent = app.create_agent("looper", 10_000_000, None).await;
    let sub = app.create_agent("looper-sub", 1_000_000, Some("looper")).await;
    let (status, body) =
        app.admin(Method::PUT, "/v1/agents/looper/controls", Some(json!({ "breaker": { "max_repeats": 3 } }))).await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..4 {
        app.hold(&parent, 10_000).await;
    }
    assert_eq!(app.show("looper").await["suspended"], "repeat");
    assert_inherited(&app, "looper-sub", &sub, "suspended", &parent, "looper").await;
    let shown = app.show("looper-sub").await;
    assert_eq!(
        (shown["suspended"].as_str(), shown["suspended_via"]["handle"].as_str()),
        (Some("repeat"), Some("looper"))
    );
    let list = cli(&app, &["agent", "list"]);
    assert!(line_of(&list, "looper-sub").ends_with("suspended (via looper)"), "{list}");

    let (status, _) = app.admin(Method::POST, "/v1/agents/looper/reinstate", None).await;
    assert_eq!(status, 200);
    assert_active(&app, "looper-sub", &sub, 1_000_000).await;

    let (status, shown) = app.admin(Method::PUT, "/v1/agents/looper/expiry", Some(json!({ "ttl_secs": 60 }))).await;
    assert_eq!(status, 200, "{shown}");
    let before = app.show("looper-sub").await;
    assert_eq!((before["state"].as_str(), before["expires_via"]["handle"].as_str()), (Some("active"), Some("looper")));
    assert_eq!(before["expires_at_ms"], shown["expires_at_ms"], "the sub-agent's effective expiry is its parent's");
    app.clock.advance_ms(60_000);
    assert_inherited(&app, "looper-sub", &sub, "expired", &parent, "looper").await;
    let list = cli(&app, &["agent", "list"]);
    assert!(line_of(&list, "looper-sub").ends_with("expired (via looper)"), "{list}");
}
