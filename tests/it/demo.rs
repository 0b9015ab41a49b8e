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

/// Reads `export NAME=value` lines from a `spendcap demo --providers-only` process until the last
/// one it prints (`SPENDCAP_SIM_AP2_USER_URL`), then keeps reading what it prints in the background:
/// the daemon's later output must never meet a closed pipe.
fn read_exports(stdout: std::process::ChildStdout) -> std::collections::BTreeMap<String, String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut env = std::collections::BTreeMap::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((name, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                env.insert(name.to_owned(), value.to_owned());
                if name == "SPENDCAP_SIM_AP2_USER_URL" {
                    let _ = tx.send(env.clone());
                }
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the demo prints its export lines")
}

/// `spendcap demo --providers-only` as a user runs it: a real process whose printed environment is
/// all an agent needs to pay each simulated provider through the daemon, and no scenario ran.
#[tokio::test]
async fn providers_only_prints_what_an_agent_needs_to_pay_every_protocol() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["demo", "--providers-only", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spendcap demo --providers-only");
    let stdout = child.stdout.take().expect("stdout");
    let _child = Kill(child);
    let env = tokio::task::spawn_blocking(move || read_exports(stdout)).await.expect("reading the exports");
    let var = |name: &str| env.get(name).unwrap_or_else(|| panic!("{name} in {env:?}")).clone();
    let (base, admin) = (var("SPENDCAP_URL"), var("SPENDCAP_ADMIN_TOKEN"));
    let http = reqwest::Client::new();
    let call = |token: &str, method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = http.request(method, format!("{base}{path}")).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.expect("daemon answers");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let (status, agents) = call(&admin, reqwest::Method::GET, "/v1/agents", None).await;
    assert_eq!((status, agents["agents"].as_array().map(Vec::len)), (200, Some(0)), "no scenario ran: {agents}");
    let (status, created) = call(
        &admin,
        reqwest::Method::POST,
        "/v1/agents",
        Some(serde_json::json!({"handle": "a", "cap_micros": 2_000_000})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().expect("token").to_owned();

    let url = format!("{}/search", var("SPENDCAP_SIM_X402_URL"));
    let (status, paid) =
        call(&token, reqwest::Method::POST, "/v1/x402/fetch", Some(serde_json::json!({"url": url, "task": "t"}))).await;
    assert_eq!((status, &paid["payment"]["amount_micros"]), (200, &Value::from(20_000)), "{paid}");

    let body = serde_json::json!({"merchant": var("SPENDCAP_SIM_ACP_MERCHANT"), "items": [{"id": "report_market"}], "task": "t"});
    let (status, paid) = call(&token, reqwest::Method::POST, "/v1/acp/checkouts", Some(body)).await;
    assert_eq!((status, &paid["amount_micros"]), (200, &Value::from(450_000)), "{paid}");

    let (status, key) = call(&token, reqwest::Method::GET, "/v1/ap2/key", None).await;
    assert_eq!(status, 200, "{key}");
    let sku = spendcap::sim::AP2_CATALOG[0].0;
    let mandates: Value = http
        .post(format!("{}/mandates", var("SPENDCAP_SIM_AP2_USER_URL")))
        .json(&serde_json::json!({"jwk": key["jwk"], "items": [sku], "budget_cents": 500, "max_payment_cents": 100}))
        .send()
        .await
        .expect("user issuer")
        .json()
        .await
        .expect("mandates");
    let cart: Value = http
        .post(format!("{}/checkouts", var("SPENDCAP_SIM_AP2_MERCHANT_URL")))
        .json(&serde_json::json!({"items": [sku]}))
        .send()
        .await
        .expect("merchant")
        .json()
        .await
        .expect("cart");
    let body = serde_json::json!({"checkout_jwt": cart["checkout_jwt"], "task": "t",
        "open_checkout_mandate": mandates["open_checkout_mandate"], "open_payment_mandate": mandates["open_payment_mandate"]});
    let (status, paid) = call(&token, reqwest::Method::POST, "/v1/ap2/payments", Some(body)).await;
    assert_eq!((status, &paid["amount_micros"]), (200, &Value::from(300_000)), "{paid}");

    let (_, me) = call(&token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(me["spent_micros"], 20_000 + 450_000 + 300_000, "{me}");
}
