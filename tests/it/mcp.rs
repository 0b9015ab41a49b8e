//! The MCP face, driven by an independent MCP client (rmcp's client) over both transports: a
//! `spendcap mcp` process on stdio, and streamable HTTP at `/mcp`. The agent pays the simulated
//! x402 resource server, is refused past its cap, and sees its revocation on the next call.

use std::collections::BTreeMap;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use spendcap::sim::Providers;

use crate::support::{spawn_app_with, AppOptions, TestApp};

type Client = RunningService<RoleClient, ()>;

async fn app_with_providers() -> (TestApp, Providers) {
    let providers = Providers::start().await.expect("simulated providers");
    let protocols = providers.protocol_config().expect("configuration for the providers");
    (spawn_app_with(AppOptions { protocols, ..Default::default() }).await, providers)
}

/// `spendcap mcp` as a host launches it: the binary, `mcp`, and its environment.
fn stdio_command(env: &BTreeMap<String, String>, args: &[String]) -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_spendcap")).configure(|command| {
        command.args(args).env_clear().envs(env).env("PATH", std::env::var_os("PATH").unwrap_or_default());
    })
}

async fn stdio_client(base: &str, token: &str) -> Client {
    let env = BTreeMap::from([
        ("SPENDCAP_URL".to_owned(), base.to_owned()),
        ("SPENDCAP_AGENT_TOKEN".to_owned(), token.to_owned()),
    ]);
    let transport = TokioChildProcess::new(stdio_command(&env, &["mcp".to_owned()])).expect("spendcap mcp starts");
    ().serve(transport).await.expect("MCP handshake over stdio")
}

async fn http_client(base: &str, token: &str) -> Client {
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(token.to_owned());
    ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("MCP handshake over HTTP")
}

async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let Value::Object(arguments) = arguments else { panic!("arguments are an object") };
    client.call_tool(CallToolRequestParams::new(tool).with_arguments(arguments)).await.expect("the tool answers")
}

fn content(result: &CallToolResult) -> &Value {
    result.structured_content.as_ref().unwrap_or_else(|| panic!("structured content in {result:?}"))
}

/// An agent with a $0.05 cap, $0.10 per task and $1.00 a day.
async fn capped_agent(app: &TestApp, handle: &str) -> crate::support::Agent {
    let agent = app.create_agent(handle, 50_000, None).await;
    let controls = json!({"task_cap_micros": 100_000, "limits": {"daily": 1_000_000}});
    let (status, body) =
        app.admin(reqwest::Method::PUT, &format!("/v1/agents/{}/controls", agent.id), Some(controls)).await;
    assert_eq!(status, 200, "{body}");
    agent
}

/// What both transports must do, from the agent's side (a `capped_agent`; a search costs $0.02).
async fn pays_refuses_and_sees_revocation(client: &Client, app: &TestApp, agent_id: &str, providers: &Providers) {
    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["acp_checkout", "ap2_pay", "explain_refusal", "get_budget", "paid_fetch", "record_task_outcome"]
    );
    for tool in &tools {
        let hints = tool.annotations.as_ref().expect("annotations");
        let read_only = matches!(tool.name.as_ref(), "get_budget" | "explain_refusal");
        assert_eq!(hints.read_only_hint, Some(read_only), "{}", tool.name);
        let pays = matches!(tool.name.as_ref(), "paid_fetch" | "acp_checkout" | "ap2_pay");
        assert_eq!(hints.open_world_hint, Some(pays), "{}", tool.name);
        assert!(tool.description.as_deref().is_some_and(|d| d.len() > 40), "{} is described", tool.name);
    }
    let fetch_schema = &tools.iter().find(|tool| tool.name == "paid_fetch").expect("paid_fetch").input_schema;
    assert_eq!(fetch_schema["required"], json!(["url"]));
    assert!(fetch_schema["properties"]["max_usd"]["description"].as_str().is_some_and(|d| d.contains("dollars")));

    let search = format!("{}/search", providers.x402.base());
    let paid = call(client, "paid_fetch", json!({"url": search, "task": "t1", "max_usd": "0.05"})).await;
    assert_eq!(paid.is_error, Some(false), "{paid:?}");
    let paid = content(&paid);
    assert_eq!((&paid["status"], &paid["payment"]["status"]), (&json!(200), &json!("settled")), "{paid}");
    assert_eq!(paid["payment"]["amount_usd"], "0.02", "{paid}");
    // The signed receipt is passed on verbatim (in micros, as signed), so it still verifies.
    let receipt: spendcap::receipt::Receipt =
        serde_json::from_value(paid["payment"]["receipt"].clone()).expect("the receipt as the daemon signed it");
    assert_eq!(receipt.receipt.amount_micros, 20_000);
    let (_, key) = app.admin(reqwest::Method::GET, "/v1/receipt-key", None).await;
    let key = spendcap::receipt::parse_public_key(key["public_key"].as_str().expect("key")).expect("public key");
    spendcap::receipt::verify(&receipt, &key).expect("the receipt verifies");

    // The same key again is the same purchase: the first answer, nothing paid twice.
    let once = json!({"url": search, "task": "t1", "idempotency_key": "buy-search-1"});
    let first = call(client, "paid_fetch", once.clone()).await;
    let again = call(client, "paid_fetch", once).await;
    assert_eq!((first.is_error, again.is_error), (Some(false), Some(false)), "{again:?}");
    assert_eq!(content(&again)["replayed"], true, "{again:?}");
    assert_eq!(content(&again)["idempotency_key"], "buy-search-1");
    assert_eq!(providers.x402.received_micros(), 40_000, "two purchases paid, the replay was not");

    let budget = call(client, "get_budget", json!({"task": "t1"})).await;
    let budget = content(&budget);
    assert_eq!(
        (&budget["cap_usd"], &budget["spent_usd"], &budget["held_usd"], &budget["remaining_usd"]),
        (&json!("0.05"), &json!("0.04"), &json!("0.00"), &json!("0.01")),
        "{budget}"
    );
    assert_eq!(
        (&budget["task"]["spent_usd"], &budget["task"]["cap_usd"], &budget["task"]["remaining_usd"]),
        (&json!("0.04"), &json!("0.10"), &json!("0.06")),
        "{budget}"
    );
    let daily = &budget["periods"][0];
    assert_eq!(
        (&daily["period"], &daily["limit_usd"], &daily["spent_usd"], &daily["remaining_usd"]),
        (&json!("daily"), &json!("1.00"), &json!("0.04"), &json!("0.96")),
        "{budget}"
    );

    // Past the cap: an error result the model can read, and nothing paid.
    let refused = call(client, "paid_fetch", json!({"url": search, "task": "t1"})).await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let refusal = content(&refused);
    assert_eq!(
        (&refusal["code"], &refusal["requested_usd"], &refusal["remaining_usd"], &refusal["limited_by"]),
        (&json!("cap_exceeded"), &json!("0.02"), &json!("0.01"), &json!(agent_id)),
        "{refusal}"
    );
    assert_eq!((&refusal["retryable"], &refusal["refusal"]), (&json!(false), &json!(true)), "{refusal}");
    assert_eq!(providers.x402.received_micros(), 40_000);
    let explained = call(client, "explain_refusal", json!({"code": "cap_exceeded"})).await;
    assert!(content(&explained)["what_to_do"].as_str().is_some_and(|text| text.contains("Stop spending")));

    let outcome =
        call(client, "record_task_outcome", json!({"task": "t1", "outcome": "success", "task_type": "research"})).await;
    assert_eq!(outcome.is_error, Some(false), "{outcome:?}");

    // The operator revokes the agent mid-session: the next call is refused.
    let (status, body) = app
        .admin(reqwest::Method::POST, &format!("/v1/agents/{agent_id}/revoke"), Some(json!({"reason": "run_over"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let revoked =
        call(client, "paid_fetch", json!({"url": format!("{}/papers/attention", providers.x402.base())})).await;
    assert_eq!((revoked.is_error, &content(&revoked)["code"]), (Some(true), &json!("agent_revoked")), "{revoked:?}");
    assert_eq!(content(&revoked)["retryable"], false);
    assert_eq!(providers.x402.received_micros(), 40_000, "nothing paid for a revoked agent");
}

#[tokio::test]
async fn mcp_over_streamable_http_pays_refuses_and_sees_revocation() {
    let (app, providers) = app_with_providers().await;
    let agent = capped_agent(&app, "mcp-http").await;
    let client = http_client(&app.base, &agent.token).await;
    pays_refuses_and_sees_revocation(&client, &app, &agent.id, &providers).await;
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn mcp_over_stdio_pays_refuses_and_sees_revocation() {
    let (app, providers) = app_with_providers().await;
    let agent = capped_agent(&app, "mcp-stdio").await;
    let client = stdio_client(&app.base, &agent.token).await;
    pays_refuses_and_sees_revocation(&client, &app, &agent.id, &providers).await;
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn mcp_over_http_needs_a_live_agent_token() {
    let (app, _providers) = app_with_providers().await;
    let agent = app.create_agent("mcp-auth", 50_000, None).await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let forged = format!("{}{}", &agent.token[..agent.token.len() - 4], "0000");
    for token in [None, Some("not-a-token"), Some(crate::support::ADMIN_TOKEN), Some(forged.as_str())] {
        let mut request =
            app.http.post(app.url("/mcp")).header("accept", "application/json, text/event-stream").json(&initialize);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("daemon answers");
        assert_eq!(response.status(), 401, "token {:?}", token.map(|t| &t[..6.min(t.len())]));
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"spendcap\"");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], "invalid_token");
    }
    let response = app
        .http
        .post(app.url("/mcp"))
        .bearer_auth(&agent.token)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize)
        .send()
        .await
        .expect("daemon answers");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn mcp_tools_pay_acp_and_ap2_and_refuse_bad_dollars() {
    let (app, providers) = app_with_providers().await;
    let agent = app.create_agent("mcp-shop", 2_000_000, None).await;
    let client = http_client(&app.base, &agent.token).await;

    let bad = call(
        &client,
        "paid_fetch",
        json!({"url": format!("{}/search", providers.x402.base()), "max_usd": "0.1234567"}),
    )
    .await;
    assert_eq!((bad.is_error, &content(&bad)["code"]), (Some(true), &json!("amount_fractional")), "{bad:?}");
    assert_eq!(providers.x402.received_micros(), 0, "bad input pays nothing");

    let bought = call(
        &client,
        "acp_checkout",
        json!({"merchant": spendcap::sim::ACP_MERCHANT,
        "items": [{"id": "report_market"}], "task": "shop"}),
    )
    .await;
    assert_eq!(bought.is_error, Some(false), "{bought:?}");
    assert_eq!(content(&bought)["amount_usd"], "0.45", "{bought:?}");
    assert_eq!(providers.acp.charged_cents(), 45);

    let (status, key) = app.agent_call(&agent.token, reqwest::Method::GET, "/v1/ap2/key", None).await;
    assert_eq!(status, 200, "{key}");
    let sku = spendcap::sim::AP2_CATALOG[0].0;
    let mandates: Value = app
        .http
        .post(format!("{}/mandates", providers.ap2.user_base()))
        .json(&json!({"jwk": key["jwk"], "items": [sku], "budget_cents": 500, "max_payment_cents": 100}))
        .send()
        .await
        .expect("user issuer")
        .json()
        .await
        .expect("mandates");
    let cart: Value = app
        .http
        .post(format!("{}/checkouts", providers.ap2.merchant_base()))
        .json(&json!({"items": [sku]}))
        .send()
        .await
        .expect("merchant")
        .json()
        .await
        .expect("cart");
    let paid = call(&client, "ap2_pay", json!({"checkout_jwt": cart["checkout_jwt"], "task": "shop",
        "open_checkout_mandate": mandates["open_checkout_mandate"], "open_payment_mandate": mandates["open_payment_mandate"]}))
    .await;
    assert_eq!(paid.is_error, Some(false), "{paid:?}");
    assert_eq!(content(&paid)["amount_usd"], "0.30", "{paid:?}");
    assert_eq!(providers.ap2.paid_cents(), 30);

    let (_, me) = app.agent_call(&agent.token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(me["spent_micros"], 450_000 + 300_000, "{me}");
    client.cancel().await.expect("closes");
}

/// The JSON blocks of the README's `### MCP` section, in order.
fn readme_mcp_configs() -> Vec<Value> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = readme.split("\n### MCP\n").nth(1).expect("a ### MCP section");
    let section = section.split("\n## ").next().expect("section").split("\n### ").next().expect("section");
    section
        .split("```json\n")
        .skip(1)
        .map(|block| serde_json::from_str(block.split("```").next().expect("closed block")).expect("valid JSON"))
        .collect()
}

/// Reads `export NAME=value` lines from `spendcap demo --providers-only` until its last one.
fn read_exports(stdout: std::process::ChildStdout) -> BTreeMap<String, String> {
    use std::io::BufRead;
    let mut env = BTreeMap::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("demo output");
        if let Some((name, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
            env.insert(name.to_owned(), value.to_owned());
            if name == "SPENDCAP_SIM_AP2_USER_URL" {
                break;
            }
        }
    }
    env
}

/// The README's MCP host configurations, read verbatim and launched the way a host does, against
/// `spendcap demo --providers-only`: the stdio entry's command and environment, and the HTTP
/// entry's URL and header — with only the placeholders (the default URL, `sct_…`) replaced.
#[tokio::test]
async fn readme_mcp_host_configs_pay_through_the_daemon() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let configs = readme_mcp_configs();
    assert_eq!(configs.len(), 2, "a stdio and an HTTP entry: {configs:?}");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["demo", "--providers-only", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spendcap demo --providers-only");
    let stdout = demo.stdout.take().expect("stdout");
    let _demo = Kill(demo);
    let exports = tokio::task::spawn_blocking(move || read_exports(stdout)).await.expect("the exports");
    let (base, admin) = (exports["SPENDCAP_URL"].clone(), exports["SPENDCAP_ADMIN_TOKEN"].clone());
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{base}/v1/agents"))
        .bearer_auth(&admin)
        .json(&json!({"handle": "claude", "cap_micros": 1_000_000}))
        .send()
        .await
        .expect("create agent")
        .json()
        .await
        .expect("agent");
    let token = created["token"].as_str().expect("token").to_owned();
    let search = format!("{}/search", exports["SPENDCAP_SIM_X402_URL"]);
    let placeholder_url = "http://127.0.0.1:8402";
    let placeholder_token = "sct_…";

    let stdio = &configs[0]["mcpServers"]["spendcap"];
    assert_eq!(stdio["command"], "spendcap", "{stdio}");
    let args: Vec<String> =
        stdio["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("string").to_owned()).collect();
    let mut env = BTreeMap::new();
    for (name, value) in stdio["env"].as_object().expect("env") {
        let value = match (name.as_str(), value.as_str()) {
            ("SPENDCAP_URL", Some(url)) if url == placeholder_url => base.clone(),
            ("SPENDCAP_AGENT_TOKEN", Some(placeholder)) if placeholder == placeholder_token => token.clone(),
            other => panic!("unexpected environment entry {other:?}"),
        };
        env.insert(name.clone(), value);
    }
    let client: Client =
        ().serve(TokioChildProcess::new(stdio_command(&env, &args)).expect("launches")).await.expect("stdio");
    let paid = call(&client, "paid_fetch", json!({"url": search, "task": "readme"})).await;
    assert_eq!((paid.is_error, &content(&paid)["payment"]["amount_usd"]), (Some(false), &json!("0.02")), "{paid:?}");
    client.cancel().await.expect("closes");

    let remote = &configs[1]["mcpServers"]["spendcap"];
    assert_eq!(remote["type"], "http", "{remote}");
    let url = remote["url"].as_str().expect("url").replacen(placeholder_url, &base, 1);
    assert!(url.ends_with("/mcp") && url.starts_with(&base), "{url}");
    let authorization = remote["headers"]["Authorization"].as_str().expect("Authorization header");
    let bearer = authorization.strip_prefix("Bearer ").expect("a bearer token").replacen(placeholder_token, &token, 1);
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(bearer);
    let client: Client = ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("HTTP");
    let budget = call(&client, "get_budget", json!({})).await;
    assert_eq!(content(&budget)["spent_usd"], "0.02", "{budget:?}");
    client.cancel().await.expect("closes");
}

/// `spendcap mcp` started with the admin token refuses to run, and never repeats the token.
#[tokio::test]
async fn spendcap_mcp_refuses_an_admin_token_without_showing_it() {
    let admin = crate::support::ADMIN_TOKEN;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .arg("mcp")
        .env("SPENDCAP_URL", "http://127.0.0.1:9")
        .env("SPENDCAP_AGENT_TOKEN", admin)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("spendcap mcp runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("must be an agent token"), "{stderr}");
    assert!(
        !stderr.contains(&admin[..16]) && !String::from_utf8_lossy(&output.stdout).contains(&admin[..16]),
        "{stderr}"
    );
}

/// A tool call re-sent with the same MCP request id to the same `spendcap mcp` process (as a host
/// that lost the answer may do) is the same purchase: paid once, the first answer replayed.
#[tokio::test]
async fn a_resent_mcp_request_pays_once() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (app, providers) = app_with_providers().await;
    let agent = app.create_agent("mcp-resend", 1_000_000, None).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .arg("mcp")
        .env("SPENDCAP_URL", &app.base)
        .env("SPENDCAP_AGENT_TOKEN", &agent.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spendcap mcp");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "paid_fetch", "arguments": {"url": format!("{}/search", providers.x402.base())}}});
    let messages = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        call.clone(),
        call,
    ];
    let mut answers = Vec::new();
    for message in messages {
        let expects_answer = message.get("id").is_some();
        stdin.write_all(format!("{message}\n").as_bytes()).await.expect("write");
        stdin.flush().await.expect("flush");
        if expects_answer {
            let line = lines.next_line().await.expect("read").expect("an answer");
            answers.push(serde_json::from_str::<Value>(&line).expect("JSON-RPC"));
        }
    }
    let (first, second) = (&answers[1]["result"], &answers[2]["result"]);
    assert_eq!((&first["isError"], &second["isError"]), (&json!(false), &json!(false)), "{answers:?}");
    let first = &first["structuredContent"];
    let second = &second["structuredContent"];
    assert_eq!(first["idempotency_key"], second["idempotency_key"], "one key for one request id");
    assert_eq!((&first["replayed"], &second["replayed"]), (&json!(false), &json!(true)), "{second}");
    assert_eq!(providers.x402.received_micros(), 20_000, "paid once");
}
