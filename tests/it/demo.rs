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
    //         + (0.02 + retrieval 0.50 + report 0.45) = 2.75, plus the metered summary (x402
    //         `upto`: 0.30 held, 0.12 used and settled) = 2.87
    assert_eq!(outcome.research_spent_micros, 2_870_000);
    assert_eq!(outcome.enrichment_refusal, "cap_exceeded");
    assert_eq!(outcome.looper_suspension, "agent_suspended");
    assert_eq!(outcome.looper_after_revoke, "agent_revoked");
    // Three profiles at 0.30 fit a 1.00 cap; the fourth does not. The breaker allows 5 repeats.
    assert_eq!(outcome.payments, (7 + 5, 2, 3), "{outcome:?}");

    let (status, report) = app.admin(reqwest::Method::GET, "/v1/reports", None).await;
    assert_eq!(status, 200);
    let rows = report["task_types"].as_array().expect("rows");
    let research = rows.iter().find(|r| r["task_type"] == "research").expect("research row");
    // Successful research tasks cost 1.41, 0.49 and 0.97: the nearest-rank median is 0.97 and
    // the suggested cap 2.5 times that; the loop was abandoned.
    assert_eq!(research["success_cost"]["median_micros"], 970_000);
    assert_eq!(research["suggested_cap_micros"], 2_425_000);
    // The looper's abandoned run is a polling task, not a fourth research task.
    assert_eq!((research["tasks"].as_u64(), research["abandoned"].as_u64()), (Some(3), Some(0)), "{research}");
    let polling = rows.iter().find(|r| r["task_type"] == "polling").expect("polling row");
    assert_eq!((polling["tasks"].as_u64(), polling["abandoned"].as_u64()), (Some(1), Some(1)), "{polling}");

    // The printed story counts exactly the outcomes the report counts, type by type.
    let reported: std::collections::BTreeMap<String, (u64, u64, u64)> = rows
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().expect("count");
            (r["task_type"].as_str().expect("type").to_owned(), (n("successes"), n("failed"), n("abandoned")))
        })
        .collect();
    assert_eq!(outcome.tasks, reported);
    let story = outcome.lines.join("\n");
    for line in [
        "research: 3 research tasks succeeded (x402 searches and papers, ACP dataset and report), $2.87 of its",
        "enrichment: 3 enrichment tasks succeeded",
        "so 1 task failed (enrich-4)",
        "looper: 1 polling task abandoned (loop-1)",
    ] {
        assert!(story.contains(line), "{line:?} in:\n{story}");
    }

    // Every figure of the report is recomputed from the exported log.
    let (status, log) = app.admin(reqwest::Method::GET, "/v1/log?format=jsonl", None).await;
    assert_eq!(status, 200);
    let entries: Vec<Value> =
        log.as_str().expect("JSON lines").lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(recompute(&entries), figures(&report));
    let enrichment = rows.iter().find(|r| r["task_type"] == "enrichment").expect("enrichment row");
    assert_eq!((enrichment["successes"].as_u64(), enrichment["failed"].as_u64()), (Some(3), Some(1)), "{enrichment}");

    let agents = report["agents"].as_array().expect("agent rows");
    let handles: Vec<&str> = agents.iter().filter_map(|row| row["handle"].as_str()).collect();
    assert_eq!(handles, ["research", "enrichment", "looper"], "by spend, named by handle");

    // What the providers were paid is what the ledger says was spent through each protocol.
    let x402 = providers.x402.received_micros();
    // The metered summary counts what its server charged (0.12 of the 0.30 authorised).
    assert_eq!(x402, 3 * 20_000 + 400_000 + 350_000 + 500_000 + 120_000 + 5 * 20_000);
    assert_eq!(spent_by(&report["protocols"], "x402"), x402);
    assert_eq!(spent_by(&report["protocols"], "acp"), providers.acp.charged_cents() * 10_000);
    assert_eq!(providers.acp.charged_cents(), 99 + 45);
    assert_eq!(spent_by(&report["protocols"], "ap2"), providers.ap2.paid_cents() as u64 * 10_000);
    assert_eq!(providers.ap2.paid_cents(), 3 * 30);
    assert_eq!(report["spent_micros"], 2_870_000 + 900_000 + 5 * 20_000);
}

/// The report's figures, recomputed from exported log entries by the rules the report states: a
/// task's cost is what its label's settles add up to within its tree, its outcome the latest
/// `outcome` entry for it; spend is settles, refusals are `refuse` entries.
fn recompute(entries: &[Value]) -> Value {
    use std::collections::BTreeMap;
    let text = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_owned();
    let amount = |e: &Value| e["amount"].as_u64().unwrap_or(0);
    let mut spent = 0;
    let mut by_agent: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut by_service: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut by_protocol: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut refusals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut task_cost: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut task_outcome: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for e in entries {
        let task = (text(e, "tree"), text(e, "task"));
        match e["event"].as_str() {
            Some("settle") => {
                spent += amount(e);
                if !task.1.is_empty() {
                    *task_cost.entry(task).or_default() += amount(e);
                }
                for (rows, key) in
                    [(&mut by_agent, "agent"), (&mut by_service, "service"), (&mut by_protocol, "protocol")]
                {
                    let row = rows.entry(text(e, key)).or_default();
                    row.0 += amount(e);
                    row.1 += 1;
                }
            }
            Some("refuse") => {
                for (rows, key) in
                    [(&mut by_agent, "agent"), (&mut by_service, "service"), (&mut by_protocol, "protocol")]
                {
                    rows.entry(text(e, key)).or_default().2 += 1;
                }
                let row = refusals.entry(text(e, "reason")).or_default();
                row.0 += 1;
                row.1 += amount(e);
            }
            Some("outcome") => {
                by_agent.entry(text(e, "agent")).or_default();
                task_outcome.insert(task, (text(e, "task_type"), text(e, "reason")));
            }
            _ => {}
        }
    }
    let mut types: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
    for (task, (task_type, outcome)) in &task_outcome {
        let row = types.entry(task_type.clone()).or_default();
        row.0 += task_cost.get(task).copied().unwrap_or(0);
        match outcome.as_str() {
            "success" => row.1 += 1,
            "failed" => row.2 += 1,
            _ => row.3 += 1,
        }
    }
    let unfinished = task_cost.keys().filter(|t| !task_outcome.contains_key(*t)).count();
    serde_json::json!({
        "entries": entries.len(), "spent": spent, "unfinished": unfinished, "task_types": types,
        "agents": by_agent, "services": by_service, "protocols": by_protocol, "refusals": refusals,
    })
}

/// The same figures as the report states them.
fn figures(report: &Value) -> Value {
    use std::collections::BTreeMap;
    let rows = |k: &str| report[k].as_array().expect("rows").clone();
    let n = |v: &Value, k: &str| v[k].as_u64().expect("a count");
    let spend = |k: &str, key: &str| -> BTreeMap<String, (u64, u64, u64)> {
        rows(k)
            .iter()
            .map(|r| {
                (r[key].as_str().expect("key").to_owned(), (n(r, "spent_micros"), n(r, "settles"), n(r, "refusals")))
            })
            .collect()
    };
    let types: BTreeMap<String, (u64, u64, u64, u64)> = rows("task_types")
        .iter()
        .map(|r| {
            let key = r["task_type"].as_str().expect("type").to_owned();
            (key, (n(r, "spent_micros"), n(r, "successes"), n(r, "failed"), n(r, "abandoned")))
        })
        .collect();
    let refusals: BTreeMap<String, (u64, u64)> = rows("refusals")
        .iter()
        .map(|r| (r["reason"].as_str().expect("reason").to_owned(), (n(r, "count"), n(r, "requested_micros"))))
        .collect();
    serde_json::json!({
        "entries": report["entries"], "spent": report["spent_micros"], "unfinished": report["unfinished_tasks"],
        "task_types": types, "agents": spend("agents", "agent"), "services": spend("services", "key"),
        "protocols": spend("protocols", "key"), "refusals": refusals,
    })
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
