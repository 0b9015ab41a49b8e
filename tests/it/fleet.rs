//! Fleet as code and archived agents (issue 19, item 7), against a daemon on real Redis: the
//! README's fleet file and commands run as written (plan, dry run, idempotent second apply,
//! tokens written privately, a handle reused after an archive), diffs of an update, and an
//! archived agent's history kept and still attributed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, AppOptions, Backend, TestApp, ADMIN_TOKEN};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("spendcap-fleet-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The README's fleet file and the `sh` block after it.
fn readme_fleet() -> (String, Vec<String>) {
    let readme = include_str!("../../README.md");
    let at = readme.find("<!-- fleet").expect("README has the fleet marker");
    let rest = &readme[at..];
    let block = |rest: &str, fence: &str| -> (String, usize) {
        let open = rest.find(fence).expect("a block") + fence.len();
        let close = rest[open..].find("```").expect("the block ends") + open;
        (rest[open..close].to_owned(), close + 3)
    };
    let (yaml, end) = block(rest, "```yaml\n");
    let (sh, _) = block(&rest[end..], "```sh\n");
    (yaml, sh.lines().map(str::to_owned).collect())
}

/// Runs one shell line in `dir` with the binary on the PATH and the daemon's URL and token set.
fn sh(app: &TestApp, dir: &Path, line: &str) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_spendcap")).parent().expect("the binary's directory");
    let output = Command::new("sh")
        .args(["-e", "-c", line])
        .current_dir(dir)
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("SPENDCAP_URL", &app.base)
        .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{line}\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

async fn agents(app: &TestApp) -> Vec<Value> {
    let (status, list) = app.admin(reqwest::Method::GET, "/v1/agents", None).await;
    assert_eq!(status, 200);
    list["agents"].as_array().expect("agents").clone()
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_fleet_file_applies_idempotently_and_reuses_an_archived_handle() {
    let app = spawn_app().await;
    let dir = TempDir::new();
    let (yaml, lines) = readme_fleet();
    std::fs::write(dir.0.join("fleet.yaml"), yaml).expect("fleet.yaml");
    assert_eq!(lines.len(), 5, "{lines:?}");

    let plan = sh(&app, &dir.0, &lines[0]);
    for expected in [
        "create     research: cap $5.00, labels {\"team\":\"search\"}, controls ",
        "create     research-sub: cap $1.50, parent research, expires 2030-01-01T00:00:00Z",
        "create     enrichment: cap $1.00",
        "unchanged  old-bot",
        "plan: 3 to create, 0 to update, 0 to archive, 1 unchanged",
        "--dry-run: nothing was changed",
    ] {
        assert!(plan.contains(expected), "{expected:?} in:\n{plan}");
    }
    assert!(agents(&app).await.is_empty(), "a dry run changes nothing");

    let applied = sh(&app, &dir.0, &lines[1]);
    assert!(applied.contains("the tokens of 3 new agent(s) are in tokens.json (mode 0600)"), "{applied}");
    let tokens_path = dir.0.join("tokens.json");
    assert_eq!(std::fs::metadata(&tokens_path).expect("tokens.json").permissions().mode() & 0o777, 0o600);
    let tokens: Value = serde_json::from_str(&std::fs::read_to_string(&tokens_path).expect("read")).expect("JSON");
    assert!(!applied.contains("sct_"), "tokens went to the file, not the terminal");
    let research = app.show("research").await;
    let sub = app.show("research-sub").await;
    assert_eq!((research["cap_micros"].as_u64(), sub["cap_micros"].as_u64()), (Some(5_000_000), Some(1_500_000)));
    assert_eq!(sub["parent"], research["id"]);
    assert_eq!(sub["tree"], research["tree"], "the file's parent makes the tree");
    assert_eq!(research["labels"], json!({ "team": "search" }));
    assert_eq!(sub["expires_at_ms"], 1_893_456_000_000u64);
    let (_, controls) = app
        .admin(reqwest::Method::GET, &format!("/v1/agents/{}/controls", research["id"].as_str().expect("id")), None)
        .await;
    assert_eq!(
        (controls["task_cap_micros"].as_u64(), controls["limits"]["daily"].as_u64()),
        (Some(1_500_000), Some(3_000_000))
    );
    // The token works: the new agent can ask for its own balance.
    let token = tokens["research"].as_str().expect("research's token");
    let (status, me) = app.agent_call(token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");

    let again = sh(&app, &dir.0, &lines[2]);
    assert!(again.contains("plan: 0 to create, 0 to update, 0 to archive, 4 unchanged"), "{again}");
    assert!(again.ends_with("applied\n"), "{again}");

    let archived = sh(&app, &dir.0, &lines[3]);
    let old_enrichment = tokens["enrichment"].as_str().expect("token").to_owned();
    assert!(
        archived.starts_with("archived enrichment (ag_") && archived.contains("the handle is free again"),
        "{archived}"
    );

    let recreated = sh(&app, &dir.0, &lines[4]);
    assert!(recreated.contains("create     enrichment: cap $1.00"), "{recreated}");
    assert!(recreated.contains("plan: 1 to create, 0 to update, 0 to archive, 3 unchanged"), "{recreated}");
    let tokens: Value = serde_json::from_str(&std::fs::read_to_string(&tokens_path).expect("read")).expect("JSON");
    assert_ne!(tokens["enrichment"].as_str(), Some(old_enrichment.as_str()));
    let listed = agents(&app).await;
    let enrichments: Vec<&Value> = listed.iter().filter(|a| a["handle"] == "enrichment").collect();
    assert_eq!(enrichments.len(), 2, "the archived one is still listed, as archived");
    assert_eq!(enrichments.iter().filter(|a| a["archived_at_ms"].is_u64()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_prints_each_diff_and_refuses_what_cannot_change() {
    let app = spawn_app().await;
    let dir = TempDir::new();
    let write = |text: &str| std::fs::write(dir.0.join("fleet.yaml"), text).expect("fleet.yaml");
    write("agents:\n  - handle: a\n    cap: \"2.00\"\n    controls: { limits: { daily: 1000000 } }\n  - handle: b\n    cap: 3\n");
    sh(&app, &dir.0, "spendcap apply -f fleet.yaml");
    assert_eq!(app.show("b").await["cap_micros"], 3_000_000);

    write("agents:\n  - handle: a\n    cap: \"2.50\"\n    controls: { limits: { daily: 2000000 } }\n    expires_at: 2031-06-01T12:00:00Z\n  - handle: b\n    cap: 3\n");
    let plan = sh(&app, &dir.0, "spendcap apply -f fleet.yaml");
    for expected in [
        "update     a\n",
        "cap: $2.00 → $2.50",
        "expires_at: never → 2031-06-01T12:00:00Z",
        "controls.limits: {\"daily\":1000000} → {\"daily\":2000000}",
        "unchanged  b",
    ] {
        assert!(plan.contains(expected), "{expected:?} in:\n{plan}");
    }
    assert_eq!(app.show("a").await["cap_micros"], 2_500_000);
    assert!(sh(&app, &dir.0, "spendcap apply -f fleet.yaml").contains("2 unchanged"));

    // A parent or labels that differ, a float cap, an unknown key: refused, nothing applied.
    let refuse = |text: &str, why: &str| {
        write(text);
        let output = Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(["apply", "-f"])
            .arg(dir.0.join("fleet.yaml"))
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("apply");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success() && stderr.contains(why), "{why:?} in:\n{stderr}");
    };
    refuse(
        "agents:\n  - handle: a\n    cap: \"9.00\"\n  - handle: b\n    parent: a\n    cap: 3\n",
        "b: its parent is none and cannot change",
    );
    refuse("agents:\n  - handle: a\n    cap: 2.5\n", "is not exact: write it as a string");
    refuse("agents:\n  - handle: a\n    cap: \"2.50\"\n    labels: { x: y }\n", "labels are set at creation");
    refuse("agents:\n  - handle: a\n    cap: \"2.50\"\n    colour: red\n", "unknown field `colour`");
    assert_eq!(app.show("a").await["cap_micros"], 2_500_000, "a refused file changes nothing");
}

/// An archived agent: its next payment is refused, its handle names a new agent, and its history
/// (log, report) is kept and still attributed to it — on both ledgers, and the Redis ledger's
/// check replays clean.
#[tokio::test]
async fn archiving_frees_the_handle_and_keeps_the_history() {
    for backend in [Backend::Redis, Backend::Memory] {
        let app = spawn_app_with(AppOptions { backend, ..Default::default() }).await;
        let old = app.create_agent("worker", 1_000_000, None).await;
        let (status, held) = app.hold(&old, 100_000).await;
        assert_eq!(status, 201, "{held}");
        let (status, _) = app.settle(&old, held["hold_id"].as_str().expect("hold"), 40_000).await;
        assert_eq!(status, 200);

        let (status, archived) = app.admin(reqwest::Method::POST, "/v1/agents/worker/archive", None).await;
        assert_eq!(status, 200, "{archived}");
        assert_eq!(
            (archived["agent_id"].as_str(), archived["handle"].as_str()),
            (Some(old.id.as_str()), Some("worker"))
        );
        assert_eq!(archived["already_archived"], false);
        let (status, again) = app.admin(reqwest::Method::POST, &format!("/v1/agents/{}/archive", old.id), None).await;
        assert_eq!((status, again["already_archived"].as_bool()), (200, Some(true)), "{again}");

        let (status, refused) = app.hold(&old, 1_000).await;
        assert_eq!((status, refused["code"].as_str()), (402, Some("agent_revoked")), "{refused}");

        // The handle names a new agent now; the old one is still there by id, archived.
        let new = app.create_agent("worker", 2_000_000, None).await;
        assert_ne!(new.id, old.id);
        assert_eq!(app.show("worker").await["id"], new.id.as_str());
        let shown = app.show(&old.id).await;
        assert_eq!((shown["handle"].as_str(), shown["spent_micros"].as_u64()), (Some("worker"), Some(40_000)));
        assert!(shown["archived_at_ms"].is_u64() && shown["revoked"] == "archived", "{shown}");

        let log = app.log().await;
        assert!(log.iter().any(|e| e["event"] == "archive" && e["agent"] == old.id.as_str()), "{log:?}");
        assert!(log.iter().any(|e| e["event"] == "settle" && e["agent"] == old.id.as_str()));
        let (_, report) = app.admin(reqwest::Method::GET, "/v1/reports", None).await;
        let row = report["agents"].as_array().expect("rows").iter().find(|r| r["agent"] == old.id.as_str()).cloned();
        let row = row.expect("the archived agent's report row");
        assert_eq!((row["handle"].as_str(), row["spent_micros"].as_u64()), (Some("worker"), Some(40_000)));

        if backend == Backend::Redis {
            let redis = app.redis.clone().expect("redis");
            let output = Command::new(env!("CARGO_BIN_EXE_spendcap"))
                .args(["ledger", "check"])
                .env("SPENDCAP_REDIS_URL", redis.url())
                .env("SPENDCAP_REDIS_NAMESPACE", "sc")
                .output()
                .expect("ledger check");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success() && stdout.starts_with("ok:"), "{stdout}");
        }
    }
}
