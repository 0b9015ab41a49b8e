//! Holds whose outcome is unknown: visible to their agent and the admin, counted until an admin
//! resolves them (issue 13), over the HTTP API and the CLI.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, TestApp, ADMIN_TOKEN};

/// Marks a hold unknown the way an orchestration script can: the documented Redis function.
fn mark_unknown(app: &TestApp, hold: &str, reason: &str) {
    let redis = app.redis.clone().expect("redis");
    let tree = hold.split('_').nth(1).expect("hold id carries its tree");
    let now = app.clock.now_ms().to_string();
    let reply = redis
        .cli(&["FCALL", "spendcap_mark_unknown", "1", &format!("sc:{{{tree}}}"), &now, hold, reason])
        .expect("redis-cli answers");
    assert!(reply.starts_with("ok"), "{reply}");
}

/// The README's `spendcap holds` lines, exactly as written there.
fn readme_holds_commands() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let marker = readme.find("<!-- holds-commands").expect("README has the holds commands marker");
    let block = &readme[marker..];
    let start = block.find("```sh\n").expect("code block") + "```sh\n".len();
    let end = block[start..].find("\n```").expect("end of block");
    block[start..start + end].lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn unknown_holds_are_visible_counted_and_resolved_by_an_admin_only() {
    let app = spawn_app().await;
    let agent = app.create_agent("unsure", 1_000, None).await;
    let other = app.create_agent("bystander", 1_000, None).await;
    let (_, lost) = app.hold(&agent, 300).await;
    let lost = lost["hold_id"].as_str().expect("hold").to_owned();
    let (_, open) = app.hold(&agent, 200).await;
    let open = open["hold_id"].as_str().expect("hold").to_owned();
    let (_, theirs) = app.hold(&other, 100).await;
    mark_unknown(&app, &lost, "no answer to the paid retry");
    mark_unknown(&app, theirs["hold_id"].as_str().expect("hold"), "lost too");

    let (status, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (me["held_micros"].as_u64(), me["unknown_micros"].as_u64(), me["unknown_holds"].as_u64()),
        (Some(500), Some(300), Some(1)),
        "{me}"
    );
    // The agent sees its own only; another agent's token cannot list it.
    let (status, mine) = app.agent_call(&agent.token, Method::GET, "/v1/holds?state=unknown", None).await;
    assert_eq!(status, 200, "{mine}");
    let listed = mine["holds"].as_array().expect("holds");
    assert_eq!(listed.len(), 1, "{mine}");
    assert_eq!(
        (&listed[0]["hold_id"], &listed[0]["agent_id"], &listed[0]["amount_micros"], &listed[0]["reason"]),
        (&json!(lost), &json!(agent.id), &json!(300), &json!("no answer to the paid retry"))
    );
    assert_eq!(
        (&listed[0]["protocol"], &listed[0]["service"], &listed[0]["task"]),
        (&json!("generic"), &json!("api.example.com"), &json!("test"))
    );
    assert!(listed[0]["since_ms"].as_u64().is_some());
    let (status, _) = app.agent_call(&other.token, Method::GET, &format!("/v1/holds?agent={}", agent.id), None).await;
    assert_eq!(status, 403);
    // The admin sees every tree, or one agent's.
    let (_, all) = app.admin(Method::GET, "/v1/holds?state=unknown", None).await;
    assert_eq!((all["holds"].as_array().map(Vec::len), all["total_micros"].as_u64()), (Some(2), Some(400)), "{all}");
    let (_, one) = app.admin(Method::GET, "/v1/holds?agent=unsure", None).await;
    assert_eq!(one["holds"].as_array().map(Vec::len), Some(1), "{one}");
    let (_, opened) = app.admin(Method::GET, "/v1/holds?state=open&agent=unsure", None).await;
    assert_eq!(opened["holds"][0]["hold_id"], json!(open), "{opened}");

    // Only an admin resolves, with a reason and, to settle, an amount within the hold.
    let resolve = format!("/v1/holds/{lost}/resolve");
    let body = json!({ "outcome": "settled", "amount_micros": 250, "reason": "tx 0xabc confirmed" });
    let (status, refused) = app.agent_call(&agent.token, Method::POST, &resolve, Some(body.clone())).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("admin_only")));
    for (bad, code) in [
        (json!({ "outcome": "settled", "reason": "x" }), "amount_required"),
        (json!({ "outcome": "settled", "amount_micros": 301, "reason": "x" }), "amount_exceeds_hold"),
        (json!({ "outcome": "voided", "amount_micros": 1, "reason": "x" }), "amount_not_allowed"),
        (json!({ "outcome": "voided", "reason": " " }), "invalid_reason"),
    ] {
        let (status, answer) = app.admin(Method::POST, &resolve, Some(bad)).await;
        assert_eq!((status, answer["code"].as_str()), (422, Some(code)), "{answer}");
    }
    let (status, answer) = app.admin(Method::POST, &format!("/v1/holds/{open}/resolve"), Some(body.clone())).await;
    assert_eq!((status, answer["code"].as_str()), (409, Some("hold_not_unknown")), "an open hold is the flow's");
    assert_eq!(app.show("unsure").await["held_micros"], 500, "bad resolutions changed nothing");

    let (status, resolved) = app.admin(Method::POST, &resolve, Some(body.clone())).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!((resolved["amount_micros"].as_u64(), resolved["released_micros"].as_u64()), (Some(250), Some(50)));
    assert_eq!(resolved["receipt"]["receipt"]["amount_micros"], 250, "a settled resolution has its signed receipt");
    let shown = app.show("unsure").await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(250), Some(200)));
    let (status, again) = app.admin(Method::POST, &resolve, Some(body)).await;
    assert_eq!((status, again["code"].as_str()), (409, Some("hold_not_unknown")));
    let settle = app.log().await.into_iter().find(|e| e["event"] == "settle" && e["hold"] == lost.as_str());
    let detail: Value =
        serde_json::from_str(settle.expect("settle logged")["detail"].as_str().expect("detail")).expect("detail JSON");
    assert_eq!(detail, json!({ "resolved_by": "admin", "outcome": "settled", "reason": "tx 0xabc confirmed" }));
    let (_, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!((me["unknown_micros"].as_u64(), me["unknown_holds"].as_u64()), (Some(0), Some(0)));
}

// The CLI is a blocking child process; the daemon needs other threads to answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_holds_commands_list_and_resolve() {
    let app = spawn_app().await;
    let agent = app.create_agent("cli-unsure", 1_000_000, None).await;
    let (_, held) = app.hold(&agent, 50_000).await;
    let hold = held["hold_id"].as_str().expect("hold").to_owned();
    mark_unknown(&app, &hold, "merchant did not answer");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_spendcap")).parent().expect("bin dir").to_owned();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let commands = readme_holds_commands();
    assert_eq!(commands.len(), 2);
    let run = |line: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(line)
            .env("PATH", &path)
            .env("SPENDCAP_URL", &app.base)
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HOLD", &hold)
            .output()
            .expect("sh runs")
    };
    let listed = run(&commands[0]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let table = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(table.contains(&hold) && table.contains("merchant did not answer") && table.contains("$0.05 "), "{table}");
    let resolved = run(&commands[1]);
    assert!(resolved.status.success(), "{}", String::from_utf8_lossy(&resolved.stderr));
    assert!(String::from_utf8_lossy(&resolved.stdout).contains("settled"));
    let shown = app.show("cli-unsure").await;
    assert_eq!((shown["spent_micros"].as_u64(), shown["held_micros"].as_u64()), (Some(10_000), Some(0)));
    let listed = run(&commands[0]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&hold));
}
