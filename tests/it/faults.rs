//! Faults: the daemon fails closed while Redis is down and recovers by itself.

use std::time::Duration;

use crate::support::{spawn_app, wait_for};

#[tokio::test]
async fn a_dead_redis_means_refusals_not_unrecorded_payments() {
    let app = spawn_app().await;
    let agent = app.create_agent("fail-closed", 1_000_000, None).await;
    let (status, _) = app.hold(&agent, 10).await;
    assert_eq!(status, 201);
    let redis = app.redis.clone().expect("redis");
    redis.kill();
    // The daemon's connection dropped: Redis may have been running a call on it, so the first
    // answer may be `ledger_outcome_unknown`; once the connection is refused, nothing can have
    // run, and the answer is `ledger_unavailable`.
    let (status, body) = app.hold(&agent, 10).await;
    assert_eq!(status, 503, "{body}");
    assert!(["ledger_unavailable", "ledger_outcome_unknown"].contains(&body["code"].as_str().unwrap_or("")), "{body}");
    let (status, body) = app.hold(&agent, 10).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("ledger_unavailable")), "{body}");
    let health = app.http.get(app.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 503);

    // Redis comes back empty (no persistence in this test): the library is loaded again and
    // the daemon serves without a restart.
    redis.restart();
    wait_for("the daemon to reconnect", Duration::from_secs(15), || async {
        app.http.get(app.url("/healthz")).send().await.map(|r| r.status() == 200).unwrap_or(false)
    })
    .await;
    let fresh = app.create_agent("after-restart", 1_000, None).await;
    let (status, body) = app.hold(&fresh, 10).await;
    assert_eq!(status, 201, "{body}");
}
