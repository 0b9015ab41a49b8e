//! The `spendcap demo` scenario, against a daemon on real Redis.

use crate::support::{spawn_app, ADMIN_TOKEN};

#[tokio::test]
async fn demo_scenario_runs_as_described() {
    let app = spawn_app().await;
    let outcome = spendcap::demo::scenario(&app.base, ADMIN_TOKEN).await.expect("scenario");
    assert_eq!(outcome.research_spent_micros, 1_900_000);
    assert_eq!(outcome.enrichment_refusal, "cap_exceeded");
    assert_eq!(outcome.looper_suspension, "agent_suspended");
    assert_eq!(outcome.looper_after_revoke, "agent_revoked");
    let (status, report) = app.admin(reqwest::Method::GET, "/v1/reports", None).await;
    assert_eq!(status, 200);
    let research =
        report["task_types"].as_array().expect("rows").iter().find(|r| r["task_type"] == "research").cloned();
    let research = research.expect("research row");
    // Successes cost 520000, 530000, 850000 (nearest-rank median 530000); the loop was abandoned.
    assert_eq!(research["success_cost"]["median_micros"], 530_000);
    assert_eq!(research["suggested_cap_micros"], 1_325_000);
    assert_eq!(research["abandoned"], 1);
}
