//! Task outcomes and the cost report through the API, on both ledgers.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{spawn_app_with, AppOptions, Backend, TestApp, ADMIN_TOKEN};

async fn spend(app: &TestApp, token: &str, task: &str, amount: u64, service: &str) {
    let (status, hold) = app
        .agent_call(
            token,
            Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": amount, "service": service, "task": task })),
        )
        .await;
    assert_eq!(status, 201, "{hold}");
    let hold = hold["hold_id"].as_str().expect("hold id");
    let (status, body) = app
        .agent_call(token, Method::POST, &format!("/v1/holds/{hold}/settle"), Some(json!({ "amount_micros": amount })))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn outcome(app: &TestApp, token: &str, task: &str, body: Value) -> (u16, Value) {
    app.agent_call(token, Method::POST, &format!("/v1/tasks/{task}/outcome"), Some(body)).await
}

#[tokio::test]
async fn outcomes_and_report_through_the_api() {
    for backend in [Backend::Redis, Backend::Memory] {
        let app = spawn_app_with(AppOptions { backend, ..AppOptions::default() }).await;
        let (status, created) = app
            .admin(
                Method::POST,
                "/v1/agents",
                Some(json!({ "handle": "research", "cap_micros": 10_000_000, "controls": { "task_cap_micros": 2_000_000 } })),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        let research = created["token"].as_str().expect("token").to_owned();
        let research_id = created["agent"]["id"].as_str().expect("id").to_owned();
        let other = app.create_agent("other", 1_000_000, None).await;

        spend(&app, &research, "r1", 100_000, "api.openai.com").await;
        spend(&app, &research, "r2", 200_000, "api.openai.com").await;
        spend(&app, &research, "r2", 400_000, "serpapi.com").await;
        spend(&app, &research, "r3", 50_000, "serpapi.com").await;

        let (status, body) =
            outcome(&app, &research, "r1", json!({ "outcome": "success", "task_type": "research" })).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["agent"], research_id.as_str());
        let (status, _) =
            outcome(&app, &research, "r2", json!({ "outcome": "success", "task_type": "research" })).await;
        assert_eq!(status, 200);
        // The orchestrator (admin) reports for any agent, by handle.
        let (status, body) = outcome(
            &app,
            ADMIN_TOKEN,
            "r3",
            json!({ "outcome": "failed", "task_type": "research", "agent": "research" }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // An agent cannot report another agent's task; the admin must name one; outcomes are a closed set.
        let (status, body) = outcome(
            &app,
            &other.token,
            "r1",
            json!({ "outcome": "failed", "task_type": "research", "agent": research_id }),
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (403, Some("not_own_task")));
        let (status, body) =
            outcome(&app, ADMIN_TOKEN, "r1", json!({ "outcome": "failed", "task_type": "research" })).await;
        assert_eq!((status, body["code"].as_str()), (422, Some("agent_required")));
        let (status, _) = outcome(&app, &research, "r1", json!({ "outcome": "great", "task_type": "research" })).await;
        assert_eq!(status, 422);
        let (status, _) =
            outcome(&app, "sct_nope", "r1", json!({ "outcome": "success", "task_type": "research" })).await;
        assert_eq!(status, 401);
        // A refusal, for the refusals section.
        let (status, _) = app
            .agent_call(
                &other.token,
                Method::POST,
                "/v1/holds",
                Some(json!({ "amount_micros": 5_000_000, "service": "x.com", "task": "o1" })),
            )
            .await;
        assert_eq!(status, 402);

        let (status, report) = app.admin(Method::GET, "/v1/reports", None).await;
        assert_eq!(status, 200, "{report}");
        let research_row = &report["task_types"][0];
        assert_eq!(research_row["task_type"], "research");
        assert_eq!((research_row["tasks"].as_u64(), research_row["successes"].as_u64()), (Some(3), Some(2)));
        // Successes cost 100000 and 600000: mean 350000, nearest-rank median 100000, p90 600000.
        assert_eq!(research_row["success_cost"]["mean_micros"], 350_000);
        assert_eq!(research_row["success_cost"]["median_micros"], 100_000);
        assert_eq!(research_row["success_cost"]["p90_micros"], 600_000);
        assert_eq!(research_row["unsuccessful_cost"]["mean_micros"], 50_000);
        assert_eq!(research_row["suggested_cap_micros"], 250_000);
        assert_eq!(research_row["cap_in_force_micros"], 2_000_000);
        assert_eq!(report["spent_micros"], 750_000);
        assert_eq!(report["services"][0]["key"], "serpapi.com");
        assert_eq!(report["services"][0]["spent_micros"], 450_000);
        assert_eq!(report["refusals"][0]["reason"], "cap_exceeded");
        assert!(report["rules"]["suggested_cap"].as_str().expect("rule").contains("2.5"));

        // The outcome is a log line of its own, with its task type.
        let log = app.log().await;
        let line = log.iter().find(|e| e["event"] == "outcome" && e["task"] == "r3").expect("outcome line");
        assert_eq!((line["reason"].as_str(), line["task_type"].as_str()), (Some("failed"), Some("research")));

        // A time range after everything is empty; CSV has its header.
        let future = app.clock.now_ms() + 60_000;
        let (status, empty) = app.admin(Method::GET, &format!("/v1/reports?since_ms={future}"), None).await;
        assert_eq!(status, 200);
        assert_eq!((empty["entries"].as_u64(), empty["task_types"].as_array().map(Vec::len)), (Some(0), Some(0)));
        let (status, csv) = app.admin(Method::GET, "/v1/reports?format=csv&agent=research", None).await;
        assert_eq!(status, 200);
        let csv = csv.as_str().expect("csv text").to_owned();
        assert!(csv.starts_with("section,key,tasks"), "{csv}");
        assert!(csv.contains("\ntask_type,research,3,2,1,0,750000,350000,100000,600000,50000,"), "{csv}");
        // Agents cannot read reports.
        let (status, _) = app.agent_call(&research, Method::GET, "/v1/reports", None).await;
        assert_eq!(status, 403);
    }
}
