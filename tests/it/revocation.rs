//! Revocation: during a storm of holds, across instances, and from redis-cli.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, AppOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_hold_is_granted_after_the_revoke_call_returned() {
    let a = Arc::new(spawn_app().await);
    let redis = a.redis.clone().expect("redis");
    let b = Arc::new(spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), ..Default::default() }).await);
    let parent = a.create_agent("storm-parent", 1_000_000_000, None).await;
    let child = Arc::new(a.create_agent("storm-child", 1_000_000_000, Some("storm-parent")).await);
    // This storm is a runaway loop by design (identical payments, as fast as possible): turn the
    // breaker off, so that revocation is what stops it.
    for handle in ["storm-parent", "storm-child"] {
        let (status, body) =
            a.admin(Method::PUT, &format!("/v1/agents/{handle}/controls"), Some(json!({"breaker": null}))).await;
        assert_eq!(status, 200, "{body}");
    }
    let parent = Arc::new(parent);
    let revoked = Arc::new(AtomicBool::new(false));

    // 16 workers hold in a loop on both instances, for both agents, until well after the revoke.
    let mut workers = Vec::new();
    for w in 0..16 {
        let app = if w % 2 == 0 { a.clone() } else { b.clone() };
        let agent = if w % 3 == 0 { parent.clone() } else { child.clone() };
        let revoked = revoked.clone();
        workers.push(tokio::spawn(async move {
            let mut after_revoke = Vec::new();
            let mut granted_before = 0;
            let mut stop_at: Option<Instant> = None;
            loop {
                let sent_after_revoke = revoked.load(Ordering::SeqCst);
                let (status, body) = app.hold(&agent, 1).await;
                if sent_after_revoke {
                    after_revoke.push((status, body));
                    let stop = *stop_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(300));
                    if Instant::now() > stop {
                        break;
                    }
                } else if status == 201 {
                    granted_before += 1;
                }
            }
            (granted_before, after_revoke)
        }));
    }
    // Let the storm run, then revoke the parent through the API.
    crate::support::wait_for("the storm to grant holds", Duration::from_secs(10), || {
        let a = a.clone();
        let parent_id = parent.id.clone();
        async move { a.show(&parent_id).await["held_micros"].as_u64().unwrap_or(0) >= 200 }
    })
    .await;
    let (status, _) =
        a.admin(Method::POST, "/v1/agents/storm-parent/revoke", Some(json!({"reason": "storm_test"}))).await;
    assert_eq!(status, 200);
    revoked.store(true, Ordering::SeqCst);

    let mut granted_before = 0;
    let mut checked = 0;
    for worker in workers {
        let (before, after) = worker.await.expect("worker");
        granted_before += before;
        for (status, body) in after {
            assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "hold after revoke: {body}");
            checked += 1;
        }
    }
    assert!(granted_before > 0 && checked > 0, "the storm ran on both sides of the revoke");

    // The stream is the serialization order: no hold of the tree follows the revocation.
    let log: Vec<Value> = a.log().await.into_iter().filter(|e| e["tree"] == parent.tree.as_str()).collect();
    let revoke_at = log.iter().position(|e| e["event"] == "revoke").expect("revocation logged");
    assert_eq!(log[revoke_at]["reason"], "storm_test");
    assert!(log[revoke_at + 1..].iter().all(|e| e["event"] != "hold"), "a hold was granted after the revocation");
    assert!(log[revoke_at + 1..].iter().any(|e| e["event"] == "refuse" && e["reason"] == "agent_revoked"));
}

/// The README's redis-cli command, exactly as written there.
fn readme_revoke_command() -> String {
    let readme = include_str!("../../README.md");
    let marker = readme.find("<!-- revoke-command").expect("README has the revoke command marker");
    let block = &readme[marker..];
    let start = block.find("```sh\n").expect("code block") + "```sh\n".len();
    let end = block[start..].find("\n```").expect("end of block");
    block[start..start + end].trim().to_owned()
}

#[tokio::test]
async fn the_readme_redis_cli_command_revokes_an_agent() {
    let app = spawn_app().await;
    let redis = app.redis.clone().expect("redis");
    let parent = app.create_agent("scripted", 1_000_000, None).await;
    let child = app.create_agent("scripted-child", 1_000_000, Some("scripted")).await;
    let (status, _) = app.hold(&child, 10).await;
    assert_eq!(status, 201);

    let command = readme_revoke_command();
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("AGENT", &parent.id)
        .output()
        .expect("sh runs");
    assert!(output.status.success(), "{command}: {}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("ok") && printed.contains("revoked_at"), "redis-cli printed {printed}");

    for agent in [&parent, &child] {
        let (status, body) = app.hold(agent, 1).await;
        assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");
    }
    let log = app.log().await;
    let revocation = log.iter().find(|e| e["event"] == "revoke").expect("revocation logged");
    assert_eq!(revocation["agent"], parent.id.as_str());
    assert_eq!(revocation["reason"], "runaway_loop");
    let now = app.clock.now_ms();
    let at = revocation["ts_ms"].as_u64().expect("timestamp");
    assert!(at <= now && now - at < 60_000, "timestamp {at} is the server's time");
    assert_eq!(app.show(&parent.id).await["revoked"], "runaway_loop");
}
