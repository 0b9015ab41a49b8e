//! `/metrics` parses as the Prometheus text format and its counters match the ledger's log
//! after a scripted run.

use std::collections::HashMap;

use prometheus_parse::{Scrape, Value as Metric};
use reqwest::Method;
use serde_json::json;

use crate::support::{spawn_app, TestApp, ADMIN_TOKEN};

pub(crate) async fn scrape_metrics(app: &TestApp) -> Scrape {
    let response = app.http.get(app.url("/metrics")).bearer_auth(ADMIN_TOKEN).send().await.expect("metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of a counter with exactly these labels (0 when absent: Prometheus omits unused series).
pub(crate) fn counter(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> u64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Untyped(v) => v as u64,
            _ => panic!("{name} is not a counter"),
        })
        .sum()
}

#[tokio::test]
async fn metrics_match_the_ledger_after_a_scripted_run() {
    let app = spawn_app().await;
    let a = app.create_agent("metered", 1_000_000, None).await;
    let b = app.create_agent("doomed", 1_000_000, None).await;
    let hold = |amount: u64| {
        app.agent_call(
            &a.token,
            Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": amount, "service": "api.example.com", "task": "m" })),
        )
    };
    let (_, h1) = hold(300_000).await;
    app.settle(&a, h1["hold_id"].as_str().expect("id"), 250_000).await;
    let (_, h2) = hold(200_000).await;
    let (status, _) = app
        .agent_call(
            &a.token,
            Method::POST,
            &format!("/v1/holds/{}/void", h2["hold_id"].as_str().expect("id")),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, h3) = hold(400_000).await;
    app.settle(&a, h3["hold_id"].as_str().expect("id"), 400_000).await;
    // 650000 spent: 500000 more is over the cap.
    let (status, _) = hold(500_000).await;
    assert_eq!(status, 402);
    // An idempotent replay is the same hold, counted once.
    for _ in 0..2 {
        let (status, _) = app
            .http
            .post(app.url("/v1/holds"))
            .bearer_auth(&a.token)
            .header("Idempotency-Key", "k1")
            .json(&json!({ "amount_micros": 10_000, "service": "api.example.com" }))
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .expect("hold");
        assert!(status == 201 || status == 200);
    }
    let (status, _) =
        app.admin(Method::POST, &format!("/v1/agents/{}/revoke", b.id), Some(json!({ "reason": "test" }))).await;
    assert_eq!(status, 200);
    let (status, _) = app.hold(&b, 1_000).await;
    assert_eq!(status, 402);

    // What the ledger says happened.
    let log = app.log().await;
    let count = |event: &str| log.iter().filter(|e| e["event"] == event).count() as u64;
    let mut refusals: HashMap<String, u64> = HashMap::new();
    for e in log.iter().filter(|e| e["event"] == "refuse") {
        *refusals.entry(e["reason"].as_str().expect("reason").to_owned()).or_default() += 1;
    }
    let spent: u64 = log.iter().filter(|e| e["event"] == "settle").map(|e| e["amount"].as_u64().expect("amount")).sum();

    let scrape = scrape_metrics(&app).await;
    let generic = [("protocol", "generic")];
    assert_eq!(counter(&scrape, "spendcap_holds_total", &generic), count("hold"));
    assert_eq!(count("hold"), 4);
    assert_eq!(counter(&scrape, "spendcap_settles_total", &generic), count("settle"));
    assert_eq!(counter(&scrape, "spendcap_voids_total", &[]), count("void"));
    // Both receipts were signed ahead and linked by the settle itself: the tree's first too,
    // since the daemon, knowing no chain head yet, asked its hold for it.
    assert_eq!(counter(&scrape, "spendcap_settle_linked_receipts_total", &[]), 2);
    assert_eq!(counter(&scrape, "spendcap_spend_micros_total", &generic), spent);
    assert_eq!(spent, 650_000);
    assert_eq!(refusals.len(), 2);
    for (reason, n) in &refusals {
        assert_eq!(counter(&scrape, "spendcap_refusals_total", &[("reason", reason), ("protocol", "generic")]), *n);
    }
    assert_eq!(counter(&scrape, "spendcap_ledger_errors_total", &[]), 0);
    // Every decided hold (granted, refused or replayed) was timed.
    let timed = scrape
        .samples
        .iter()
        .find_map(|s| match (&s.value, s.metric.as_str()) {
            (Metric::Histogram(buckets), "spendcap_hold_duration_seconds") => {
                buckets.iter().find(|b| b.less_than.is_infinite()).map(|b| b.count as u64)
            }
            _ => None,
        })
        .expect("hold latency histogram");
    assert_eq!(timed, 7);

    // The ledger going away is a ledger error (and a 503, nothing paid).
    app.redis.as_ref().expect("redis").kill();
    let (status, body) = hold(1_000).await;
    assert_eq!(status, 503);
    let code = body["code"].as_str().expect("code").to_owned();
    let scrape = scrape_metrics(&app).await;
    assert_eq!(counter(&scrape, "spendcap_ledger_errors_total", &[("code", &code)]), 1);

    // Metrics need the admin token.
    let response = app.http.get(app.url("/metrics")).bearer_auth(&a.token).send().await.expect("metrics");
    assert_eq!(response.status(), 403);
}
