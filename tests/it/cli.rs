//! The CLI for people (issue 19, item 4): ISO-8601 UTC times, dollars with as many decimals as the
//! amount needs, agents named `handle (id)`, `--since` / `--until` in human forms, `log export
//! --protocol`, and empty results that say why they are empty.

use serde_json::{json, Value};

use crate::support::{spawn_app, ADMIN_TOKEN};

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_in_times_dollars_and_handles() {
    let app = spawn_app().await;
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(args)
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("runs the CLI");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr)
    };

    // Empty states say why.
    let (ok, list, _) = cli(&["agent", "list"]);
    assert!(ok && list.starts_with("no agents yet"), "{list}");
    let (ok, report, _) = cli(&["report"]);
    assert!(ok && report.contains("no task ended in this range"), "{report}");
    assert!(report.contains("no payment was refused in this range"), "{report}");
    let (ok, holds, _) = cli(&["holds", "list"]);
    assert!(ok && holds == "no unknown holds\n", "{holds}");

    let agent = app.create_agent("writer", 5_000_000, None).await;
    let (ok, periods, _) = cli(&["agent", "periods", "writer"]);
    assert!(ok && periods.contains("writer has no period limits"), "{periods}");

    // A payment of $0.0125 for task t1 over the generic API.
    let (status, held) = app
        .agent_call(
            &agent.token,
            reqwest::Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": 20_000, "service": "api.example.com", "task": "t1" })),
        )
        .await;
    assert_eq!(status, 201, "{held}");
    let (status, settled) = app.settle(&agent, held["hold_id"].as_str().expect("hold"), 12_500).await;
    assert_eq!(status, 200, "{settled}");
    let (status, _) = app
        .agent_call(
            &agent.token,
            reqwest::Method::POST,
            "/v1/tasks/t1/outcome",
            Some(json!({ "outcome": "success", "task_type": "drafting" })),
        )
        .await;
    assert_eq!(status, 200);

    let (ok, list, _) = cli(&["agent", "list"]);
    assert!(ok && list.contains("$5.00 ") && list.contains("$0.0125 ") && list.contains("$4.9875 "), "{list}");
    let (ok, report, _) = cli(&["report", "--since", "1h"]);
    assert!(ok, "{report}");
    assert!(report.contains("Spent $0.0125 over the log from 20"), "{report}");
    assert!(report.lines().any(|l| l.starts_with("drafting ") && l.contains("$0.0125")), "{report}");

    // The CSV export has an ISO time beside ts_ms, and filters by protocol and by human times.
    let (ok, csv, _) = cli(&["log", "export", "--format", "csv", "--protocol", "generic", "--since", "24h"]);
    assert!(ok, "{csv}");
    let mut rows = csv.lines();
    assert!(rows.next().expect("header").starts_with("id,tree,ts_ms,time,event"));
    let settle = rows.find(|r| r.contains(",settle,")).unwrap_or_else(|| panic!("a settle row in {csv}"));
    let cells: Vec<&str> = settle.split(',').collect();
    let ts_ms: u64 = cells[2].parse().expect("ts_ms");
    assert_eq!(cells[3], spendcap::human::time_ms(ts_ms));
    assert!(cells[3].starts_with("20") && cells[3].ends_with('Z') && cells[3].contains('T'), "{settle}");
    let (ok, none, _) = cli(&["log", "export", "--format", "csv", "--protocol", "x402"]);
    assert!(ok && none.lines().count() == 1, "only the header: {none}");
    let (ok, later, _) = cli(&["log", "export", "--format", "csv", "--since", "2999-01-01"]);
    assert!(ok && later.lines().count() == 1, "only the header: {later}");
    let (ok, _, err) = cli(&["log", "export", "--since", "yesterday"]);
    assert!(!ok && err.contains("--since \"yesterday\": give a duration back from now"), "{err}");

    // Agents are named by handle and id; times are ISO-8601 UTC.
    let (ok, revoked, _) = cli(&["agent", "revoke", "writer", "--reason", "done"]);
    assert!(ok, "{revoked}");
    let revoked_at = app.show("writer").await["revoked_at_ms"].as_u64().expect("revoked_at_ms");
    assert_eq!(revoked, format!("revoked writer ({}) (done) at {}\n", agent.id, spendcap::human::time(revoked_at)));
    let (ok, json, _) = cli(&["agent", "revoke", "writer", "--reason", "done", "--json"]);
    let json: Value = serde_json::from_str(&json).expect("JSON stays machine-readable");
    assert!(ok && json["revoked_at_ms"].is_u64());
}
