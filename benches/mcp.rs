//! What the MCP face adds to a payment: `cargo bench --bench mcp`.
//!
//! One `spendcap serve --dev` process (in-process ledger) with the simulated x402 resource server
//! of `spendcap::sim` on loopback. The same paid x402 fetch ($0.02, a new purchase each time) is
//! made one at a time, N times each (the paths taking turns), through
//!
//! 1. the HTTP API (`POST /v1/x402/fetch`, reqwest, a new `Idempotency-Key` per call);
//! 2. MCP over stdio: rmcp's client, a `spendcap mcp` process, which calls the daemon over HTTP;
//! 3. MCP over streamable HTTP at the daemon's `/mcp` (rmcp's client), dispatched in process;
//!
//! and the budget read (`GET /v1/me` vs the `get_budget` tool) the same three ways, which shows
//! the face's own cost without a payment. It prints p50 and p90 of each. `SPENDCAP_BENCH_MCP_N`
//! sets N (default 300; 30 warm-up calls per path are not counted).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use spendcap::sim::Providers;

const ADMIN: &str = "bench-admin-token-0123456789abcdef0123456789";
const X402_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const WARM_UP: usize = 30;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

async fn paid(client: &RunningService<RoleClient, ()>, tool: &'static str, arguments: Value) {
    let Value::Object(arguments) = arguments else { unreachable!("an object") };
    let result = client.call_tool(CallToolRequestParams::new(tool).with_arguments(arguments)).await.expect("tool call");
    assert_eq!(result.is_error, Some(false), "{result:?}");
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("SPENDCAP_BENCH_MCP_N").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let providers = Providers::start().await.expect("simulated providers");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(["serve", "--dev"])
            .env("SPENDCAP_X402_PRIVATE_KEY", X402_KEY)
            .env("SPENDCAP_X402_ALLOW_PRIVATE", "127.0.0.1")
            .env("SPENDCAP_LISTEN", format!("127.0.0.1:{port}"))
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN)
            .env("SPENDCAP_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spendcap binary"),
    );
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..500 {
        if http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the daemon did not start");
    let created: Value = http
        .post(format!("{base}/v1/agents"))
        .bearer_auth(ADMIN)
        .json(&json!({"handle": "bench", "cap_micros": 1_000_000_000u64}))
        .send()
        .await
        .expect("create agent")
        .json()
        .await
        .expect("agent");
    let token = created["token"].as_str().expect("token").to_owned();
    // Hundreds of identical payments a minute are the point here, not a runaway loop.
    let agent_id = created["agent"]["id"].as_str().expect("id");
    let status = http
        .put(format!("{base}/v1/agents/{agent_id}/controls"))
        .bearer_auth(ADMIN)
        .json(&json!({"breaker": null}))
        .send()
        .await
        .expect("controls")
        .status();
    assert_eq!(status, 200, "breaker off");
    let url = format!("{}/search", providers.x402.base());

    let env = BTreeMap::from([("SPENDCAP_URL", base.clone()), ("SPENDCAP_AGENT_TOKEN", token.clone())]);
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_spendcap")).configure(|command| {
        command.arg("mcp").envs(&env);
    });
    let stdio: RunningService<RoleClient, ()> =
        ().serve(TokioChildProcess::new(command).expect("spendcap mcp")).await.expect("stdio handshake");
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(token.clone());
    let remote: RunningService<RoleClient, ()> =
        ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("HTTP handshake");

    // The three paths take turns, call by call, so that whatever else the machine does at a
    // moment weighs on all of them alike.
    let mut fetches: [Vec<Duration>; 3] = Default::default();
    let mut reads: [Vec<Duration>; 3] = Default::default();
    let arguments = json!({"url": url, "task": "bench"});
    for i in 0..WARM_UP + n {
        let counted = i >= WARM_UP;
        let start = Instant::now();
        let response = http
            .post(format!("{base}/v1/x402/fetch"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("bench-api-{i}"))
            .json(&arguments)
            .send()
            .await
            .expect("fetch");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        let elapsed = start.elapsed();
        assert_eq!((status.as_u16(), &body["payment"]["status"]), (200, &json!("settled")), "{body}");
        let start = Instant::now();
        paid(&stdio, "paid_fetch", arguments.clone()).await;
        let stdio_elapsed = start.elapsed();
        let start = Instant::now();
        paid(&remote, "paid_fetch", arguments.clone()).await;
        let remote_elapsed = start.elapsed();

        let start = Instant::now();
        assert_eq!(http.get(format!("{base}/v1/me")).bearer_auth(&token).send().await.expect("me").status(), 200);
        let me_elapsed = start.elapsed();
        let start = Instant::now();
        paid(&stdio, "get_budget", json!({})).await;
        let stdio_me = start.elapsed();
        let start = Instant::now();
        paid(&remote, "get_budget", json!({})).await;
        let remote_me = start.elapsed();
        if counted {
            for (row, value) in fetches.iter_mut().zip([elapsed, stdio_elapsed, remote_elapsed]) {
                row.push(value);
            }
            for (row, value) in reads.iter_mut().zip([me_elapsed, stdio_me, remote_me]) {
                row.push(value);
            }
        }
    }
    let figures = |mut latencies: Vec<Duration>| {
        latencies.sort();
        (percentile(&latencies, 0.5), percentile(&latencies, 0.9))
    };
    let [api_fetch, stdio_fetch, http_fetch] = fetches.map(figures);
    let [api_me, stdio_me, http_me] = reads.map(figures);
    let paid_micros = providers.x402.received_micros();
    assert_eq!(paid_micros, 3 * (n + WARM_UP) as u64 * 20_000, "every measured fetch paid once");

    println!("MCP face latency, {n} sequential calls per row (p50 / p90):");
    let rows = [
        ("paid x402 fetch, HTTP API (POST /v1/x402/fetch)", api_fetch),
        ("paid x402 fetch, MCP stdio (spendcap mcp → HTTP API)", stdio_fetch),
        ("paid x402 fetch, MCP streamable HTTP (/mcp, in process)", http_fetch),
        ("budget read, HTTP API (GET /v1/me)", api_me),
        ("budget read, MCP stdio (get_budget)", stdio_me),
        ("budget read, MCP streamable HTTP (get_budget)", http_me),
    ];
    for (name, (p50, p90)) in rows {
        println!("  {name:<58} {:>10} / {:>10}", ms(p50), ms(p90));
    }
    let _ = stdio.cancel().await;
    let _ = remote.cancel().await;
}
