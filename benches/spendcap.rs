//! The benchmark table: `cargo bench --bench spendcap`.
//!
//! In one run on this machine, against a private `redis-server` for each stage:
//! 1. the reference: a minimal check + INCRBY + XADD Lua script under `redis-benchmark`
//!    (`../shared/tools/redis-reference`, 50 clients, no pipelining);
//! 2. spendcap's own `spendcap_hold` and `spendcap_settle` functions under `redis-benchmark`
//!    (same 50 clients, 10,000 agents); stages 1 and 2 run five times, interleaved, and each
//!    of their figures is the median of its five runs;
//! 3. the same hold function called from Rust through `RedisLedger` at the same concurrency;
//! 4. paid calls through the HTTP API of a `spendcap serve` process: generic hold + settle
//!    pairs, x402 fetches, ACP checkouts, AP2 payments and keyed-API (LLM) calls, straight and
//!    through the daemon, with the streaming time to first byte (the providers are `spendcap::sim`'s
//!    simulated ones, in this process, on loopback);
//! 5. the daemon's resident memory with 1,000 concurrent connections;
//! 6. Redis bytes per agent, per open hold and per log entry.
//!
//! Each figure is printed with its ratio to the reference. Set `SPENDCAP_BENCH_SCALE` (default
//! 1.0) to shorten or lengthen every stage, and `SPENDCAP_BENCH_HTTP_ONLY=1` to run only the
//! generic HTTP pairs of stage 4, three times (for tuning the daemon), or
//! `SPENDCAP_BENCH_API_ONLY=1` to run only the keyed-API rows, or
//! `SPENDCAP_BENCH_PURCHASES_ONLY=1` to run only the x402, ACP, AP2 and keyed-API purchase rows,
//! each with the CPU time it took per purchase in the daemon, in Redis and in this process (the
//! simulated providers and the load generator): a figure that depends little on the machine's
//! other load.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters::{Micros, Protocol};
use rand::Rng;
use spendcap::identity::{AgentId, HoldId, TokenHash, TreeId};
use spendcap::ledger::{Caller, HoldOutcome, HoldRequest, RedisConfig, RedisLedger};
use spendcap::sim::Providers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENTS: u64 = 10_000;
const CONCURRENCY: usize = 50;
/// Rounds of stages 1 and 2 (odd: each figure is the median round's).
const ROUNDS: usize = 5;
const TREE: &str = "be4c000000000000";
const FAR_FUTURE_MS: u64 = 4_000_000_000_000;

fn scale() -> f64 {
    std::env::var("SPENDCAP_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0)
}

fn scaled(n: u64) -> u64 {
    ((n as f64 * scale()) as u64).max(1_000)
}

/// Agent ids shaped so that `redis-benchmark`'s 12-digit `__rand_int__` completes them.
fn agent_id(i: u64) -> String {
    format!("ag_{TREE}_0000{i:012}")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Redis {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("spendcap-bench-{port}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let redis = Redis { port, child, dir };
        for _ in 0..200 {
            if redis.cli(&["PING"]).trim() == "PONG" {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let out =
            Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn used_memory(&self) -> u64 {
        let info = self.cli(&["INFO", "memory"]);
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Figure {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `redis-benchmark --csv` for one command and reads its rps, p50 and p99.
fn redis_benchmark(redis: &Redis, requests: u64, command: &[&str]) -> Figure {
    let out = Command::new("redis-benchmark")
        .args(["-p", &redis.port.to_string(), "-n", &requests.to_string(), "-c", &CONCURRENCY.to_string()])
        .args(["-r", &AGENTS.to_string(), "--csv"])
        .args(command)
        .output()
        .expect("redis-benchmark on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("redis-benchmark printed a result");
    let fields: Vec<f64> = line.split(',').skip(1).map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    Figure { rps: fields[0], p50_ms: fields[3], p99_ms: fields[5] }
}

fn percentiles(mut latencies: Vec<Duration>, elapsed: Duration) -> Figure {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    Figure { rps: latencies.len() as f64 / elapsed.as_secs_f64(), p50_ms: at(0.50), p99_ms: at(0.99) }
}

fn reference_tool() -> PathBuf {
    std::env::var("SPENDCAP_REDIS_REFERENCE").map(PathBuf::from).unwrap_or_else(|_| {
        let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/redis-reference");
        if local.exists() {
            local
        } else {
            PathBuf::from("/work/shared/tools/redis-reference")
        }
    })
}

fn reference_once() -> (f64, f64) {
    let out = Command::new(reference_tool()).output().expect("runs the redis-reference tool");
    let text = String::from_utf8_lossy(&out.stdout);
    // "reference: N requests/s, p50 X ms"
    let rps = text.split("reference: ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok());
    let p50 = text.split("p50 ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok());
    match (rps, p50) {
        (Some(rps), Some(p50)) => (rps, p50),
        _ => panic!("redis-reference printed {text:?}"),
    }
}

async fn load_library_and_agents(redis: &Redis) -> RedisLedger {
    let config = RedisConfig {
        url: redis.url(),
        cluster: false,
        namespace: "sc".into(),
        timeout: Duration::from_secs(5),
        clock: spendcap::ledger::LedgerClock::Redis,
    };
    let ledger = RedisLedger::connect(&config).await.expect("connects and loads the library");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let token = TokenHash::of("bench-token");
    for chunk in (0..AGENTS).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("FCALL")
                .arg("spendcap_create_agent")
                .arg(1)
                .arg(format!("sc:{{{TREE}}}"))
                .arg(1)
                .arg(agent_id(*i))
                .arg(format!("bench-{i}"))
                .arg("")
                .arg(Micros::MAX.get())
                .arg("")
                .arg("{}")
                .arg(token.as_str())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("creates agents");
    }
    ledger
}

/// Open holds of one agent, with known ids, for the settle benchmark.
async fn precreate_holds(redis: &Redis, count: u64) {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    for chunk in (0..count).collect::<Vec<_>>().chunks(2_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("FCALL")
                .arg("spendcap_hold")
                .arg(1)
                .arg(format!("sc:{{{TREE}}}"))
                .arg(1)
                .arg(agent_id(0))
                .arg("*")
                .arg(1)
                .arg(format!("hd_{TREE}_{i:024}"))
                .arg(FAR_FUTURE_MS)
                .arg("task")
                .arg("api.example.com")
                .arg("generic")
                .arg("")
                .arg("")
                .arg("")
                .arg(86_400_000)
                .arg("final")
                .arg(0)
                .arg("")
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("creates holds");
    }
}

async fn rust_ledger(ledger: Arc<RedisLedger>, total: u64) -> Figure {
    let tree: TreeId = TREE.parse().expect("tree id");
    let token = TokenHash::of("bench-token");
    clients(total, move |_, _| {
        let (ledger, tree, token) = (ledger.clone(), tree.clone(), token.clone());
        async move {
            let i = rand::thread_rng().gen_range(0..AGENTS);
            let agent: AgentId = agent_id(i).parse().expect("agent id");
            let request = HoldRequest {
                agent,
                caller: Caller::Agent(token),
                hold_id: HoldId::generate(&tree),
                amount: Micros::positive(1).expect("amount"),
                expires: spendcap::ledger::HoldExpiry::At(FAR_FUTURE_MS),
                task: "task".into(),
                service: "api.example.com".into(),
                protocol: Protocol::Generic,
                idempotency: None,
                details: String::new(),
                buckets: Vec::new(),
            };
            let outcome = ledger.hold(1, &request).await.expect("hold");
            assert!(matches!(outcome, HoldOutcome::Granted(_)), "{outcome:?}");
        }
    })
    .await
}

struct Daemon {
    child: Child,
    base: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ADMIN: &str = "bench-admin-token-0123456789abcdef0123456789";

/// The x402 test vector's key (a public test key), which the daemon signs with in the benchmark.
const X402_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// A `spendcap serve` process on `redis`, configured for the simulated ACP and AP2 providers.
async fn start_daemon(redis: &Redis, providers: &Providers) -> Daemon {
    let port = free_port();
    let key = std::env::temp_dir().join(format!("spendcap-bench-key-{port}.pem"));
    let config_dir = std::env::temp_dir().join(format!("spendcap-bench-config-{port}"));
    std::fs::create_dir_all(&config_dir).expect("config directory");
    let child = Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .arg("serve")
        .envs(providers.daemon_env(&config_dir).expect("provider configuration"))
        .env("SPENDCAP_X402_PRIVATE_KEY", X402_KEY)
        .env("SPENDCAP_X402_ALLOW_PRIVATE", "127.0.0.1")
        .env("SPENDCAP_LISTEN", format!("127.0.0.1:{port}"))
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("SPENDCAP_ADMIN_TOKEN", ADMIN)
        .env("SPENDCAP_RECEIPT_KEY", &key)
        .env("SPENDCAP_LOG", "warn")
        .env("SPENDCAP_SWEEP_INTERVAL_SECS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spendcap binary");
    let daemon = Daemon { child, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    for _ in 0..500 {
        if http.get(format!("{}/healthz", daemon.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            return daemon;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the daemon did not start");
}

/// A minimal HTTP/1.1 keep-alive client for the hold + settle stage. The load generator shares
/// the machine's two cores with the daemon and Redis, so every microsecond it spends is one the
/// daemon does not get: this client writes prebuilt request bytes and reads one response by its
/// `Content-Length`, about a third of what a general-purpose client costs per request (as
/// `wrk` is to curl). The protocol stages keep `reqwest`.
struct RawHttp {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    request: Vec<u8>,
}

impl RawHttp {
    async fn connect(base: &str) -> RawHttp {
        let address = base.trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(address).await.expect("connect to the daemon");
        stream.set_nodelay(true).expect("nodelay");
        RawHttp { stream, buf: Vec::with_capacity(4096), request: Vec::with_capacity(512) }
    }

    /// POSTs `body` (JSON) with `token` and returns the status and the response body.
    async fn post(&mut self, path: &str, token: &str, body: &[u8]) -> (u16, &[u8]) {
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .expect("request head");
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await.expect("send");
        self.buf.clear();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buf).expect("an HTTP response") {
                let status = response.code.expect("status");
                let length: usize = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).expect("length").parse().expect("length"))
                    .expect("the daemon answers with a Content-Length");
                while self.buf.len() < head + length {
                    self.read_more().await;
                }
                return (status, &self.buf[head..head + length]);
            }
            self.read_more().await;
        }
    }

    async fn read_more(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the daemon closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

/// Generic paid calls: each client hold 2,000 micros then settle 1,500 of it (a signed, chained
/// receipt), on one of 100 agents at random, over one keep-alive connection per client.
async fn http_paid_calls(daemon: &Daemon, pairs: u64) -> (Figure, Figure, Figure) {
    let http = reqwest::Client::new();
    let mut tokens = Vec::new();
    let batch: u32 = rand::thread_rng().gen();
    for i in 0..100 {
        tokens.push(bench_agent(&http, daemon, &format!("http-{batch:08x}-{i}")).await);
    }
    let tokens = Arc::new(tokens);
    let per_task = pairs / CONCURRENCY as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let tokens = tokens.clone();
            let base = daemon.base.clone();
            tokio::spawn(async move {
                let mut conn = RawHttp::connect(&base).await;
                let hold_body = br#"{"amount_micros":2000,"service":"api.example.com","task":"bench"}"#;
                let settle_body = br#"{"amount_micros":1500}"#;
                let (mut holds, mut settles, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..per_task {
                    let token = &tokens[rand::thread_rng().gen_range(0..tokens.len())];
                    let t = Instant::now();
                    let (status, body) = conn.post("/v1/holds", token, hold_body).await;
                    assert_eq!(status, 201, "{}", String::from_utf8_lossy(body));
                    let hold: serde_json::Value = serde_json::from_slice(body).expect("json");
                    let id = hold["hold_id"].as_str().expect("granted").to_owned();
                    let held = t.elapsed();
                    let t2 = Instant::now();
                    let (status, body) = conn.post(&format!("/v1/holds/{id}/settle"), token, settle_body).await;
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
                    settles.push(t2.elapsed());
                    holds.push(held);
                    pairs.push(t.elapsed());
                }
                (holds, settles, pairs)
            })
        })
        .collect();
    let (mut holds, mut settles, mut pairs_lat) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (h, s, p) = task.await.expect("task");
        holds.extend(h);
        settles.extend(s);
        pairs_lat.extend(p);
    }
    let elapsed = start.elapsed();
    (percentiles(pairs_lat, elapsed), percentiles(holds, elapsed), percentiles(settles, elapsed))
}

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/x402").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

fn base64_json(value: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(value).expect("serializes"))
}

/// A local x402 v2 resource: 402 without a payment header, the resource with one.
async fn x402_resource() -> wiremock::MockServer {
    use wiremock::matchers::{header_exists, path};
    use wiremock::{Mock, ResponseTemplate};
    let server = wiremock::MockServer::start().await;
    let mut required = fixture("v2_payment_required.json");
    required["accepts"][0]["amount"] = serde_json::json!("1000");
    Mock::given(path("/data"))
        .and(header_exists("payment-signature"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("payment-response", base64_json(&fixture("settlement_success.json")))
                .set_body_raw(r#"{"data":"paid"}"#, "application/json"),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/data"))
        .respond_with(
            ResponseTemplate::new(402)
                .insert_header("payment-required", base64_json(&required))
                .set_body_json(serde_json::json!({})),
        )
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

/// Paid fetches through the daemon vs direct fetches of the same resource (with a payment
/// header already in hand), at the same concurrency; and the cost of one signature.
async fn x402_stage(daemon: &Daemon, fetches: u64) -> (Figure, Figure, Duration) {
    use adapters::x402::{choose, parse_payment_required, sign_payment, EvmSigner, Nonce, PaymentTerms, Policy};
    let server = x402_resource().await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let token = Arc::new(bench_agent(&http, daemon, "x402-bench").await);

    // Signing cost: the daemon's own code path for one authorization.
    let mut headers = reqwest::header::HeaderMap::new();
    let mut required = fixture("v2_payment_required.json");
    required["accepts"][0]["amount"] = serde_json::json!("1000");
    headers.insert("payment-required", base64_json(&required).parse().expect("header"));
    let parsed = parse_payment_required(&headers, b"{}").expect("parses");
    let choice =
        choose(&parsed, &Policy::with_default_assets(Micros::new(1_000_000).expect("m"), 600)).expect("payable");
    let signer = EvmSigner::from_hex(X402_KEY).expect("key");
    let signatures = 2_000;
    let start = Instant::now();
    let mut header = None;
    for _ in 0..signatures {
        let payment = sign_payment(
            &choice,
            &signer,
            &PaymentTerms { nonce: Nonce::random(), now_secs: 1_800_000_000, payment_id: None },
        )
        .expect("signs");
        header = Some(payment.to_header());
    }
    let per_signature = start.elapsed() / signatures;
    let (name, value) = header.expect("a signed header").expect("the header encodes");

    let url = format!("{}/data", server.uri());
    let client = http.clone();
    let direct = clients(fetches, move |_, _| {
        let (http, url, name, value) = (client.clone(), url.clone(), name.clone(), value.clone());
        async move {
            let response = http.get(&url).header(name, value).send().await.expect("direct");
            assert_eq!(response.status(), 200);
            let _ = response.bytes().await;
        }
    })
    .await;

    let (base, resource) = (daemon.base.clone(), server.uri());
    let paid = clients(fetches, move |c, i| {
        let (http, base, resource, token) = (http.clone(), base.clone(), resource.clone(), token.clone());
        async move {
            // A distinct URL per fetch: the same purchase again would be replayed, not paid.
            let body: serde_json::Value = http
                .post(format!("{base}/v1/x402/fetch"))
                .bearer_auth(token.as_str())
                .json(&serde_json::json!({ "url": format!("{resource}/data?c={c}&i={i}"), "task": "bench" }))
                .send()
                .await
                .expect("fetch")
                .json()
                .await
                .expect("json");
            assert_eq!(body["payment"]["status"], "settled", "{body}");
        }
    })
    .await;
    (direct, paid, per_signature)
}

/// Paid fetches of the simulated provider's metered resource (x402 `upto`) through the daemon:
/// 402 for a $0.30 maximum, hold it, sign the Permit2 witness authorization, retry, settle the
/// $0.001 the provider reports it used (the provider verifies each permit's signature).
async fn x402_upto_stage(daemon: &Daemon, providers: &Providers, fetches: u64) -> Figure {
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let token = Arc::new(bench_agent(&http, daemon, "x402-upto-bench").await);
    let (base, resource) = (daemon.base.clone(), providers.x402.base().to_owned());
    clients(fetches, move |c, i| {
        let (http, base, resource, token) = (http.clone(), base.clone(), resource.clone(), token.clone());
        async move {
            let body: serde_json::Value = http
                .post(format!("{base}/v1/x402/fetch"))
                .bearer_auth(token.as_str())
                .json(&serde_json::json!({ "url": format!("{resource}/summarise?used=1000&c={c}&i={i}"), "task": "bench" }))
                .send()
                .await
                .expect("fetch")
                .json()
                .await
                .expect("json");
            assert_eq!(body["payment"]["status"], "settled", "{body}");
            assert_eq!(body["payment"]["amount_micros"], 1000, "{body}");
        }
    })
    .await
}

/// Runs `total` calls from `CONCURRENCY` clients; `call(client, i)` makes one and returns once
/// it has checked the answer. The latency of each call and the overall rate.
async fn clients<F, Fut>(total: u64, call: F) -> Figure
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_client = total / CONCURRENCY as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|c| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in 0..per_client {
                    let t = Instant::now();
                    call(c, i).await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    percentiles(all, start.elapsed())
}

/// An agent with no cap to speak of and no runaway-loop breaker (the same hold again and again
/// is what the default breaker stops); its token.
async fn bench_agent(http: &reqwest::Client, daemon: &Daemon, handle: &str) -> String {
    let created: serde_json::Value = http
        .post(format!("{}/v1/agents", daemon.base))
        .bearer_auth(ADMIN)
        .json(
            &serde_json::json!({ "handle": handle, "cap_micros": Micros::MAX.get(), "controls": { "breaker": null } }),
        )
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    created["token"].as_str().expect("token").to_owned()
}

/// ACP purchases through the daemon, each of one item from the simulated merchant: create the
/// session, read it, hold, delegate the card at the PSP, complete, settle + receipt.
async fn acp_stage(daemon: &Daemon, providers: &Providers, purchases: u64) -> Figure {
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let token = Arc::new(bench_agent(&http, daemon, "acp-bench").await);
    let base = daemon.base.clone();
    let charged_before = providers.acp.charged_cents();
    let figure = clients(purchases, move |c, i| {
        let (http, token, base) = (http.clone(), token.clone(), base.clone());
        async move {
            let body: serde_json::Value = http
                .post(format!("{base}/v1/acp/checkouts"))
                .bearer_auth(token.as_str())
                .header("Idempotency-Key", format!("acp-bench-{c}-{i}"))
                .json(&serde_json::json!({ "merchant": spendcap::sim::ACP_MERCHANT,
                                           "items": [{ "id": "report_market" }], "task": "bench" }))
                .send()
                .await
                .expect("checkout")
                .json()
                .await
                .expect("json");
            assert_eq!(body["status"], "completed", "{body}");
        }
    })
    .await;
    let purchases = purchases / CONCURRENCY as u64 * CONCURRENCY as u64;
    assert_eq!(providers.acp.charged_cents() - charged_before, purchases * 45, "the merchant was paid every purchase");
    figure
}

/// MPP paid fetches through the daemon: 402 with a `Payment` challenge, choose, hold, mint the
/// Shared Payment Token at the simulated PSP, retry with `Authorization: Payment`, settle +
/// receipt on the `Payment-Receipt`. The shop must have charged exactly what the ledger settled.
async fn mpp_stage(daemon: &Daemon, providers: &Providers, fetches: u64) -> Figure {
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let token = Arc::new(bench_agent(&http, daemon, "mpp-bench").await);
    let (base, resource) = (daemon.base.clone(), providers.mpp.base().to_owned());
    let charged_before = providers.mpp.charged_micros();
    let figure = clients(fetches, move |c, i| {
        let (http, base, resource, token) = (http.clone(), base.clone(), resource.clone(), token.clone());
        async move {
            let body: serde_json::Value = http
                .post(format!("{base}/v1/mpp/fetch"))
                .bearer_auth(token.as_str())
                .json(&serde_json::json!({ "url": format!("{resource}/data?c={c}&i={i}"), "task": "bench" }))
                .send()
                .await
                .expect("fetch")
                .json()
                .await
                .expect("json");
            assert_eq!(body["payment"]["status"], "settled", "{body}");
        }
    })
    .await;
    let fetches = fetches / CONCURRENCY as u64 * CONCURRENCY as u64;
    assert_eq!(
        providers.mpp.charged_micros() - charged_before,
        fetches * spendcap::sim::MPP_PRICE_CENTS * 10_000,
        "the shop was paid every fetch, once"
    );
    figure
}

/// AP2 v0.2 payments through the daemon, for checkouts the simulated merchant signed beforehand:
/// verify the open mandates and the checkout, hold against the caps and the mandate's budget,
/// sign the closed mandates, get a token from the Credential Provider, complete at the merchant,
/// verify both receipts, settle + receipt. A mandate's budget allows one outstanding payment at a
/// time, so each client is its own agent with its own mandates.
async fn ap2_stage(daemon: &Daemon, providers: &Providers, payments: u64) -> Figure {
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let per_client = payments / CONCURRENCY as u64;
    let terms = spendcap::sim::ap2::MandateTerms {
        items: &["sku_company_profile"],
        budget_cents: 100_000_000,
        max_payment_cents: 100,
        valid_secs: 3600,
    };
    let mut agents = Vec::new();
    for c in 0..CONCURRENCY {
        let token = bench_agent(&http, daemon, &format!("ap2-bench-{c}")).await;
        let key: serde_json::Value = http
            .get(format!("{}/v1/ap2/key", daemon.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("key")
            .json()
            .await
            .expect("json");
        let jwk = serde_json::from_value(key["jwk"].clone()).expect("a public JWK");
        let mandates = providers.ap2.issue_mandates(&jwk, &terms).expect("mandates");
        // The carts are the merchant's work, not the daemon's: made before the clock starts.
        let mut carts = Vec::new();
        for _ in 0..per_client {
            let cart: serde_json::Value = http
                .post(format!("{}/checkouts", providers.ap2.merchant_base()))
                .json(&serde_json::json!({ "items": ["sku_company_profile"] }))
                .send()
                .await
                .expect("cart")
                .json()
                .await
                .expect("json");
            carts.push(cart["checkout_jwt"].as_str().expect("checkout JWT").to_owned());
        }
        agents.push((token, mandates, carts));
    }
    let agents = Arc::new(agents);
    let base = daemon.base.clone();
    let paid_before = providers.ap2.paid_cents();
    let figure = clients(payments, move |c, i| {
        let (http, base, agents) = (http.clone(), base.clone(), agents.clone());
        async move {
            let (token, mandates, carts) = &agents[c];
            let body: serde_json::Value = http
                .post(format!("{base}/v1/ap2/payments"))
                .bearer_auth(token)
                .json(
                    &serde_json::json!({ "checkout_jwt": carts[i as usize], "open_checkout_mandate": mandates.checkout,
                                           "open_payment_mandate": mandates.payment, "task": "bench" }),
                )
                .send()
                .await
                .expect("payment")
                .json()
                .await
                .expect("json");
            assert_eq!(body["status"], "paid", "{body}");
        }
    })
    .await;
    let payments = per_client * CONCURRENCY as u64;
    assert_eq!(providers.ap2.paid_cents() - paid_before, payments as i64 * 30, "the merchant was paid every payment");
    figure
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Opens `n` keep-alive connections, has each send requests, and reads the daemon's RSS while
/// all of them are open.
/// A server's resident memory before and while `n` connections are open, each having sent
/// `request` three times.
async fn rss_at_connections(pid: u32, addr: &str, request: &'static [u8], n: usize) -> (u64, u64) {
    let idle = rss_kib(pid);
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let done = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = addr.to_owned();
        let barrier = barrier.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
            let mut buf = vec![0u8; 4096];
            for _ in 0..3 {
                stream.write_all(request).await.expect("write");
                let _ = stream.read(&mut buf).await.expect("read");
            }
            barrier.wait().await;
            done.wait().await;
            drop(stream);
        }));
    }
    barrier.wait().await;
    let loaded = rss_kib(pid);
    done.wait().await;
    for task in tasks {
        task.await.expect("connection task");
    }
    (idle, loaded)
}

/// The reference script's own data, for the memory figures' ratios: the script (read from the
/// `redis-reference` tool) run 100,000 times over 10,000 agents into one stream, then the bytes
/// of one agent's counter and of one log entry.
async fn reference_memory(redis: &Redis) -> (u64, u64) {
    let tool = std::fs::read_to_string(reference_tool()).expect("the redis-reference tool");
    let script =
        tool.split("script='").nth(1).and_then(|rest| rest.split("'\n").next()).expect("the tool's script").to_owned();
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client.get_multiplexed_async_connection().await.expect("connection");
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(&script).query_async(&mut con).await.expect("load");
    const RUNS: u64 = 100_000;
    for batch in 0..RUNS / 1_000 {
        let mut pipe = redis::pipe();
        for i in 0..1_000 {
            let agent = (batch * 1_000 + i) % AGENTS;
            pipe.cmd("EVALSHA")
                .arg(&sha)
                .arg(2)
                .arg(format!("agent:{agent}:spent"))
                .arg("agent:log")
                .arg(5)
                .arg(100_000_000_000u64)
                .ignore();
        }
        let () = pipe.query_async(&mut con).await.expect("reference script");
    }
    let per_agent = memory_usage(redis, "agent:1:spent");
    let per_entry = memory_usage(redis, "agent:log") / RUNS;
    (per_agent, per_entry)
}

fn memory_usage(redis: &Redis, key: &str) -> u64 {
    redis.cli(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).trim().parse().unwrap_or(0)
}

/// Stage 2a: `spendcap_hold` under `redis-benchmark` on a fresh Redis with 10,000 agents.
fn hold_stage(runtime: &tokio::runtime::Runtime) -> Figure {
    let redis = Redis::start();
    let _ledger = runtime.block_on(load_library_and_agents(&redis));
    let hold_requests = scaled(300_000);
    redis_benchmark(
        &redis,
        hold_requests,
        &[
            "FCALL",
            "spendcap_hold",
            "1",
            &format!("sc:{{{TREE}}}"),
            "1",
            &format!("ag_{TREE}_0000__rand_int__"),
            "*",
            "1",
            "",
            &FAR_FUTURE_MS.to_string(),
            "task",
            "api.example.com",
            "generic",
            "",
            "",
            "",
            "86400000",
            "final",
            "0",
            "",
        ],
    )
}

/// Stage 2b: `spendcap_settle` under `redis-benchmark` on a fresh Redis with 5× as many open
/// holds as settles; also how many distinct holds were settled.
fn settle_stage(runtime: &tokio::runtime::Runtime) -> (Figure, u64) {
    let redis = Redis::start();
    let ledger = runtime.block_on(load_library_and_agents(&redis));
    drop(ledger);
    let settle_requests = scaled(100_000);
    let open_holds = settle_requests * 5;
    runtime.block_on(precreate_holds(&redis, open_holds));
    // Random hold ids over 5x as many open holds: about 10% of settles replay an earlier one.
    let settle = Command::new("redis-benchmark")
        .args(["-p", &redis.port.to_string(), "-n", &settle_requests.to_string(), "-c", &CONCURRENCY.to_string()])
        .args(["-r", &open_holds.to_string(), "--csv"])
        .args(["FCALL", "spendcap_settle", "1", &format!("sc:{{{TREE}}}"), "1", &agent_id(0), "*"])
        .arg(format!("hd_{TREE}_000000000000__rand_int__"))
        .args(["1", ""])
        .output()
        .expect("redis-benchmark");
    let settle = {
        let text = String::from_utf8_lossy(&settle.stdout);
        let fields: Vec<f64> = text
            .lines()
            .last()
            .expect("result")
            .split(',')
            .skip(1)
            .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
            .collect();
        Figure { rps: fields[0], p50_ms: fields[3], p99_ms: fields[5] }
    };
    let settled: u64 = redis.cli(&["LLEN", &format!("sc:{{{TREE}}}:receipts")]).trim().parse().unwrap_or(0);
    (settle, settled)
}

/// Keyed-API calls (OpenAI chat completions) to the simulated LLM provider, straight and through
/// the daemon (`/v1/apis/openai/...`: hold the bound, forward with the owner's key, settle from
/// the usage + receipt). Returns the non-streaming latency straight and through, and the
/// streaming time to first byte straight and through.
async fn api_stage(daemon: &Daemon, providers: &Providers, calls: u64) -> (Figure, Figure, Figure, Figure) {
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build().expect("client");
    let token = bench_agent(&http, daemon, "api-bench").await;
    let straight = (format!("{}/v1/chat/completions", providers.llm.base()), format!("Bearer {}", providers.llm.key()));
    let through = (format!("{}/v1/apis/openai/v1/chat/completions", daemon.base), format!("Bearer {token}"));
    let body = |stream: bool| {
        serde_json::json!({ "model": "sim-gpt", "max_completion_tokens": 9, "stream": stream,
            "messages": [ { "role": "user", "content": "Say hello" } ] })
    };
    let mut figures = Vec::new();
    for (url, auth) in [straight.clone(), through.clone()] {
        let (http, request) = (http.clone(), body(false));
        figures.push(
            clients(calls, move |_, _| {
                let (http, url, auth, request) = (http.clone(), url.clone(), auth.clone(), request.clone());
                async move {
                    let response =
                        http.post(&url).header("authorization", auth).json(&request).send().await.expect("call");
                    assert_eq!(response.status(), 200);
                    let answer: serde_json::Value = response.json().await.expect("json");
                    assert_eq!(answer["usage"]["completion_tokens"], 9, "{answer}");
                }
            })
            .await,
        );
    }
    for (url, auth) in [straight, through] {
        figures.push(first_byte(&http, calls, &url, &auth, body(true)).await);
    }
    (figures[0], figures[1], figures[2], figures[3])
}

/// Time to the first body byte of a streaming call, from `CONCURRENCY` clients; each stream is
/// then read to its end.
async fn first_byte(http: &reqwest::Client, total: u64, url: &str, auth: &str, request: serde_json::Value) -> Figure {
    let per_client = total / CONCURRENCY as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, url, auth, request) = (http.clone(), url.to_owned(), auth.to_owned(), request.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for _ in 0..per_client {
                    let t = Instant::now();
                    let mut response =
                        http.post(&url).header("authorization", &auth).json(&request).send().await.expect("call");
                    assert_eq!(response.status(), 200);
                    let first = response.chunk().await.expect("first chunk");
                    latencies.push(t.elapsed());
                    assert!(first.is_some_and(|chunk| !chunk.is_empty()));
                    while response.chunk().await.expect("chunk").is_some() {}
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    percentiles(all, start.elapsed())
}

fn api_lines(straight: &Figure, through: &Figure, ttfb_straight: &Figure, ttfb_through: &Figure) -> Vec<String> {
    vec![
        format!(
            "| keyed API: OpenAI chat completion straight to the (simulated) upstream, 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | | |",
            straight.rps, straight.p50_ms, straight.p99_ms
        ),
        format!(
            "| keyed API: the same through the daemon (hold bound, owner's key, settle from usage + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | | |",
            through.rps, through.p50_ms, through.p99_ms
        ),
        format!(
            "| — added by the daemon | | +{:.3} ms | +{:.3} ms | | |",
            through.p50_ms - straight.p50_ms,
            through.p99_ms - straight.p99_ms
        ),
        format!(
            "| keyed API: streaming time to first byte, straight / through the daemon, 50 clients | | {:.3} / {:.3} ms | {:.3} / {:.3} ms | | |",
            ttfb_straight.p50_ms, ttfb_through.p50_ms, ttfb_straight.p99_ms, ttfb_through.p99_ms
        ),
        format!(
            "| — time to first byte added by the daemon | | +{:.3} ms | +{:.3} ms | | |",
            ttfb_through.p50_ms - ttfb_straight.p50_ms,
            ttfb_through.p99_ms - ttfb_straight.p99_ms
        ),
    ]
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) end with `)`.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name, in
    // clock ticks of 1/100 s on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Runs one purchase stage and prints its rate and the CPU per purchase of the daemon, Redis and
/// this process (simulated providers + load generator).
fn cpu_per_purchase<T>(name: &str, purchases: u64, daemon: &Daemon, redis: &Redis, stage: impl FnOnce() -> T) -> T {
    let pids = [daemon.child.id().to_string(), redis.child.id().to_string(), "self".to_owned()];
    let before: Vec<Duration> = pids.iter().map(|pid| cpu_time(pid)).collect();
    let start = Instant::now();
    let result = stage();
    let elapsed = start.elapsed();
    let used: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(pid, before)| (cpu_time(pid).saturating_sub(*before)).as_secs_f64() * 1e6 / purchases as f64)
        .collect();
    println!(
        "{name}: {:.0}/s; CPU per purchase: daemon {:.0} µs, redis {:.0} µs, bench process {:.0} µs",
        purchases as f64 / elapsed.as_secs_f64(),
        used[0],
        used[1],
        used[2]
    );
    result
}

/// The purchase rows only, each with its CPU per purchase (`SPENDCAP_BENCH_PURCHASES_ONLY=1`).
fn purchases_only(runtime: &tokio::runtime::Runtime) {
    let redis = Redis::start();
    let providers = runtime.block_on(Providers::start()).expect("simulated providers");
    let daemon = runtime.block_on(start_daemon(&redis, &providers));
    println!("spendcap benchmark, purchases only — scale {}", scale());
    let x402 = scaled(10_000);
    let (direct, paid, _) = cpu_per_purchase("x402 direct + paid (per paid fetch)", x402, &daemon, &redis, || {
        runtime.block_on(x402_stage(&daemon, x402))
    });
    println!("x402: direct {:.0}/s, paid {:.0}/s ({:.3} of direct)", direct.rps, paid.rps, paid.rps / direct.rps);
    let n = scaled(5_000);
    let acp = cpu_per_purchase("ACP", n, &daemon, &redis, || runtime.block_on(acp_stage(&daemon, &providers, n)));
    println!("ACP: {:.0}/s ({:.3} of direct)", acp.rps, acp.rps / direct.rps);
    let n = scaled(2_000);
    let ap2 = cpu_per_purchase("AP2 (with its set-up)", n, &daemon, &redis, || {
        runtime.block_on(ap2_stage(&daemon, &providers, n))
    });
    println!("AP2: {:.0}/s ({:.3} of direct)", ap2.rps, ap2.rps / direct.rps);
    let n = scaled(10_000);
    let (straight, through, _, _) = cpu_per_purchase("keyed API straight + through + TTFB", n, &daemon, &redis, || {
        runtime.block_on(api_stage(&daemon, &providers, n))
    });
    println!("keyed API: straight {:.0}/s, through the daemon {:.0}/s", straight.rps, through.rps);
    let metrics = runtime
        .block_on(async {
            reqwest::Client::new().get(format!("{}/metrics", daemon.base)).bearer_auth(ADMIN).send().await?.text().await
        })
        .expect("metrics");
    let value = |name: &str| -> f64 {
        metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let (linked, settles) = (value("spendcap_settle_linked_receipts_total"), value("spendcap_settles_total"));
    println!(
        "receipts linked by the settle itself: {linked:.0} of {settles:.0} settles ({:.0}%)",
        100.0 * linked / settles.max(1.0)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if std::env::var_os("SPENDCAP_BENCH_PURCHASES_ONLY").is_some() {
        purchases_only(&runtime);
        return;
    }
    if std::env::var_os("SPENDCAP_BENCH_API_ONLY").is_some() {
        // Only the keyed-API rows, on one daemon.
        let redis = Redis::start();
        let providers = runtime.block_on(Providers::start()).expect("simulated providers");
        let daemon = runtime.block_on(start_daemon(&redis, &providers));
        let (straight, through, ttfb_straight, ttfb_through) =
            runtime.block_on(api_stage(&daemon, &providers, scaled(10_000)));
        println!("spendcap benchmark, keyed APIs only — scale {}", scale());
        for row in api_lines(&straight, &through, &ttfb_straight, &ttfb_through) {
            println!("{row}");
        }
        return;
    }
    if std::env::var_os("SPENDCAP_BENCH_HTTP_ONLY").is_some() {
        // Only stage 4's generic pairs, three runs on one daemon: for tuning the daemon.
        let redis = Redis::start();
        let providers = runtime.block_on(Providers::start()).expect("simulated providers");
        let daemon = runtime.block_on(start_daemon(&redis, &providers));
        for run in 1..=3 {
            let load_generator = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let (pairs, _, _) = load_generator.block_on(http_paid_calls(&daemon, scaled(40_000)));
            println!(
                "HTTP pairs, run {run}: {:.0} pairs/s, p50 {:.3} ms, p99 {:.3} ms",
                pairs.rps, pairs.p50_ms, pairs.p99_ms
            );
        }
        let metrics = runtime
            .block_on(async {
                reqwest::Client::new()
                    .get(format!("{}/metrics", daemon.base))
                    .bearer_auth(ADMIN)
                    .send()
                    .await?
                    .text()
                    .await
            })
            .expect("metrics");
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let (linked, settles) = (value("spendcap_settle_linked_receipts_total"), value("spendcap_settles_total"));
        println!(
            "receipts linked by the settle itself: {linked:.0} of {settles:.0} settles ({:.0}%)",
            100.0 * linked / settles.max(1.0)
        );
        return;
    }
    let mut out = String::new();
    let mut line = |text: String| {
        println!("{text}");
        out.push_str(&text);
        out.push('\n');
    };

    // The memory references: an empty redis-server holding 1,000 connections, then the
    // reference script's own data.
    let (reference_rss, reference_agent_bytes, reference_entry_bytes) = {
        let redis = Redis::start();
        let address = format!("127.0.0.1:{}", redis.port);
        let (_, rss) = runtime.block_on(rss_at_connections(redis.child.id(), &address, b"PING\r\n", 1_000));
        let (agent, entry) = runtime.block_on(reference_memory(&redis));
        (rss, agent, entry)
    };
    // Stages 1 and 2, in five rounds of reference, hold and settle runs; each figure is the
    // median of its five runs. The reference's rate alone moves by ±10% from one run to the
    // next on this machine, so one run of each would make every ratio as noisy as that, and
    // interleaving the runs spreads any slow spell of the machine over all three figures.
    let (mut references, mut holds, mut settles, mut rounds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let reference = reference_once();
        let hold = hold_stage(&runtime);
        let settle = settle_stage(&runtime);
        rounds.push(format!(
            "round {round}: reference {:.0}/s, hold {:.0}/s ({:.2}), settle {:.0}/s ({:.2})",
            reference.0,
            hold.rps,
            hold.rps / reference.0,
            settle.0.rps,
            settle.0.rps / reference.0
        ));
        println!("{}", rounds.last().expect("this round"));
        references.push(reference);
        holds.push(hold);
        settles.push(settle);
    }
    references.sort_by(|a, b| a.0.total_cmp(&b.0));
    holds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    settles.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
    let median = ROUNDS / 2;
    let (reference_rps, reference_p50) = references[median];
    let hold = holds.swap_remove(median);
    let (settle, settled) = settles.swap_remove(median);
    let ratio = |rps: f64| rps / reference_rps;

    // Stage 3: the same hold function from Rust.
    let redis = Redis::start();
    let ledger = Arc::new(runtime.block_on(load_library_and_agents(&redis)));
    let rust = runtime.block_on(rust_ledger(ledger.clone(), scaled(300_000)));
    drop(ledger);
    drop(redis);

    // Stage 4 and 5: the daemon over HTTP.
    let redis = Redis::start();
    let providers = runtime.block_on(Providers::start()).expect("simulated providers");
    let daemon = runtime.block_on(start_daemon(&redis, &providers));
    // The load generator for these pairs runs on one thread: it needs little CPU, and every
    // extra busy thread on the 2 cores is a context switch the daemon and Redis pay for.
    let load_generator = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (pairs, http_hold, http_settle) = load_generator.block_on(http_paid_calls(&daemon, scaled(40_000)));
    drop(load_generator);
    // Stage 6a: Redis bytes per agent, on the generic stage's agents (real ids, tokens, trees);
    // the protocol stages' agents also carry an AP2 key or protocol state.
    let agent_keys = redis.cli(&["--scan", "--pattern", "sc:{*}:a:*"]);
    let agent_keys: Vec<&str> = agent_keys.lines().take(50).collect();
    let per_agent = agent_keys.iter().map(|k| memory_usage(&redis, k)).sum::<u64>() / agent_keys.len().max(1) as u64;
    let (direct, paid, per_signature) = runtime.block_on(x402_stage(&daemon, scaled(10_000)));
    let upto = runtime.block_on(x402_upto_stage(&daemon, &providers, scaled(5_000)));
    let acp = runtime.block_on(acp_stage(&daemon, &providers, scaled(5_000)));
    let ap2 = runtime.block_on(ap2_stage(&daemon, &providers, scaled(2_000)));
    let mpp = runtime.block_on(mpp_stage(&daemon, &providers, scaled(5_000)));
    let (api_straight, api_through, ttfb_straight, ttfb_through) =
        runtime.block_on(api_stage(&daemon, &providers, scaled(10_000)));
    let (rss_idle, rss_loaded) = runtime.block_on(rss_at_connections(
        daemon.child.id(),
        daemon.base.trim_start_matches("http://"),
        b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n",
        1_000,
    ));
    drop(daemon);

    // Stage 6b: Redis bytes per open hold and per log entry.
    drop(redis);
    let redis = Redis::start();
    let ledger = runtime.block_on(load_library_and_agents(&redis));
    drop(ledger);
    let before = redis.used_memory();
    runtime.block_on(precreate_holds(&redis, 100_000));
    let after = redis.used_memory();
    let stream = format!("sc:{{{TREE}}}:log");
    let log_len: u64 = redis.cli(&["XLEN", &stream]).trim().parse().unwrap_or(1);
    let per_log_entry = memory_usage(&redis, &stream) / log_len.max(1);
    // An open hold costs its hash, its expiry entry and its log entry.
    let per_hold_with_log = (after - before) / 100_000;
    drop(redis);

    line(format!(
        "spendcap benchmark — {} cores, scale {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        scale()
    ));
    line(String::new());
    line(format!("Stages 1 and 2 (medians of these): {}.", rounds.join("; ")));
    line(String::new());
    line("| measurement | rate | p50 | p99 | ratio to reference | target |".into());
    line("|---|---|---|---|---|---|".into());
    line(format!(
        "| reference: minimal check + INCRBY + XADD script, redis-benchmark, 50 clients | {reference_rps:.0}/s | {reference_p50:.3} ms | — | 1.00 | — |"
    ));
    line(format!(
        "| `spendcap_hold` FCALL, redis-benchmark, 50 clients, 10,000 agents | {:.0}/s | {:.3} ms | {:.3} ms | {:.2} | ≥ 0.35 |",
        hold.rps, hold.p50_ms, hold.p99_ms, ratio(hold.rps)
    ));
    line(format!(
        "| `spendcap_settle` FCALL (+ receipt facts), redis-benchmark, 50 clients ({settled} settled, rest replays) | {:.0}/s | {:.3} ms | {:.3} ms | {:.2} | ≥ 0.35 |",
        settle.rps, settle.p50_ms, settle.p99_ms, ratio(settle.rps)
    ));
    line(format!(
        "| hold from Rust (`RedisLedger`), 50 tasks | {:.0}/s | {:.3} ms | {:.3} ms | {:.2} ({:.2}× its redis-benchmark rate) | ≥ 0.8× FCALL |",
        rust.rps, rust.p50_ms, rust.p99_ms, ratio(rust.rps), rust.rps / hold.rps
    ));
    line(format!(
        "| HTTP paid calls (hold + settle with signed receipt), 50 clients | {:.0} pairs/s | {:.3} ms | {:.3} ms | {:.3} | ≥ 0.1 |",
        pairs.rps, pairs.p50_ms, pairs.p99_ms, ratio(pairs.rps)
    ));
    line(format!("| — HTTP hold alone | | {:.3} ms | {:.3} ms | | |", http_hold.p50_ms, http_hold.p99_ms));
    line(format!("| — HTTP settle alone | | {:.3} ms | {:.3} ms | | |", http_settle.p50_ms, http_settle.p99_ms));
    line(format!(
        "| x402: direct fetch of a local resource (payment header in hand), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | | |",
        direct.rps, direct.p50_ms, direct.p99_ms
    ));
    line(format!(
        "| x402: paid fetch through the daemon (402, hold, sign, retry, settle + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | {:.3} | |",
        paid.rps, paid.p50_ms, paid.p99_ms, ratio(paid.rps)
    ));
    line(format!(
        "| — added by the daemon | | +{:.3} ms | +{:.3} ms | | |",
        paid.p50_ms - direct.p50_ms,
        paid.p99_ms - direct.p99_ms
    ));
    line(format!(
        "| x402 upto: metered fetch through the daemon (402, hold the maximum, Permit2 signature, retry, settle what was used + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | {:.3} | |",
        upto.rps, upto.p50_ms, upto.p99_ms, ratio(upto.rps)
    ));
    line(format!(
        "| MPP: paid fetch through the daemon (402 + Payment challenge, hold, SPT minted at the PSP, retry, settle + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | {:.3} | |",
        mpp.rps, mpp.p50_ms, mpp.p99_ms, ratio(mpp.rps)
    ));
    line(format!(
        "| — one EIP-3009 / EIP-712 signature (secp256k1), in-process | {:.0}/s | {:.3} ms | | | |",
        1.0 / per_signature.as_secs_f64(),
        per_signature.as_secs_f64() * 1e3
    ));
    line(format!(
        "| ACP: checkout through the daemon (create + read session, hold, PSP delegation, complete, settle + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | {:.3} | |",
        acp.rps, acp.p50_ms, acp.p99_ms, ratio(acp.rps)
    ));
    line(format!(
        "| AP2: payment through the daemon (verify mandates + checkout, hold with mandate budget, sign closed mandates, Credential Provider, merchant, verify receipts, settle + receipt), 50 clients | {:.0}/s | {:.3} ms | {:.3} ms | {:.3} | |",
        ap2.rps, ap2.p50_ms, ap2.p99_ms, ratio(ap2.rps)
    ));
    for row in api_lines(&api_straight, &api_through, &ttfb_straight, &ttfb_through) {
        line(row);
    }
    line(String::new());
    line(format!(
        "daemon RSS: {:.1} MiB after the HTTP load, {:.1} MiB with 1,000 concurrent connections \
         ({:.1}× an empty redis-server's {:.1} MiB with 1,000 connections)",
        rss_idle as f64 / 1024.0,
        rss_loaded as f64 / 1024.0,
        rss_loaded as f64 / reference_rss.max(1) as f64,
        reference_rss as f64 / 1024.0
    ));
    line(format!(
        "Redis bytes: {per_agent} per agent (hash; {:.1}× the reference script's {reference_agent_bytes} B counter), \
         {per_log_entry} per log entry (stream; {:.1}× the reference's {reference_entry_bytes} B entry), \
         {per_hold_with_log} per open hold (hash + expiry index + its log entry)",
        per_agent as f64 / reference_agent_bytes.max(1) as f64,
        per_log_entry as f64 / reference_entry_bytes.max(1) as f64,
    ));

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut file) = std::fs::File::create(dir.join("results.md")) {
        let _ = file.write_all(out.as_bytes());
    }
}
