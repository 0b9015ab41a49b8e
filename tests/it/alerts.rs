//! Alert webhooks: wiremock receivers, real Redis, two instances, restarts.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::alerts::{verify, AlertConfig, WebhookSecret, SIGNATURE_HEADER};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::support::{spawn_app_with, wait_for, AppOptions, TestApp};

const SECRET: &str = "whsec_test_0123456789abcdef";

pub(crate) fn alert_config(receiver: &MockServer) -> AlertConfig {
    let secret = WebhookSecret::new(SECRET.into()).expect("secret");
    let mut config = AlertConfig::new(&format!("{}/hooks", receiver.uri()), secret).expect("config");
    config.poll_interval = Duration::from_millis(20);
    config.retry_base = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    config.request_timeout = Duration::from_secs(2);
    config
}

pub(crate) async fn app_with_alerts(receiver: &MockServer, shared: Option<&TestApp>) -> TestApp {
    let redis = shared.map(|app| (app.redis.clone().expect("redis"), "sc".to_owned()));
    let clock = shared.map(|app| app.clock.clone()).unwrap_or_default();
    spawn_app_with(AppOptions { redis, clock, alerts: Some(alert_config(receiver)), ..Default::default() }).await
}

/// The alerts the receiver got (every attempt), each checked: its signature verifies with the
/// shared secret and a fresh timestamp, and a tampered body does not.
pub(crate) async fn received(receiver: &MockServer, app: &TestApp) -> Vec<Value> {
    let secret = WebhookSecret::new(SECRET.into()).expect("secret");
    let now = app.clock.now_ms() / 1000;
    let requests: Vec<Request> = receiver.received_requests().await.unwrap_or_default();
    requests
        .iter()
        .map(|r| {
            let header = r.headers.get(SIGNATURE_HEADER).and_then(|h| h.to_str().ok()).expect("signed");
            assert!(verify(&secret, header, &r.body, now, 300), "signature {header} verifies");
            let mut tampered = r.body.clone();
            tampered.push(b' ');
            assert!(!verify(&secret, header, &tampered, now, 300), "a changed body fails");
            serde_json::from_slice(&r.body).expect("JSON alert")
        })
        .collect()
}

async fn count_of(receiver: &MockServer, app: &TestApp, kind: &str) -> usize {
    received(receiver, app).await.iter().filter(|a| a["type"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_threshold_crossing_is_delivered_once_under_racing_holds_on_two_instances() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).and(path("/hooks")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let a = app_with_alerts(&receiver, None).await;
    let b = app_with_alerts(&receiver, Some(&a)).await;
    let agent = a.create_agent("crosser", 1_000_000, None).await;
    // 100 racing holds of 1 % each, on both instances: the cap is used exactly, crossing 50, 80
    // and 100 % once each (the default thresholds), whatever the interleaving.
    let results = join_all((0..100).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let agent = &agent;
        async move { app.hold(agent, 10_000).await.0 }
    }))
    .await;
    assert!(results.iter().all(|s| *s == 201));
    wait_for("three threshold alerts", Duration::from_secs(10), || async {
        count_of(&receiver, &a, "threshold.crossed").await >= 3
    })
    .await;
    // A later alert (the revocation) arrives after any duplicate would have: there is none.
    let (status, _) = a.admin(Method::POST, "/v1/agents/crosser/revoke", Some(json!({"reason": "done"}))).await;
    assert_eq!(status, 200);
    wait_for("the revocation alert", Duration::from_secs(10), || async {
        count_of(&receiver, &a, "agent.revoked").await == 1
    })
    .await;
    let alerts = received(&receiver, &a).await;
    let mut crossings: Vec<(u64, u64, u64)> = alerts
        .iter()
        .filter(|x| x["type"] == "threshold.crossed")
        .map(|x| {
            let d = &x["data"];
            (
                d["percent"].as_u64().expect("p"),
                d["used_micros"].as_u64().expect("u"),
                d["limit_micros"].as_u64().expect("l"),
            )
        })
        .collect();
    crossings.sort();
    assert_eq!(crossings, [(50, 500_000, 1_000_000), (80, 800_000, 1_000_000), (100, 1_000_000, 1_000_000)]);
    let ids: std::collections::BTreeSet<&str> = alerts.iter().filter_map(|x| x["id"].as_str()).collect();
    assert_eq!(ids.len(), alerts.len(), "no alert was delivered twice");
    let revoked = alerts.iter().find(|x| x["type"] == "agent.revoked").expect("revoked");
    assert_eq!(
        (revoked["agent"].as_str(), revoked["data"]["reason"].as_str()),
        (Some(agent.id.as_str()), Some("done"))
    );
}

#[tokio::test]
async fn a_receiver_that_answers_500_gets_the_alert_again_until_it_takes_it() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&receiver)
        .await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).with_priority(2).mount(&receiver).await;
    let app = app_with_alerts(&receiver, None).await;
    let agent = app.create_agent("refused", 100, None).await;
    let (status, _) = app.hold(&agent, 101).await;
    assert_eq!(status, 402);
    wait_for("the refusal alert to be accepted", Duration::from_secs(10), || async {
        receiver.received_requests().await.unwrap_or_default().len() >= 3
    })
    .await;
    let alerts = received(&receiver, &app).await;
    assert_eq!(alerts.len(), 3, "two refused attempts, then one accepted: {alerts:?}");
    assert!(alerts.iter().all(|x| x["id"] == alerts[0]["id"] && x["type"] == "payment.refused"));
    assert_eq!(alerts[0]["data"]["reason"], "cap_exceeded");
    assert_eq!(alerts[0]["data"]["requested_micros"], 101);
    assert_eq!(alerts[0]["data"]["remaining_micros"], 100);
    // Accepted means acknowledged: nothing is left pending in the group.
    let redis = app.redis.clone().expect("redis");
    let key = format!("sc:{{{}}}:log", agent.tree);
    wait_for("the acknowledgement", Duration::from_secs(5), || async {
        redis.cli(&["XPENDING", &key, "alerts"]).is_some_and(|out| out.lines().next() == Some("0"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_receiver_never_blocks_payments() {
    let receiver = MockServer::start().await;
    // Answers nothing for a minute: every delivery attempt hangs until its timeout.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .mount(&receiver)
        .await;
    let app = app_with_alerts(&receiver, None).await;
    let agent = app.create_agent("busy", 1_000, None).await;
    let started = std::time::Instant::now();
    // 200 payments, half of them refusals (each one an alert).
    let results = join_all((0..200).map(|i| {
        let (app, agent) = (&app, &agent);
        async move { app.hold(agent, if i % 2 == 0 { 5 } else { 5_000 }).await.0 }
    }))
    .await;
    assert_eq!(results.iter().filter(|s| **s == 201).count(), 100);
    assert_eq!(results.iter().filter(|s| **s == 402).count(), 100);
    wait_for("deliveries to be attempted", Duration::from_secs(10), || async {
        !receiver.received_requests().await.unwrap_or_default().is_empty()
    })
    .await;
    let (status, _) = app.hold(&agent, 1).await;
    assert_eq!(status, 201, "payments go on while every alert is stuck");
    assert!(started.elapsed() < Duration::from_secs(30), "payments never waited for the receiver");
}

#[tokio::test]
async fn alerts_survive_a_daemon_restart_and_a_suspension_is_alerted() {
    let receiver = MockServer::start().await;
    let down = Mock::given(method("POST")).respond_with(ResponseTemplate::new(503)).mount_as_scoped(&receiver).await;
    let first = app_with_alerts(&receiver, None).await;
    let agent = first.create_agent("looping", 1_000_000, None).await;
    let (status, _) = first
        .admin(Method::PUT, "/v1/agents/looping/controls", Some(json!({"breaker": {"max_repeats": 3}, "alerts": null})))
        .await;
    assert_eq!(status, 200);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(first.hold(&agent, 10_000).await.0);
    }
    assert_eq!(codes, [201, 201, 201, 402, 402]);
    wait_for("the receiver to refuse the suspension alert", Duration::from_secs(10), || async {
        received(&receiver, &first).await.iter().any(|x| x["type"] == "agent.suspended")
    })
    .await;
    // The daemon stops with the alerts unacknowledged; the receiver recovers; a new instance
    // (another consumer) takes the abandoned alerts over.
    let redis = first.redis.clone().expect("redis");
    let clock = first.clock.clone();
    drop(first);
    drop(down);
    receiver.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let mut config = alert_config(&receiver);
    config.claim_idle = Duration::from_millis(300);
    let second = spawn_app_with(AppOptions {
        redis: Some((redis, "sc".into())),
        clock,
        alerts: Some(config),
        ..Default::default()
    })
    .await;
    wait_for("the suspension alert after the restart", Duration::from_secs(15), || async {
        received(&receiver, &second).await.iter().any(|x| x["type"] == "agent.suspended")
    })
    .await;
    let alerts = received(&receiver, &second).await;
    let suspended = alerts.iter().find(|x| x["type"] == "agent.suspended").expect("suspended");
    assert_eq!(suspended["agent"], agent.id.as_str());
    assert_eq!(suspended["data"]["reason"], "repeat");
    assert_eq!(suspended["data"]["rule"], json!({"rule": "repeat", "max_repeats": 3}));
    wait_for("both refusals too", Duration::from_secs(15), || async {
        received(&receiver, &second).await.iter().filter(|x| x["type"] == "payment.refused").count() >= 2
    })
    .await;
    let refusals: Vec<Value> =
        received(&receiver, &second).await.into_iter().filter(|x| x["type"] == "payment.refused").collect();
    assert!(refusals.iter().all(|x| x["data"]["reason"] == "agent_suspended"));
    assert_eq!(second.show(&agent.id).await["held_micros"], 30_000, "nothing was held after the suspension");
}
