//! Races: two daemon instances on one Redis, hundreds of concurrent holds, one cap.

use std::sync::Arc;

use futures::future::join_all;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, Agent, AppOptions, TestApp};

struct Outcome {
    amount: u64,
    status: u16,
    body: Value,
}

/// Sends every (agent index, amount) hold at once, alternating between the two instances.
async fn storm(apps: &[&TestApp; 2], agents: &[Agent], holds: &[(usize, u64)]) -> Vec<Outcome> {
    let requests = holds.iter().enumerate().map(|(i, &(agent, amount))| {
        let app = apps[i % 2];
        let agent = &agents[agent];
        async move {
            let (status, body) = app.hold(agent, amount).await;
            Outcome { amount, status, body }
        }
    });
    join_all(requests).await
}

async fn figures(app: &TestApp, agent: &Agent) -> (u64, u64, u64) {
    let shown = app.show(&agent.id).await;
    let get = |k: &str| shown[k].as_u64().expect("number");
    (get("cap_micros"), get("spent_micros"), get("held_micros"))
}

async fn two_instances() -> (TestApp, TestApp) {
    let first = spawn_app().await;
    let redis = first.redis.clone().expect("redis");
    let second = spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), ..Default::default() }).await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_holds_never_pass_the_cap_and_never_refuse_falsely() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (a, b) = two_instances().await;
    let cap = 1_000_000;
    let agent = a.create_agent("racer", cap, None).await;
    let holds: Vec<(usize, u64)> = (0..250).map(|_| (0, rng.gen_range(1..=20_000))).collect();
    let outcomes = storm(&[&a, &b], std::slice::from_ref(&agent), &holds).await;

    let granted: u64 = outcomes.iter().filter(|o| o.status == 201).map(|o| o.amount).sum();
    let (_, spent, held) = figures(&a, &agent).await;
    assert_eq!((spent, held), (0, granted), "the ledger holds exactly what was granted");
    assert!(granted <= cap, "granted {granted} > cap {cap} (seed {seed})");
    assert!(outcomes.iter().all(|o| o.status == 201 || o.status == 402), "only grants and refusals");
    // Held only grows in this test, so a refusal was false iff it would fit even now.
    let headroom = cap - granted;
    for refused in outcomes.iter().filter(|o| o.status == 402) {
        assert_eq!(refused.body["code"], "cap_exceeded");
        assert!(refused.amount > headroom, "false refusal of {} with {headroom} free (seed {seed})", refused.amount);
        assert!(refused.body["remaining_micros"].as_u64().expect("remaining") < refused.amount);
    }
    assert!(outcomes.iter().any(|o| o.status == 402), "the storm was big enough to hit the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_cap_shared_by_children_holds_under_a_race() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (a, b) = two_instances().await;
    let parent_cap = 1_000_000;
    let parent = a.create_agent("orchestrator", parent_cap, None).await;
    let mut children = Vec::new();
    for i in 0..5 {
        children.push(a.create_agent(&format!("worker-{i}"), 400_000, Some("orchestrator")).await);
    }
    let holds: Vec<(usize, u64)> = (0..250).map(|_| (rng.gen_range(0..5), rng.gen_range(1..=20_000))).collect();
    let outcomes = storm(&[&a, &b], &children, &holds).await;

    let mut granted_per_child = [0u64; 5];
    for (outcome, &(child, _)) in outcomes.iter().zip(&holds) {
        if outcome.status == 201 {
            granted_per_child[child] += outcome.amount;
        }
    }
    let total: u64 = granted_per_child.iter().sum();
    assert!(total <= parent_cap, "children got {total} under a {parent_cap} parent cap (seed {seed})");
    assert_eq!(figures(&a, &parent).await.2, total, "the parent holds the sum of its children");
    for (i, child) in children.iter().enumerate() {
        let (cap, _, held) = figures(&a, child).await;
        assert_eq!(held, granted_per_child[i]);
        assert!(held <= cap);
    }
    // No false refusals: each refused hold must exceed the child's or the parent's headroom now.
    for (outcome, &(child, amount)) in outcomes.iter().zip(&holds) {
        if outcome.status == 402 {
            let child_room = 400_000 - granted_per_child[child];
            let parent_room = parent_cap - total;
            assert!(amount > child_room.min(parent_room), "false refusal (seed {seed})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_sent_fifty_times_at_once_debits_once() {
    let (a, b) = two_instances().await;
    let agent = Arc::new(a.create_agent("idempotent", 1_000_000, None).await);
    let body = json!({ "amount_micros": 7_000, "service": "api.example.com", "task": "t" });
    let requests = (0..50).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let agent = agent.clone();
        let body = body.clone();
        async move {
            let response = app
                .http
                .request(Method::POST, app.url("/v1/holds"))
                .bearer_auth(&agent.token)
                .header("Idempotency-Key", "purchase-1")
                .json(&body)
                .send()
                .await
                .expect("request");
            (response.status().as_u16(), response.json::<Value>().await.expect("json"))
        }
    });
    let results = join_all(requests).await;
    let first = results.iter().find(|(_, b)| b["replayed"] == false).expect("one request created the hold");
    let hold_id = first.1["hold_id"].clone();
    assert_eq!(results.iter().filter(|(_, b)| b["replayed"] == false).count(), 1, "exactly one creation");
    for (status, body) in &results {
        // A replay answers with the first answer's status.
        assert_eq!(*status, 201, "{body}");
        assert_eq!(body["hold_id"], hold_id, "every answer is the first result");
    }
    assert_eq!(figures(&a, &agent).await.2, 7_000, "debited once");
    let holds = a.log().await.into_iter().filter(|e| e["event"] == "hold").count();
    assert_eq!(holds, 1);
    // The same key with another body is a conflict, and changes nothing.
    let response = a
        .http
        .post(a.url("/v1/holds"))
        .bearer_auth(&agent.token)
        .header("Idempotency-Key", "purchase-1")
        .json(&json!({ "amount_micros": 7_001, "service": "api.example.com", "task": "t" }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 422);
    assert_eq!(response.json::<Value>().await.expect("json")["code"], "idempotency_conflict");
    assert_eq!(figures(&a, &agent).await.2, 7_000);
}
