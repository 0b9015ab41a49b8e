//! One clock: the ledger decides hold expiry, agent expiry, periods and windows by Redis's clock,
//! so instances whose clocks differ agree; an instance whose clock is too far off Redis's stops
//! paying and fails its health check until it agrees again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use spendcap::clock::Clock;
use spendcap::ledger::{LedgerClock, RedisConfig};

use crate::support::{spawn_app_with, wait_for, AppOptions, RedisServer, TestApp};

/// An instance on `redis` (namespace `sc`) whose ledger reads Redis's clock, as the binary's does,
/// with its own clock moved by `offset_ms` and the given skew bound.
pub(crate) async fn instance(redis: &Arc<RedisServer>, offset_ms: i64, max_skew: Duration) -> TestApp {
    let clock = Clock::system();
    clock.advance_ms(offset_ms);
    let config = RedisConfig {
        url: redis.url(),
        cluster: false,
        namespace: "sc".into(),
        timeout: Duration::from_secs(2),
        clock: LedgerClock::Redis,
    };
    spawn_app_with(AppOptions {
        redis: Some((redis.clone(), "sc".into())),
        redis_config: Some(config),
        clock,
        max_clock_skew: max_skew,
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn instances_whose_clocks_differ_release_nothing_early_and_grant_no_expired_agent() {
    let redis = Arc::new(RedisServer::start());
    // The skew bound is opened wide here so that the ledger itself is what is tested.
    let hour = Duration::from_secs(3600);
    let correct = instance(&redis, 0, hour).await;
    let ahead = instance(&redis, 120_000, hour).await;
    let behind = instance(&redis, -120_000, hour).await;

    // Twenty live $1 holds for 60 s through the correct instance fill a $20 cap.
    let agent = correct.create_agent("skewed", 20_000_000, None).await;
    for _ in 0..20 {
        let (status, body) = correct
            .agent_call(
                &agent.token,
                reqwest::Method::POST,
                "/v1/holds",
                Some(json!({"amount_micros": 1_000_000, "service": "api.example.com", "ttl_secs": 60})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // The instance 120 s ahead reads the agent and tries to hold more: nothing was released.
    let (status, me) = ahead.agent_call(&agent.token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!((status, me["held_micros"].as_u64()), (200, Some(20_000_000)), "{me}");
    let (status, refused) = ahead.hold(&agent, 5_000_000).await;
    assert_eq!((status, refused["code"].as_str()), (402, Some("cap_exceeded")), "{refused}");
    let (_, me) = correct.agent_call(&agent.token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(me["held_micros"], 20_000_000, "{me}");

    // An agent that expired by Redis's clock gets nothing through the instance 120 s behind.
    let (status, created) = correct
        .admin(
            reqwest::Method::POST,
            "/v1/agents",
            Some(json!({"handle": "brief", "cap_micros": 1_000_000, "ttl_secs": 1})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let brief = crate::support::Agent {
        id: created["agent"]["id"].as_str().expect("id").to_owned(),
        token: created["token"].as_str().expect("token").to_owned(),
        tree: created["agent"]["tree"].as_str().expect("tree").to_owned(),
    };
    wait_for("the agent to expire by Redis's clock", Duration::from_secs(10), || async {
        correct.hold(&brief, 1).await.1["code"] == "agent_expired"
    })
    .await;
    let (status, refused) = behind.hold(&brief, 1).await;
    assert_eq!((status, refused["code"].as_str()), (402, Some("agent_expired")), "{refused}");
}

#[tokio::test]
async fn an_instance_whose_clock_is_too_far_off_stops_paying_until_it_agrees() {
    let redis = Arc::new(RedisServer::start());
    let correct = instance(&redis, 0, Duration::from_secs(2)).await;
    let ahead = instance(&redis, 120_000, Duration::from_secs(2)).await;
    let agent = correct.create_agent("careful", 10_000_000, None).await;

    let health = |app: &TestApp| {
        let request = app.http.get(app.url("/healthz"));
        async move {
            let response = request.send().await.expect("healthz");
            (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    assert_eq!(health(&correct).await.0, 200);
    let (status, body) = health(&ahead).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("clock_skew")), "{body}");
    let (status, body) = ahead.hold(&agent, 1_000_000).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("clock_skew")), "{body}");
    // Nothing reached the ledger: no hold, no log line but the agent's creation.
    let (_, me) = correct.agent_call(&agent.token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(me["held_micros"], 0, "{me}");
    assert_eq!(correct.log().await.len(), 1);

    // Its clock is put right: it pays again after its next measurement.
    ahead.clock.advance_ms(-120_000);
    wait_for("the instance to measure its clock again", Duration::from_secs(15), || async {
        health(&ahead).await.0 == 200
    })
    .await;
    let (status, body) = ahead.hold(&agent, 1_000_000).await;
    assert_eq!(status, 201, "{body}");
}
