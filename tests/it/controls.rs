//! Spending controls through the HTTP API, on real Redis, with two daemon instances racing.

use futures::future::join_all;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, Agent, AppOptions, TestApp};

const DAY_MS: u64 = 86_400_000;

async fn two_instances() -> (TestApp, TestApp) {
    let first = spawn_app().await;
    let redis = first.redis.clone().expect("redis");
    let clock = first.clock.clone();
    let second = spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), clock, ..Default::default() }).await;
    (first, second)
}

async fn set_controls(app: &TestApp, agent: &str, body: Value) -> Value {
    let (status, shown) = app.admin(Method::PUT, &format!("/v1/agents/{agent}/controls"), Some(body)).await;
    assert_eq!(status, 200, "{shown}");
    shown
}

async fn hold_for(app: &TestApp, agent: &Agent, amount: u64, task: &str, service: &str) -> (u16, Value) {
    app.agent_call(
        &agent.token,
        Method::POST,
        "/v1/holds",
        Some(json!({ "amount_micros": amount, "service": service, "task": task })),
    )
    .await
}

/// Fires every (amount, task) hold at once, alternating between the two instances.
async fn race(apps: [&TestApp; 2], agent: &Agent, holds: &[(u64, &str)]) -> Vec<(u64, u16, Value)> {
    join_all(holds.iter().enumerate().map(|(i, &(amount, task))| async move {
        let (status, body) = hold_for(apps[i % 2], agent, amount, task, "api.example.com").await;
        (amount, status, body)
    }))
    .await
}

fn seeded() -> rand::rngs::StdRng {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daily_limit_holds_under_150_racing_holds_on_two_instances() {
    let mut rng = seeded();
    let (a, b) = two_instances().await;
    let agent = a.create_agent("daily-racer", 100_000_000, None).await;
    let limit = 500_000;
    set_controls(&a, "daily-racer", json!({ "limits": { "daily": limit }, "breaker": null })).await;
    let holds: Vec<(u64, &str)> = (0..150).map(|_| (rng.gen_range(1..=10_000), "t")).collect();
    let outcomes = race([&a, &b], &agent, &holds).await;
    let granted: u64 = outcomes.iter().filter(|o| o.1 == 201).map(|o| o.0).sum();
    assert!(granted <= limit, "granted {granted} over the daily limit {limit}");
    for (amount, status, body) in &outcomes {
        if *status == 402 {
            assert_eq!(body["code"], "daily_limit_exceeded", "{body}");
            assert!(*amount > limit - granted, "false refusal of {amount} with {} left", limit - granted);
        } else {
            assert_eq!(*status, 201, "{body}");
        }
    }
    assert!(outcomes.iter().any(|o| o.1 == 402), "the race reached the limit");
    let (status, periods) = a.admin(Method::GET, "/v1/agents/daily-racer/periods", None).await;
    assert_eq!(status, 200);
    assert_eq!(periods["periods"][0]["period"], "daily");
    assert_eq!(periods["periods"][0]["held_micros"], granted);
    assert_eq!(periods["periods"][0]["limit_micros"], limit);
    assert_eq!(a.show(&agent.id).await["held_micros"], granted, "the agent holds exactly what was granted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_task_cap_holds_under_a_race_and_other_tasks_are_unaffected() {
    let mut rng = seeded();
    let (a, b) = two_instances().await;
    let agent = a.create_agent("tasker", 100_000_000, None).await;
    let cap = 1_500_000;
    set_controls(&a, "tasker", json!({ "task_cap_micros": cap, "breaker": null })).await;
    let holds: Vec<(u64, &str)> =
        (0..120).map(|i| (rng.gen_range(1..=40_000), if i % 3 == 0 { "other" } else { "research-7" })).collect();
    let outcomes = race([&a, &b], &agent, &holds).await;
    for task in ["research-7", "other"] {
        let granted: u64 =
            outcomes.iter().zip(&holds).filter(|(o, h)| o.1 == 201 && h.1 == task).map(|(o, _)| o.0).sum();
        assert!(granted <= cap, "{task}: {granted} over the per-task cap");
        for ((amount, status, body), _) in outcomes.iter().zip(&holds).filter(|(_, h)| h.1 == task) {
            if *status == 402 {
                assert_eq!(body["code"], "task_cap_exceeded");
                assert!(*amount > cap - granted, "false refusal for {task}");
            }
        }
    }
    // Boundary, sequentially, on a fresh task: limit - 1, then +2 refused, then +1.
    assert_eq!(hold_for(&a, &agent, cap - 1, "fresh", "s").await.0, 201);
    let (status, body) = hold_for(&b, &agent, 2, "fresh", "s").await;
    assert_eq!(
        (status, body["code"].as_str(), body["remaining_micros"].as_u64()),
        (402, Some("task_cap_exceeded"), Some(1))
    );
    assert_eq!(hold_for(&a, &agent, 1, "fresh", "s").await.0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sub_agent_for_a_task_spends_only_what_remains_of_it() {
    let app = spawn_app().await;
    let parent = app.create_agent("lead", 10_000_000, None).await;
    set_controls(&app, "lead", json!({ "task_cap_micros": 1_500_000 })).await;
    assert_eq!(hold_for(&app, &parent, 1_000_000, "research-7", "s").await.0, 201);
    let (status, created) = app
        .admin(
            Method::POST,
            "/v1/agents",
            Some(json!({ "handle": "lead-sub", "cap_micros": 5_000_000, "parent": "lead", "task": "research-7" })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["agent"]["task_of"], "research-7");
    let sub = Agent {
        id: created["agent"]["id"].as_str().expect("id").into(),
        token: created["token"].as_str().expect("token").into(),
        tree: created["agent"]["tree"].as_str().expect("tree").into(),
    };
    let (status, body) = hold_for(&app, &sub, 500_001, "subtask", "s").await;
    assert_eq!(
        (status, body["code"].as_str(), body["remaining_micros"].as_u64()),
        (402, Some("task_cap_exceeded"), Some(500_000))
    );
    assert_eq!(hold_for(&app, &sub, 500_000, "subtask", "s").await.0, 201);
    // A task without a parent is refused.
    let (status, body) =
        app.admin(Method::POST, "/v1/agents", Some(json!({ "handle": "orphan", "cap_micros": 1, "task": "x" }))).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("invalid_task")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_velocity_breaker_suspends_at_exactly_its_threshold_under_a_race() {
    let (a, b) = two_instances().await;
    let agent = a.create_agent("looper", 100_000_000, None).await;
    set_controls(&a, "looper", json!({ "breaker": { "max_holds": 50, "window_secs": 3600 } })).await;
    // Distinct amounts: this is the hold-count rule, not the repeat rule.
    let holds: Vec<(u64, &str)> = (0..150).map(|i| (1_000 + i, "t")).collect();
    let outcomes = race([&a, &b], &agent, &holds).await;
    assert_eq!(outcomes.iter().filter(|o| o.1 == 201).count(), 50, "exactly the threshold was held");
    for (_, status, body) in outcomes.iter().filter(|o| o.1 != 201) {
        assert_eq!((*status, body["code"].as_str()), (402, Some("agent_suspended")), "{body}");
    }
    let shown = a.show(&agent.id).await;
    assert_eq!(shown["suspended"], "velocity");
    let log: Vec<Value> = a.log().await.into_iter().filter(|e| e["agent"] == agent.id.as_str()).collect();
    let at = log.iter().position(|e| e["event"] == "suspend").expect("suspension logged");
    assert_eq!(log.iter().filter(|e| e["event"] == "suspend").count(), 1);
    assert_eq!(log[at]["reason"], "velocity");
    assert!(log[at..].iter().all(|e| e["event"] != "hold"), "nothing is held after the suspension");
    assert_eq!(log[..at].iter().filter(|e| e["event"] == "hold").count(), 50);

    // An admin reinstates it (on the other instance), and it can pay again at once.
    let (status, body) = b.admin(Method::POST, "/v1/agents/looper/reinstate", None).await;
    assert_eq!((status, body["was_suspended"].as_str()), (200, Some("velocity")));
    assert_eq!(hold_for(&a, &agent, 1, "t", "s").await.0, 201);
    assert!(a.log().await.iter().any(|e| e["event"] == "reinstate" && e["agent"] == agent.id.as_str()));
}

#[tokio::test]
async fn a_stuck_loop_paying_the_same_cent_is_suspended_after_the_threshold() {
    let app = spawn_app().await;
    let agent = app.create_agent("stuck", 100_000_000, None).await;
    set_controls(&app, "stuck", json!({ "breaker": { "max_repeats": 20 } })).await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(hold_for(&app, &agent, 10_000, "loop", "api.weather.example").await);
    }
    assert!(statuses[..20].iter().all(|(s, _)| *s == 201), "20 identical payments pass");
    for (status, body) in &statuses[20..] {
        assert_eq!((*status, body["code"].as_str()), (402, Some("agent_suspended")));
    }
    let shown = app.show(&agent.id).await;
    assert_eq!((shown["suspended"].as_str(), shown["held_micros"].as_u64()), (Some("repeat"), Some(200_000)));
    let log = app.log().await;
    let suspend = log.iter().find(|e| e["event"] == "suspend").expect("logged");
    assert_eq!(
        (suspend["reason"].as_str(), suspend["service"].as_str()),
        (Some("repeat"), Some("api.weather.example"))
    );
    // The default breaker is on for agents created through the API.
    let fresh = app.create_agent("fresh", 1_000, None).await;
    let (_, controls) = app.admin(Method::GET, &format!("/v1/agents/{}/controls", fresh.id), None).await;
    assert_eq!(
        controls["breaker"],
        json!({"max_holds": 600, "window_secs": 60, "max_spend_micros": null, "spend_window_secs": null, "max_repeats": 100})
    );
    assert_eq!(controls["alerts"], json!([50, 80, 100]));
}

#[tokio::test]
async fn periods_roll_over_at_utc_midnight_with_no_job_running() {
    let app = spawn_app().await;
    // Move the injected clock to 10 s before the next UTC midnight.
    let now = app.clock.now_ms();
    let midnight = (now / DAY_MS + 1) * DAY_MS;
    app.clock.advance_ms((midnight - 10_000 - now) as i64);
    let agent = app.create_agent("roller", 10_000_000, None).await;
    set_controls(&app, "roller", json!({ "limits": { "daily": 1_000_000, "monthly": 5_000_000 } })).await;
    let (status, held) = hold_for(&app, &agent, 999_999, "t", "a").await;
    assert_eq!(status, 201);
    let (status, body) = hold_for(&app, &agent, 2, "t", "b").await;
    assert_eq!((status, body["code"].as_str()), (402, Some("daily_limit_exceeded")));
    assert_eq!(hold_for(&app, &agent, 1, "t", "c").await.0, 201);
    let (status, _) = app.settle(&agent, held["hold_id"].as_str().expect("id"), 999_999).await;
    assert_eq!(status, 200);
    // Nothing runs at midnight (no sweeper in tests): the next hold just falls in the new day.
    app.clock.advance_ms(10_000);
    let (status, body) = hold_for(&app, &agent, 1_000_000, "t", "d").await;
    assert_eq!(status, 201, "yesterday's spend does not count today: {body}");
    let (_, periods) = app.admin(Method::GET, "/v1/agents/roller/periods", None).await;
    let daily: Vec<&Value> =
        periods["periods"].as_array().expect("list").iter().filter(|p| p["period"] == "daily").collect();
    assert_eq!(daily.len(), 2, "{periods}");
    assert_eq!((daily[0]["start_ms"].as_u64(), daily[0]["current"].as_bool()), (Some(midnight), Some(true)));
    assert_eq!((daily[1]["spent_micros"].as_u64(), daily[1]["held_micros"].as_u64()), (Some(999_999), Some(1)));
    assert_eq!(daily[1]["end_ms"].as_u64(), Some(midnight), "the old day stays reportable");
}

#[tokio::test]
async fn allow_and_deny_lists_and_expiry_changes_refuse_with_their_codes() {
    let app = spawn_app().await;
    let agent = app.create_agent("lists", 10_000_000, None).await;
    set_controls(
        &app,
        "lists",
        json!({ "services": { "allow": ["*.openai.com", "api.anthropic.com"], "deny": ["bad.openai.com"] },
                "protocols": { "allow": ["generic", "x402"] } }),
    )
    .await;
    assert_eq!(hold_for(&app, &agent, 1, "t", "api.openai.com").await.0, 201);
    assert_eq!(hold_for(&app, &agent, 1, "t", "API.Anthropic.com").await.0, 201);
    for service in ["bad.openai.com", "example.com"] {
        let (status, body) = hold_for(&app, &agent, 1, "t", service).await;
        assert_eq!(
            (status, body["code"].as_str(), body["limited_by"].as_str()),
            (402, Some("service_denied"), Some(agent.id.as_str()))
        );
    }
    // Expiry changed through the API: refused with agent_expired from then on, until lifted.
    let (status, shown) = app.admin(Method::PUT, "/v1/agents/lists/expiry", Some(json!({ "ttl_secs": 60 }))).await;
    assert_eq!(status, 200, "{shown}");
    app.clock.advance_ms(60_000);
    let (status, body) = hold_for(&app, &agent, 1, "t", "api.openai.com").await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_expired")));
    let (status, _) = app.admin(Method::PUT, "/v1/agents/lists/expiry", Some(json!({ "never": true }))).await;
    assert_eq!(status, 200);
    assert_eq!(hold_for(&app, &agent, 1, "t", "api.openai.com").await.0, 201);
    let (status, body) = app.admin(Method::PUT, "/v1/agents/lists/expiry", Some(json!({ "expires_at_ms": 1 }))).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("invalid_expiry")));
    let events: Vec<String> = app.log().await.iter().map(|e| e["event"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(events.iter().filter(|e| *e == "expiry").count(), 2);
    assert_eq!(events.iter().filter(|e| *e == "controls").count(), 1);
}

#[tokio::test]
async fn bad_configuration_is_refused_with_a_clear_code_and_changes_nothing() {
    let app = spawn_app().await;
    app.create_agent("strict", 10_000_000, None).await;
    let good = set_controls(&app, "strict", json!({ "limits": { "daily": 1_000 }, "alerts": [50, 100] })).await;
    let cases = [
        (json!({ "limits": { "daily": -1 } }), "invalid_limit"),
        (json!({ "limits": { "daily": 1.5 } }), "invalid_limit"),
        (json!({ "task_cap_micros": -5 }), "invalid_limit"),
        (json!({ "limits": { "hourly": 5 } }), "unknown_period"),
        (json!({ "limits": { "daily": 100, "weekly": 50 } }), "inverted_limits"),
        (
            json!({ "breaker": { "max_holds": 10, "window_secs": 60, "max_spend_micros": 5, "spend_window_secs": 120 } }),
            "invalid_window",
        ),
        (json!({ "breaker": { "max_holds": 10, "window_secs": 0 } }), "invalid_window"),
        (json!({ "breaker": { "max_holds": 10, "window_secs": -60 } }), "invalid_window"),
        (json!({ "breaker": { "max_holds": 0, "window_secs": 60 } }), "invalid_breaker"),
        (json!({ "breaker": { "max_holds": 10 } }), "invalid_breaker"),
        (json!({ "protocols": { "deny": ["paypal"] } }), "unknown_protocol"),
        (json!({ "alerts": [80, 50] }), "invalid_threshold"),
        (json!({ "alerts": [0] }), "invalid_threshold"),
        (json!({ "limits": { "daily": "ten" } }), "invalid_controls"),
        (json!({ "colour": "red" }), "invalid_controls"),
    ];
    for (body, code) in cases {
        let (status, answer) = app.admin(Method::PUT, "/v1/agents/strict/controls", Some(body.clone())).await;
        assert_eq!((status, answer["code"].as_str()), (422, Some(code)), "{body} -> {answer}");
        assert!(!answer["detail"].as_str().unwrap_or("").is_empty(), "a clear detail for {body}");
    }
    let (_, now) = app.admin(Method::GET, "/v1/agents/strict/controls", None).await;
    assert_eq!(now, good, "nothing changed");
    let log = app.log().await;
    assert_eq!(log.iter().filter(|e| e["event"] == "controls").count(), 1, "only the good change is logged");
    // The same rules hold at creation: nothing is created.
    let (status, body) = app
        .admin(
            Method::POST,
            "/v1/agents",
            Some(json!({ "handle": "never-made", "cap_micros": 1, "controls": { "limits": { "daily": -1 } } })),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (422, Some("invalid_limit")));
    let (status, _) = app.admin(Method::GET, "/v1/agents/never-made", None).await;
    assert_eq!(status, 404);
}
