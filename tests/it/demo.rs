//! The `spendcap demo` scenario against a daemon on real Redis, paying the simulated x402, ACP
//! and AP2 providers over real HTTP: what each agent ran into, the report's figures, and that
//! every provider received exactly what the ledger recorded for its protocol.

use adapters::conformance::ConformanceSink;
use serde_json::Value;
use spendcap::sim::Providers;

use crate::support::{spawn_app_with, AppOptions, ADMIN_TOKEN};

fn spent_by(rows: &Value, key: &str) -> u64 {
    let rows = rows.as_array().expect("rows");
    rows.iter().find(|row| row["key"] == key).map_or(0, |row| row["spent_micros"].as_u64().expect("spent"))
}

#[tokio::test]
async fn demo_scenario_pays_simulated_providers_through_every_protocol() {
    let providers = Providers::start().await.expect("simulated providers");
    let mut protocols = providers.protocol_config().expect("configuration for the providers");
    let sink = ConformanceSink::to_dir(ConformanceSink::test_dir());
    protocols.x402.conformance = sink.clone();
    protocols.acp.conformance = sink.clone();
    protocols.ap2.conformance = sink;
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;

    let outcome = spendcap::demo::scenario(&app.base, ADMIN_TOKEN, &providers).await.expect("scenario");
    // research: (search 0.02 + attention 0.40 + dataset 0.99) + (0.02 + scaling 0.35)
    //         + (0.02 + retrieval 0.50 + report 0.45) = 2.75
    assert_eq!(outcome.research_spent_micros, 2_750_000);
    assert_eq!(outcome.enrichment_refusal, "cap_exceeded");
    assert_eq!(outcome.looper_suspension, "agent_suspended");
    assert_eq!(outcome.looper_after_revoke, "agent_revoked");
    // Three profiles at 0.30 fit a 1.00 cap; the fourth does not. The breaker allows 5 repeats.
    assert_eq!(outcome.payments, (6 + 5, 2, 3), "{outcome:?}");

    let (status, report) = app.admin(reqwest::Method::GET, "/v1/reports", None).await;
    assert_eq!(status, 200);
    let rows = report["task_types"].as_array().expect("rows");
    let research = rows.iter().find(|r| r["task_type"] == "research").expect("research row");
    // Successful research tasks cost 1.41, 0.37 and 0.97: the nearest-rank median is 0.97 and
    // the suggested cap 2.5 times that; the loop was abandoned.
    assert_eq!(research["success_cost"]["median_micros"], 970_000);
    assert_eq!(research["suggested_cap_micros"], 2_425_000);
    assert_eq!(research["abandoned"], 1);
    let enrichment = rows.iter().find(|r| r["task_type"] == "enrichment").expect("enrichment row");
    assert_eq!((enrichment["successes"].as_u64(), enrichment["failed"].as_u64()), (Some(3), Some(1)), "{enrichment}");

    let agents = report["agents"].as_array().expect("agent rows");
    let handles: Vec<&str> = agents.iter().filter_map(|row| row["handle"].as_str()).collect();
    assert_eq!(handles, ["research", "enrichment", "looper"], "by spend, named by handle");

    // What the providers were paid is what the ledger says was spent through each protocol.
    let x402 = providers.x402.received_micros();
    assert_eq!(x402, 3 * 20_000 + 400_000 + 350_000 + 500_000 + 5 * 20_000);
    assert_eq!(spent_by(&report["protocols"], "x402"), x402);
    assert_eq!(spent_by(&report["protocols"], "acp"), providers.acp.charged_cents() * 10_000);
    assert_eq!(providers.acp.charged_cents(), 99 + 45);
    assert_eq!(spent_by(&report["protocols"], "ap2"), providers.ap2.paid_cents() as u64 * 10_000);
    assert_eq!(providers.ap2.paid_cents(), 3 * 30);
    assert_eq!(report["spent_micros"], 2_750_000 + 900_000 + 5 * 20_000);
}
