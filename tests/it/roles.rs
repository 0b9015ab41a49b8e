//! Scoped operator tokens: every role (viewer, operator, admin, an operator limited to one tree,
//! a revoked token) against every admin route of `api::operators::ROUTES` (which must name every
//! route the API document marks as admin), tighten-only changes decided in the ledger, `by` in
//! the log, and a revocation that stops the token at once on another instance.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};
use spendcap::api::operators::{action_of, ROUTES};
use spendcap::ledger::{AgentControls, Controls, LedgerError};
use spendcap::roles::{Action, Actor, Grant, Role};

use crate::support::{self, spawn_app_with, AppOptions, Backend, RedisServer, TestApp, ADMIN_TOKEN};

struct Token {
    name: &'static str,
    token: String,
    role: Option<Role>,
    limited: bool,
}

async fn create_operator(app: &TestApp, name: &str, role: &str, tree: Option<&str>) -> String {
    let (status, body) =
        app.admin(Method::POST, "/v1/operators", Some(json!({ "name": name, "role": role, "tree": tree }))).await;
    assert_eq!(status, 201, "create operator {name}: {body}");
    assert!(body.get("token_hash").is_none());
    body["token"].as_str().expect("token").to_owned()
}

async fn log_len(app: &TestApp) -> usize {
    app.log().await.len()
}

/// A concrete request for a route of the table, aimed at agent `target` (another tree than the
/// limited token's).
fn request_for(method: &str, path: &str, target: &str, tree: &str, n: usize) -> (Method, String, Option<Value>) {
    let method: Method = method.to_ascii_uppercase().parse().expect("method");
    let fake_hold = format!("hd_{tree}_000000000000000000000000");
    let mut concrete = path
        .replace("{agent}", target)
        .replace("{hold}", &fake_hold)
        .replace("{task}", "t-roles")
        .replace("{name}", "nobody")
        .replace("{id}", &fake_hold)
        .replace("{token}", "t0000000000000000");
    let body = match (method.as_str(), path) {
        ("POST", "/v1/agents") => Some(json!({ "handle": format!("made-{n}"), "cap_micros": 1, "parent": target })),
        ("PUT", "/v1/agents/{agent}/cap") => Some(json!({ "cap_micros": 10_000_000 })),
        ("PUT", "/v1/agents/{agent}/controls") => Some(json!({})),
        ("PUT", "/v1/agents/{agent}/expiry") => Some(json!({ "ttl_secs": 86_400 })),
        ("POST", "/v1/agents/{agent}/revoke") => Some(json!({ "reason": "roles_test" })),
        ("POST", "/v1/tasks/{task}/outcome") => {
            Some(json!({ "outcome": "success", "task_type": "research", "agent": target }))
        }
        ("POST", "/v1/holds/{hold}/resolve") => Some(json!({ "outcome": "voided", "reason": "roles test" })),
        ("POST", "/v1/ap2/agents/{agent}/mandates") => Some(json!({ "open_checkout_mandate": "x" })),
        ("POST", "/v1/operators") => Some(json!({ "name": format!("made-{n}"), "role": "viewer" })),
        ("POST", "/v1/agents/{agent}/tokens") => Some(json!({ "task": "t-roles", "ttl_secs": 60 })),
        ("POST", "/v1/approvals/{id}/approve" | "/v1/approvals/{id}/deny") => Some(json!({ "note": "roles test" })),
        _ => None,
    };
    if matches!(path, "/v1/receipts" | "/v1/log" | "/v1/spend" | "/v1/reports") {
        concrete = format!("{concrete}?agent={target}");
    }
    if path == "/v1/spend" {
        concrete.push_str("&group_by=agent");
    }
    (method, concrete, body)
}

#[tokio::test]
async fn the_routes_table_names_every_admin_route_of_the_api_document() {
    let doc = spendcap::api::openapi::document();
    let mut admin_routes = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("operations") {
            let admin = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|requirement| requirement.get("admin").is_some());
            if admin {
                admin_routes.push((method.clone(), path.clone()));
            }
        }
    }
    assert!(admin_routes.len() > 25, "the document was read: {admin_routes:?}");
    for (method, path) in &admin_routes {
        assert!(action_of(method, path).is_some(), "{method} {path} is an admin route missing from ROUTES");
    }
    for (method, path, _) in ROUTES {
        assert!(
            admin_routes.iter().any(|(m, p)| m == method && p == path),
            "ROUTES names {method} {path}, which the document does not mark as admin"
        );
    }
}

#[tokio::test]
async fn every_role_against_every_admin_route() {
    let app = spawn_app_with(AppOptions::default()).await;
    let mine = app.create_agent("roles-mine", 10_000_000, None).await;
    let other = app.create_agent("roles-other", 10_000_000, None).await;
    let revoked = create_operator(&app, "gone", "admin", None).await;
    let (status, _) = app.admin(Method::POST, "/v1/operators/gone/revoke", None).await;
    assert_eq!(status, 200);
    let tokens = vec![
        Token {
            name: "viewer",
            token: create_operator(&app, "eve", "viewer", None).await,
            role: Some(Role::Viewer),
            limited: false,
        },
        Token {
            name: "operator",
            token: create_operator(&app, "olga", "operator", None).await,
            role: Some(Role::Operator),
            limited: false,
        },
        Token {
            name: "admin operator",
            token: create_operator(&app, "ada", "admin", None).await,
            role: Some(Role::Admin),
            limited: false,
        },
        Token {
            name: "operator limited to another tree",
            token: create_operator(&app, "tina", "operator", Some(&mine.id)).await,
            role: Some(Role::Operator),
            limited: true,
        },
        Token { name: "revoked", token: revoked, role: None, limited: false },
    ];
    let mut n = 0;
    let mut checked = 0;
    for t in &tokens {
        for (method, path, action) in ROUTES {
            n += 1;
            let (m, url, body) = request_for(method, path, &other.id, &other.tree, n);
            let before = log_len(&app).await;
            let (status, answer) = if *path == "/v1/events" {
                // A live stream: only its status is read.
                let response = app.http.get(app.url(&url)).bearer_auth(&t.token).send().await.expect("events");
                let status = response.status().as_u16();
                let answer = if status == 200 { Value::Null } else { response.json().await.unwrap_or(Value::Null) };
                (status, answer)
            } else {
                app.agent_call(&t.token, m.clone(), &url, body).await
            };
            let context = format!("{} → {method} {path}: {status} {answer}", t.name);
            checked += 1;
            let Some(role) = t.role else {
                assert_eq!(status, 401, "{context}");
                assert_eq!(log_len(&app).await, before, "a refused call logs nothing: {context}");
                continue;
            };
            let global = matches!(action, Action::ReadFleet | Action::ManageOperators);
            let denied = role.grant(*action) == Grant::No || (t.limited && global);
            if denied {
                assert_eq!((status, answer["code"].as_str()), (403, Some("role_forbidden")), "{context}");
                assert_eq!(log_len(&app).await, before, "a refused call logs nothing: {context}");
            } else {
                // Allowed by its role: whatever else the route says (another test in this table
                // may have revoked the agent, so minting it a task token is 403 agent_revoked),
                // never the principal's refusal.
                let refused_principal = status == 401
                    || (status == 403 && matches!(answer["code"].as_str(), Some("role_forbidden" | "admin_only")));
                assert!(!refused_principal, "{context}");
                let names_the_other_tree = path.contains("{agent}")
                    || path.contains("{hold}")
                    || path.contains("{id}")
                    || url.contains("?agent=")
                    || matches!((*method, *path), ("post", "/v1/tasks/{task}/outcome") | ("post", "/v1/agents"));
                if t.limited && names_the_other_tree {
                    assert_eq!(status, 404, "another tree is as if it did not exist: {context}");
                    assert_eq!(log_len(&app).await, before, "{context}");
                }
            }
        }
    }
    assert_eq!(checked, tokens.len() * ROUTES.len());

    // The limited token's lists show its own tree only.
    let tina = &tokens[3].token;
    let (status, listed) = app.agent_call(tina, Method::GET, "/v1/agents", None).await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["agents"].as_array().expect("agents").iter().filter_map(|a| a["id"].as_str()).collect();
    assert!(ids.contains(&mine.id.as_str()) && !ids.contains(&other.id.as_str()), "{ids:?}");
    let (status, recent) = app.agent_call(tina, Method::GET, "/v1/events/recent", None).await;
    assert_eq!(status, 200);
    let entries = recent["entries"].as_array().expect("entries");
    assert!(!entries.is_empty() && entries.iter().all(|e| e["tree"] == mine.tree.as_str()), "{recent}");
    let (status, whoami) = app.agent_call(tina, Method::GET, "/v1/whoami", None).await;
    assert_eq!(status, 200);
    assert_eq!((whoami["name"].as_str(), whoami["role"].as_str()), (Some("tina"), Some("operator")));
    assert_eq!(whoami["tree"].as_str(), Some(mine.tree.as_str()));
    assert!(!whoami["actions"].as_array().expect("actions").contains(&json!("create_agent")));
    assert_eq!(whoami["tighten_only"], json!(["set_cap", "set_controls", "set_expiry"]));
    // And it acts on its own tree.
    let (status, body) = app
        .agent_call(tina, Method::POST, &format!("/v1/agents/{}/revoke", mine.id), Some(json!({ "reason": "tina" })))
        .await;
    assert_eq!(status, 200, "{body}");

    // The dashboard session shows what the page may offer.
    let (_, session) = app.agent_call(&tokens[0].token, Method::GET, "/v1/dashboard/session", None).await;
    assert_eq!(session, json!({ "role": "viewer", "actions": [], "tighten_only": [] }));
    let (_, session) = app.agent_call(&tokens[1].token, Method::GET, "/v1/dashboard/session", None).await;
    assert_eq!(session["role"], "operator");
    let actions = session["actions"].as_array().expect("actions");
    assert!(actions.contains(&json!("revoke")) && !actions.contains(&json!("create_agent")), "{session}");
    assert_eq!(session["tighten_only"], json!(["set_cap", "set_controls", "set_expiry"]), "{session}");

    // The list never shows a token or its hash.
    let (_, listed) = app.admin(Method::GET, "/v1/operators", None).await;
    let text = listed.to_string();
    for t in &tokens {
        assert!(!text.contains(&t.token[7..]), "the list shows a token");
    }
    assert!(!text.contains("token"), "{text}");
}

#[tokio::test]
async fn an_operator_tightens_but_never_loosens_and_every_change_names_who_made_it() {
    let app = spawn_app_with(AppOptions::default()).await;
    let agent = app.create_agent("tighten-me", 10_000_000, None).await;
    let olga = create_operator(&app, "olga", "operator", None).await;
    let call = |method: Method, path: String, body: Value| {
        let app = &app;
        let olga = olga.clone();
        async move { app.agent_call(&olga, method, &path, Some(body)).await }
    };
    let cap = format!("/v1/agents/{}/cap", agent.id);
    let controls = format!("/v1/agents/{}/controls", agent.id);
    let expiry = format!("/v1/agents/{}/expiry", agent.id);

    let (status, body) = call(Method::PUT, cap.clone(), json!({ "cap_micros": 6_000_000 })).await;
    assert_eq!(status, 200, "{body}");
    let before = log_len(&app).await;
    let (status, body) = call(Method::PUT, cap.clone(), json!({ "cap_micros": 6_000_001 })).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("role_forbidden")), "{body}");
    assert_eq!(app.show(&agent.id).await["cap_micros"], 6_000_000, "the cap is unchanged");
    assert_eq!(log_len(&app).await, before, "a refused raise logs nothing");

    let (status, body) = call(Method::PUT, controls.clone(), json!({ "limits": { "daily": 1_000_000 } })).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(Method::PUT, controls.clone(), json!({ "limits": { "daily": 2_000_000 } })).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("role_forbidden")), "{body}");
    let (status, body) =
        call(Method::PUT, controls.clone(), json!({ "breaker": null, "limits": { "daily": 1 } })).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("role_forbidden")), "dropping the breaker: {body}");
    let (_, shown) = app.admin(Method::GET, &controls, None).await;
    assert_eq!(shown["limits"]["daily"], 1_000_000, "{shown}");

    let (status, body) = call(Method::PUT, expiry.clone(), json!({ "ttl_secs": 3_600 })).await;
    assert_eq!(status, 200, "{body}");
    for looser in [json!({ "ttl_secs": 7_200 }), json!({ "never": true })] {
        let (status, body) = call(Method::PUT, expiry.clone(), looser.clone()).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("role_forbidden")), "{looser}: {body}");
    }
    let (status, body) = call(Method::PUT, expiry.clone(), json!({ "ttl_secs": 60 })).await;
    assert_eq!(status, 200, "earlier is tighter: {body}");

    // The admin may loosen; every change names who made it.
    let (status, _) = app.admin(Method::PUT, &cap, Some(json!({ "cap_micros": 20_000_000 }))).await;
    assert_eq!(status, 200);
    let (status, _) =
        call(Method::POST, format!("/v1/agents/{}/revoke", agent.id), json!({ "reason": "oncall" })).await;
    assert_eq!(status, 200);
    let ada = create_operator(&app, "ada", "admin", None).await;
    let (status, _) = app.agent_call(&ada, Method::POST, &format!("/v1/agents/{}/rotate-token", agent.id), None).await;
    assert_eq!(status, 200);
    let (status, _) = app.agent_call(&ada, Method::POST, &format!("/v1/agents/{}/archive", agent.id), None).await;
    assert_eq!(status, 200);
    let log = app.log().await;
    let by: Vec<(&str, &str)> = log
        .iter()
        .filter(|e| e["agent"] == agent.id.as_str() && e["event"] != "create")
        .map(|e| (e["event"].as_str().unwrap_or(""), e["by"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        by,
        [
            ("cap", "olga"),
            ("controls", "olga"),
            ("expiry", "olga"),
            ("expiry", "olga"),
            ("cap", "admin"),
            ("revoke", "olga"),
            ("rotate", "ada"),
            ("archive", "ada")
        ]
    );
    let csv = app
        .http
        .get(app.url("/v1/log?format=csv"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    assert!(csv.lines().next().expect("header").ends_with(",by"), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",revoke,") && l.ends_with(",olga")), "{csv}");
}

#[tokio::test]
async fn a_change_judged_against_stale_controls_is_refused_by_the_ledger_on_both_backends() {
    for backend in [Backend::Memory, Backend::Redis] {
        let (ledger, _redis) = support::ledger(backend).await;
        let tree = spendcap::identity::TreeId::generate();
        let id = spendcap::identity::AgentId::generate(&tree);
        let token = spendcap::identity::AgentToken::generate(&id);
        let new = spendcap::ledger::NewAgent {
            id: id.clone(),
            handle: format!("cas-{}", tree.as_str()),
            parent: None,
            cap: adapters::Micros::new(1_000).expect("micros"),
            expires_at_ms: None,
            labels: Default::default(),
            token_hash: token.hash(),
        };
        ledger.create_agent(1_000, &new).await.expect("created");
        let read = Controls { daily: Some(500), ..Controls::default() };
        let set =
            |daily| AgentControls { controls: Controls { daily: Some(daily), ..Controls::default() }, alerts: vec![] };
        ledger.set_controls(1_000, &id, &set(500)).await.expect("admin sets");
        // Someone else changes them after the operator read them.
        ledger.set_controls(1_001, &id, &set(400)).await.expect("a concurrent change");
        let olga = Actor { by: "olga".into(), tighten_only: true };
        let err = ledger.set_controls_as(1_002, &id, &set(450), Some(&read), &olga).await.expect_err("stale");
        assert!(matches!(err, LedgerError::ChangedMeanwhile), "{backend:?}: {err:?}");
        assert_eq!(ledger.controls(&id).await.expect("read").controls.daily, Some(400), "{backend:?}");
        let current = Controls { daily: Some(400), ..Controls::default() };
        ledger.set_controls_as(1_003, &id, &set(300), Some(&current), &olga).await.expect("fresh");
        // Lower only, in the ledger.
        let raise = ledger.set_cap_as(1_004, &id, adapters::Micros::new(1_001).expect("m"), &olga).await;
        assert!(matches!(raise, Err(LedgerError::RoleForbidden(_))), "{backend:?}: {raise:?}");
        ledger.set_cap_as(1_005, &id, adapters::Micros::new(999).expect("m"), &olga).await.expect("lower");
        let later = ledger.set_expiry_as(1_006, &id, None, &olga).await;
        assert!(matches!(later, Err(LedgerError::RoleForbidden(_))), "{backend:?}: {later:?}");
        let log = ledger.read_log(&tree, "0", 100).await.expect("log");
        let by: Vec<(&str, &str)> = log.iter().map(|e| (e.event.as_str(), e.by.as_str())).collect();
        assert_eq!(
            by,
            [("create", ""), ("controls", ""), ("controls", ""), ("controls", "olga"), ("cap", "olga")],
            "{backend:?}"
        );
    }
}

#[tokio::test]
async fn a_revoked_operator_token_stops_at_once_on_another_instance() {
    let redis = Arc::new(RedisServer::start());
    let first = spawn_app_with(AppOptions { redis: Some((redis.clone(), "sc".into())), ..Default::default() }).await;
    let second = spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), ..Default::default() }).await;
    let agent = first.create_agent("watched", 1_000_000, None).await;
    let olga = create_operator(&first, "olga", "operator", None).await;
    let (status, _) = second.agent_call(&olga, Method::GET, &format!("/v1/agents/{}", agent.id), None).await;
    assert_eq!(status, 200, "the token works on the other instance");
    let (status, body) = first.admin(Method::POST, "/v1/operators/olga/revoke", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["already_revoked"], false);
    let (status, body) = second
        .agent_call(&olga, Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({ "reason": "late" })))
        .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");
    assert_eq!(second.show(&agent.id).await["state"], "active");
    // Names stay taken; an agent token is not an admin-side token.
    let (status, body) =
        first.admin(Method::POST, "/v1/operators", Some(json!({ "name": "olga", "role": "viewer" }))).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("operator_exists")));
    let (status, body) = first.agent_call(&agent.token, Method::GET, "/v1/whoami", None).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("admin_only")));
    let (_, listed) = first.admin(Method::GET, "/v1/operators", None).await;
    assert!(listed["operators"][0]["revoked_at_ms"].is_u64(), "{listed}");
}

/// The README's roles table: `| `METHOD path` | `action` | viewer | operator | admin |` rows.
#[test]
fn the_readme_roles_table_is_the_routes_table() {
    let readme = include_str!("../../README.md");
    let at = readme.find("<!-- roles -->").expect("README has the roles table");
    let rows: Vec<Vec<String>> = readme[at..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`').to_owned()).collect())
        .collect();
    assert_eq!(rows.len(), ROUTES.len(), "one README row per ROUTES row");
    let cell = |grant: Grant| match grant {
        Grant::Full => "yes",
        Grant::TightenOnly => "tighten",
        Grant::No => "no",
    };
    for ((method, path, action), row) in ROUTES.iter().zip(&rows) {
        let expected = vec![
            format!("{} {path}", method.to_ascii_uppercase()),
            action.as_str().to_owned(),
            cell(Role::Viewer.grant(*action)).to_owned(),
            cell(Role::Operator.grant(*action)).to_owned(),
            cell(Role::Admin.grant(*action)).to_owned(),
        ];
        assert_eq!(row, &expected, "README row (left) and ROUTES + Role::grant (right) differ");
    }
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_revokes_operators_and_takes_their_tokens() {
    let app = spawn_app_with(AppOptions::default()).await;
    let agent = app.create_agent("cli-watched", 5_000_000, None).await;
    let cli = |token: &str, args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(args)
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", token)
            .output()
            .expect("runs the CLI");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };
    let (ok, created, err) =
        cli(ADMIN_TOKEN, &["operators", "create", "--name", "oncall", "--role", "operator", "--tree", "cli-watched"]);
    assert!(ok, "{created}{err}");
    let token = created
        .lines()
        .find_map(|l| l.strip_prefix("export SPENDCAP_ADMIN_TOKEN="))
        .expect("the token, once")
        .to_owned();
    assert!(created.contains("oncall") && created.contains(&agent.tree), "{created}");
    let (ok, me, _) = cli(&token, &["whoami"]);
    assert!(ok && me.starts_with("oncall (operator, tree "), "{me}");
    assert!(me.contains("tighten only: set_cap, set_controls, set_expiry"), "{me}");
    // The operator token works where the admin token did, as far as its role goes.
    let (ok, out, _) = cli(&token, &["agent", "set-cap", "cli-watched", "4.00"]);
    assert!(ok, "{out}");
    let (ok, _, err) = cli(&token, &["agent", "set-cap", "cli-watched", "9.00"]);
    assert!(!ok && err.contains("role_forbidden"), "{err}");
    let (ok, _, err) = cli(&token, &["agent", "create", "--handle", "nope", "--cap", "1"]);
    assert!(!ok && err.contains("role_forbidden"), "{err}");
    let (ok, list, _) = cli(ADMIN_TOKEN, &["operators", "list"]);
    assert!(ok && list.contains("oncall") && !list.contains(&token[7..]), "{list}");
    let (ok, out, _) = cli(ADMIN_TOKEN, &["operators", "revoke", "oncall"]);
    assert!(ok && out.starts_with("revoked operator oncall at "), "{out}");
    let (ok, _, err) = cli(&token, &["whoami"]);
    assert!(!ok && err.contains("invalid_token"), "{err}");
}

/// One change and the log entry it must leave: `(event, by)` of the entry that `pick` finds
/// among those appended by the change.
struct Attributed {
    route: (&'static str, &'static str),
    event: &'static str,
    by: String,
}

/// Every mutating admin route of `ROUTES` (done by an operator token where its role allows it,
/// else by an admin operator token, so `by` is a name the daemon was given, not a constant), and
/// every agent-side change an orchestrator makes, leaves a log entry naming who did it: the
/// operator's name, or `agent:<id>`. Operator-token changes are in `/v1/log` too.
#[tokio::test]
#[allow(unused_assignments)] // `change!` moves `seen` on after every change, the last one too
async fn every_change_is_attributed_in_the_log_to_who_made_it() {
    let app = spawn_app_with(AppOptions::default()).await;
    let olga = create_operator(&app, "olga", "operator", None).await;
    let ada = create_operator(&app, "ada", "admin", None).await;
    let as_ = |token: &str, method: Method, path: String, body: Option<Value>| {
        let (app, token) = (&app, token.to_owned());
        async move { app.agent_call(&token, method, &path, body).await }
    };
    let mut seen = app.log().await.len();
    let mut attributed: Vec<Attributed> = Vec::new();
    // Runs one change (which must succeed) and records the entry it appended with `event`.
    macro_rules! change {
        ($route:expr, $token:expr, $method:expr, $path:expr, $body:expr, $event:expr) => {{
            let (status, body) = as_($token, $method, $path, $body).await;
            assert!((200..300).contains(&status), "{:?}: {status} {body}", $route);
            let log = app.log().await;
            let entry = log[seen..]
                .iter()
                .find(|e| e["event"] == $event)
                .unwrap_or_else(|| panic!("{:?} appended no {} entry: {:?}", $route, $event, &log[seen..]));
            attributed.push(Attributed { route: $route, event: $event, by: entry["by"].as_str().unwrap_or("").into() });
            seen = log.len();
            body
        }};
    }

    let created = change!(
        ("post", "/v1/agents"),
        &ada,
        Method::POST,
        "/v1/agents".into(),
        Some(json!({ "handle": "by-root", "cap_micros": 10_000_000 })),
        "create"
    );
    let root = created["agent"]["id"].as_str().expect("id").to_owned();
    let root_token = created["token"].as_str().expect("token").to_owned();
    let agent = |suffix: &str| format!("/v1/agents/{root}{suffix}");
    change!(
        ("put", "/v1/agents/{agent}/cap"),
        &olga,
        Method::PUT,
        agent("/cap"),
        Some(json!({ "cap_micros": 9_000_000 })),
        "cap"
    );
    change!(
        ("put", "/v1/agents/{agent}/controls"),
        &olga,
        Method::PUT,
        agent("/controls"),
        Some(json!({ "limits": { "daily": 8_000_000 } })),
        "controls"
    );
    let rules = json!({ "limits": { "daily": 8_000_000 }, "approval": { "above_micros": 1_000_000, "ttl_secs": 600 },
        "breaker": { "max_repeats": 3 } });
    let (status, body) = app.admin(Method::PUT, &agent("/controls"), Some(rules)).await;
    assert_eq!(status, 200, "{body}");
    seen = app.log().await.len();
    change!(
        ("put", "/v1/agents/{agent}/expiry"),
        &olga,
        Method::PUT,
        agent("/expiry"),
        Some(json!({ "ttl_secs": 86_400 })),
        "expiry"
    );
    change!(
        ("post", "/v1/tasks/{task}/outcome"),
        &olga,
        Method::POST,
        "/v1/tasks/t-by/outcome".into(),
        Some(json!({ "outcome": "success", "task_type": "research", "agent": root })),
        "outcome"
    );
    // Two payments wait for approval: one approved, one denied.
    let mut waiting = Vec::new();
    for amount in [2_000_000, 2_500_000] {
        let (status, body) = as_(
            &root_token,
            Method::POST,
            "/v1/holds".into(),
            Some(json!({ "amount_micros": amount, "service": format!("s{amount}.example.com") })),
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (202, Some("approval_required")), "{body}");
        waiting.push(body["approval_id"].as_str().expect("approval").to_owned());
    }
    seen = app.log().await.len();
    let note = Some(json!({ "note": "by test" }));
    change!(
        ("post", "/v1/approvals/{id}/approve"),
        &olga,
        Method::POST,
        format!("/v1/approvals/{}/approve", waiting[0]),
        note.clone(),
        "approve"
    );
    change!(
        ("post", "/v1/approvals/{id}/deny"),
        &olga,
        Method::POST,
        format!("/v1/approvals/{}/deny", waiting[1]),
        note,
        "void"
    );
    // An unknown outcome, resolved by an admin.
    let (_, hold) = as_(
        &root_token,
        Method::POST,
        "/v1/holds".into(),
        Some(json!({ "amount_micros": 1_000, "service": "lost.example.com" })),
    )
    .await;
    let hold = hold["hold_id"].as_str().expect("hold").to_owned();
    let redis = app.redis.clone().expect("redis");
    let tree = hold.split('_').nth(1).expect("tree").to_owned();
    let reply = redis
        .cli(&[
            "FCALL",
            "spendcap_mark_unknown",
            "1",
            &format!("sc:{{{tree}}}"),
            &app.clock.now_ms().to_string(),
            &hold,
            "lost",
        ])
        .expect("redis-cli");
    assert!(reply.starts_with("ok"), "{reply}");
    seen = app.log().await.len();
    change!(
        ("post", "/v1/holds/{hold}/resolve"),
        &ada,
        Method::POST,
        format!("/v1/holds/{hold}/resolve"),
        Some(json!({ "outcome": "settled", "amount_micros": 1_000, "reason": "confirmed by the provider" })),
        "settle"
    );
    let minted = change!(
        ("post", "/v1/agents/{agent}/tokens"),
        &ada,
        Method::POST,
        agent("/tokens"),
        Some(json!({ "task": "t-by", "ttl_secs": 600 })),
        "token"
    );
    change!(
        ("delete", "/v1/agents/{agent}/tokens/{token}"),
        &olga,
        Method::DELETE,
        agent(&format!("/tokens/{}", minted["token_id"].as_str().expect("token id"))),
        None,
        "token"
    );
    let rotated = change!(
        ("post", "/v1/agents/{agent}/rotate-token"),
        &ada,
        Method::POST,
        agent("/rotate-token"),
        None,
        "rotate"
    );
    let root_token = rotated["token"].as_str().expect("the new token").to_owned();

    // What an orchestrator does with its own token.
    let (status, parent) =
        app.admin(Method::POST, "/v1/agents", Some(json!({ "handle": "by-parent", "cap_micros": 5_000_000 }))).await;
    assert_eq!(status, 201, "{parent}");
    let (parent_id, parent_token) =
        (parent["agent"]["id"].as_str().expect("id").to_owned(), parent["token"].as_str().expect("token").to_owned());
    seen = app.log().await.len();
    let sub = change!(
        ("post", "/v1/me/agents"),
        &parent_token,
        Method::POST,
        "/v1/me/agents".into(),
        Some(json!({ "handle": "by-sub", "cap_micros": 1_000_000 })),
        "create"
    );
    let sub_id = sub["agent"]["id"].as_str().expect("id").to_owned();
    let task_token = change!(
        ("post", "/v1/me/tokens"),
        &parent_token,
        Method::POST,
        "/v1/me/tokens".into(),
        Some(json!({ "task": "t-sub", "ttl_secs": 600, "agent": sub_id })),
        "token"
    );
    change!(
        ("delete", "/v1/me/tokens/{token}"),
        &parent_token,
        Method::DELETE,
        format!("/v1/me/tokens/{}", task_token["token_id"].as_str().expect("token id")),
        None,
        "token"
    );
    change!(
        ("post", "/v1/tasks/{task}/outcome (agent)"),
        &parent_token,
        Method::POST,
        "/v1/tasks/t-own/outcome".into(),
        Some(json!({ "outcome": "failed", "task_type": "research" })),
        "outcome"
    );
    change!(
        ("post", "/v1/me/agents/{agent}/revoke"),
        &parent_token,
        Method::POST,
        format!("/v1/me/agents/{sub_id}/revoke"),
        Some(json!({ "reason": "done" })),
        "revoke"
    );

    // The breaker (max 3 repeats) suspends the root; an operator reinstates it.
    for _ in 0..4 {
        as_(
            &root_token,
            Method::POST,
            "/v1/holds".into(),
            Some(json!({ "amount_micros": 10, "service": "loop.example.com" })),
        )
        .await;
    }
    assert_eq!(app.show(&root).await["state"], "suspended");
    seen = app.log().await.len();
    change!(("post", "/v1/agents/{agent}/reinstate"), &olga, Method::POST, agent("/reinstate"), None, "reinstate");
    change!(
        ("post", "/v1/agents/{agent}/revoke"),
        &olga,
        Method::POST,
        agent("/revoke"),
        Some(json!({ "reason": "by_test" })),
        "revoke"
    );
    change!(("post", "/v1/agents/{agent}/archive"), &ada, Method::POST, agent("/archive"), None, "archive");
    change!(
        ("post", "/v1/operators"),
        &ada,
        Method::POST,
        "/v1/operators".into(),
        Some(json!({ "name": "vic", "role": "viewer" })),
        "operator_create"
    );
    change!(
        ("post", "/v1/operators/{name}/revoke"),
        &ada,
        Method::POST,
        "/v1/operators/vic/revoke".into(),
        None,
        "operator_revoke"
    );
    assert_eq!(seen, app.log().await.len(), "one entry per change");

    let got: Vec<(&str, &str, &str)> = attributed.iter().map(|a| (a.route.1, a.event, a.by.as_str())).collect();
    let (parent_by, by_olga) = (format!("agent:{parent_id}"), "olga");
    let expected: Vec<(&str, &str, &str)> = vec![
        ("/v1/agents", "create", "ada"),
        ("/v1/agents/{agent}/cap", "cap", by_olga),
        ("/v1/agents/{agent}/controls", "controls", by_olga),
        ("/v1/agents/{agent}/expiry", "expiry", by_olga),
        ("/v1/tasks/{task}/outcome", "outcome", by_olga),
        ("/v1/approvals/{id}/approve", "approve", by_olga),
        ("/v1/approvals/{id}/deny", "void", by_olga),
        ("/v1/holds/{hold}/resolve", "settle", "ada"),
        ("/v1/agents/{agent}/tokens", "token", "ada"),
        ("/v1/agents/{agent}/tokens/{token}", "token", by_olga),
        ("/v1/agents/{agent}/rotate-token", "rotate", "ada"),
        ("/v1/me/agents", "create", &parent_by),
        ("/v1/me/tokens", "token", &parent_by),
        ("/v1/me/tokens/{token}", "token", &parent_by),
        ("/v1/tasks/{task}/outcome (agent)", "outcome", &parent_by),
        ("/v1/me/agents/{agent}/revoke", "revoke", &parent_by),
        ("/v1/agents/{agent}/reinstate", "reinstate", by_olga),
        ("/v1/agents/{agent}/revoke", "revoke", by_olga),
        ("/v1/agents/{agent}/archive", "archive", "ada"),
        ("/v1/operators", "operator_create", "ada"),
        ("/v1/operators/{name}/revoke", "operator_revoke", "ada"),
    ];
    assert_eq!(got, expected);
    // Every mutating admin route is in the table, but one, which needs signed AP2 mandates:
    // registering them is checked by `ap2::registering_open_mandates_is_attributed_in_the_log`.
    let covered: Vec<(&str, &str)> = attributed.iter().map(|a| a.route).collect();
    for (method, path, _) in ROUTES.iter().filter(|(m, _, _)| *m != "get") {
        if *path == "/v1/ap2/agents/{agent}/mandates" {
            continue;
        }
        assert!(covered.contains(&(*method, *path)), "{method} {path} is not in the table");
    }
    // The operator audit entries: in the CSV too, and not for a token limited to one tree.
    let csv = app
        .http
        .get(app.url("/v1/log?format=csv"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    let create_vic = csv.lines().find(|l| l.contains(",operator_create,") && l.contains("vic")).expect(&csv);
    assert!(create_vic.ends_with(",ada"), "{create_vic}");
    let scoped = create_operator(&app, "tess", "viewer", Some("by-parent")).await;
    let (status, _) = app.agent_call(&scoped, Method::GET, "/v1/whoami", None).await;
    assert_eq!(status, 200);
    let scoped_log =
        app.http.get(app.url("/v1/log")).bearer_auth(&scoped).send().await.expect("log").text().await.expect("text");
    assert!(!scoped_log.contains("operator_"), "{scoped_log}");
    assert!(scoped_log.contains(&parent_id), "{scoped_log}");
    let viewer = create_operator(&app, "val", "viewer", None).await;
    let unscoped =
        app.http.get(app.url("/v1/log")).bearer_auth(&viewer).send().await.expect("log").text().await.expect("text");
    assert!(unscoped.contains("\"operator_revoke\""), "an unscoped viewer sees them, as it sees GET /v1/operators");
}

/// The ledger names who made a change on both backends alike: an admin-side principal by name
/// (`Caller::Principal`, `AgentSetup::by`, the task-token actor), an orchestrator agent as
/// `agent:<id>`; and both keep the operators' audit entries, read back as log entries.
#[tokio::test]
async fn both_ledgers_attribute_changes_and_keep_the_operator_audit() {
    use spendcap::identity::{AgentId, AgentToken, TreeId};
    use spendcap::ledger::{AgentSetup, Caller, NewAgent, TaskOutcome};
    let m = |v: u64| adapters::Micros::new(v).expect("micros");
    for backend in [Backend::Memory, Backend::Redis] {
        let (ledger, _redis) = support::ledger(backend).await;
        let tree = TreeId::generate();
        let new = |id: &AgentId, parent: Option<&AgentId>, token: &AgentToken| NewAgent {
            id: id.clone(),
            handle: format!("{}-{}", id.as_str(), tree.as_str()),
            parent: parent.cloned(),
            cap: m(1_000),
            expires_at_ms: None,
            labels: Default::default(),
            token_hash: token.hash(),
        };
        let root = AgentId::generate(&tree);
        let root_token = AgentToken::generate(&root);
        let by_olga = AgentSetup { by: "olga".into(), ..AgentSetup::default() };
        ledger.create_agent_with(1_000, &new(&root, None, &root_token), &by_olga).await.expect("created");
        let sub = AgentId::generate(&tree);
        let sub_token = AgentToken::generate(&sub);
        let root_caller = Caller::Agent(root_token.hash());
        ledger
            .create_sub_agent(1_001, &root_caller, &new(&sub, Some(&root), &sub_token), &AgentSetup::default())
            .await
            .expect("sub-agent");
        let olga = Caller::Principal("olga".into());
        ledger.task_outcome(1_002, &root, &olga, "t1", "research", TaskOutcome::Success).await.expect("outcome");
        ledger
            .task_outcome(1_003, &sub, &Caller::Agent(sub_token.hash()), "t2", "research", TaskOutcome::Failed)
            .await
            .expect("own outcome");
        let task_token = AgentToken::generate_task(&sub);
        ledger.create_task_token(1_004, None, "ada", &sub, &task_token, "t3", 60_000).await.expect("minted");
        let id = task_token.task_token_id().expect("task token id");
        ledger.revoke_task_token(1_005, Some((&root, &root_caller)), "", &tree, id, None).await.expect("revoked");
        ledger.revoke_by(1_006, (&root, &root_caller), &sub, "done").await.expect("sub revoked");
        let log = ledger.read_log(&tree, "0", 100).await.expect("log");
        let by: Vec<(&str, &str)> = log.iter().map(|e| (e.event.as_str(), e.by.as_str())).collect();
        let root_by = format!("agent:{root}");
        let sub_by = format!("agent:{sub}");
        assert_eq!(
            by,
            [
                ("create", "olga"),
                ("create", root_by.as_str()),
                ("outcome", "olga"),
                ("outcome", sub_by.as_str()),
                ("token", "ada"),
                ("token", root_by.as_str()),
                ("revoke", root_by.as_str())
            ],
            "{backend:?}"
        );

        let operator = |name: &str| spendcap::operators::NewOperator {
            id: format!("{:016x}", name.len()),
            name: name.into(),
            role: Role::Viewer,
            tree: Some(tree.clone()),
            token_hash: root_token.hash(),
        };
        ledger.create_operator(2_000, &operator("vic"), "ada").await.expect("operator");
        ledger.revoke_operator(2_001, "vic", "admin").await.expect("revoked");
        let audit = ledger.read_operator_log("0", 10).await.expect("audit");
        let seen: Vec<(&str, &str, serde_json::Value)> = audit
            .iter()
            .map(|e| (e.event.as_str(), e.by.as_str(), serde_json::from_str(&e.detail).expect("detail")))
            .collect();
        assert_eq!(
            seen,
            [
                ("operator_create", "ada", json!({ "operator": "vic", "role": "viewer", "tree": tree.as_str() })),
                ("operator_revoke", "admin", json!({ "operator": "vic", "role": null, "tree": null }))
            ],
            "{backend:?}"
        );
        assert_eq!(audit[0].ts_ms, 2_000, "{backend:?}");
        let after = ledger.read_operator_log(&audit[0].id, 10).await.expect("page");
        assert_eq!(after.len(), 1, "{backend:?}: paged after the first");
    }
}
