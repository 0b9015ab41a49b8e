//! Test support: a real `redis-server` per test (so a test can kill and restart it), and
//! `spawn_app()` that runs the daemon on port 0 against it (or against the in-process ledger).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spendcap::api::Limits;
use spendcap::clock::Clock;
use spendcap::identity::AdminToken;
use spendcap::ledger::{Ledger, LedgerClock, MemoryLedger, RedisConfig, RedisLedger};
use spendcap::protocols::ProtocolConfig;
use spendcap::receipt::ReceiptSigner;
use spendcap::server::{self, Config, LedgerConfig};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123456789";

/// Waits for `condition` to hold, polling, until `deadline` passes.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A private `redis-server` on a free loopback port, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("spendcap-redis-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = RedisServer {
            port: free_port(),
            dir,
            child: std::sync::Mutex::new(None),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--dir"])
            .arg(&self.dir)
            .args(["--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        *self.child.lock().expect("lock") = Some(child);
        let start = Instant::now();
        while self.cli(&["PING"]).map(|o| o.trim() != "PONG").unwrap_or(true) {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let output = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the server a signal (`STOP` pauses it mid-whatever, `CONT` resumes it).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.lock().expect("lock").as_ref().expect("running").id();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn restart(&self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

pub fn redis_config(redis: &RedisServer, namespace: &str) -> RedisConfig {
    RedisConfig {
        url: redis.url(),
        cluster: false,
        namespace: namespace.to_owned(),
        timeout: Duration::from_secs(2),
        clock: LedgerClock::Caller,
    }
}

/// A ledger for the conformance suite, with the Redis server it needs (if any).
pub async fn ledger(backend: Backend) -> (Ledger, Option<RedisServer>) {
    match backend {
        Backend::Memory => (Ledger::Memory(MemoryLedger::new()), None),
        Backend::Redis => {
            let redis = RedisServer::start();
            let ledger = RedisLedger::connect(&redis_config(&redis, "t")).await.expect("connects");
            (Ledger::Redis(ledger), Some(redis))
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub clock: Clock,
    pub http: reqwest::Client,
    pub redis: Option<Arc<RedisServer>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub struct AppOptions {
    pub backend: Backend,
    /// Share a Redis server (and namespace) with another instance.
    pub redis: Option<(Arc<RedisServer>, String)>,
    pub clock: Clock,
    pub limits: Limits,
    pub signer_pem: Option<PathBuf>,
    pub protocols: ProtocolConfig,
    /// Any other Redis (a cluster, say); takes precedence over `redis`.
    pub redis_config: Option<RedisConfig>,
    pub alerts: Option<spendcap::alerts::AlertConfig>,
    /// `SPENDCAP_MAX_CLOCK_SKEW_MS`.
    pub max_clock_skew: Duration,
}

impl Default for AppOptions {
    fn default() -> AppOptions {
        AppOptions {
            backend: Backend::Redis,
            redis: None,
            clock: Clock::system(),
            limits: Limits::default(),
            signer_pem: None,
            protocols: ProtocolConfig::default(),
            redis_config: None,
            alerts: None,
            max_clock_skew: Duration::from_secs(2),
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let (ledger, redis) = match (options.backend, options.redis) {
        (Backend::Memory, _) => (LedgerConfig::Memory, None),
        (Backend::Redis, redis) if options.redis_config.is_some() => {
            (LedgerConfig::Redis(options.redis_config.clone().expect("checked")), redis.map(|(r, _)| r))
        }
        (Backend::Redis, Some((redis, namespace))) => {
            (LedgerConfig::Redis(redis_config(&redis, &namespace)), Some(redis))
        }
        (Backend::Redis, None) => {
            let redis = Arc::new(RedisServer::start());
            (LedgerConfig::Redis(redis_config(&redis, "sc")), Some(redis))
        }
    };
    let signer = match &options.signer_pem {
        Some(path) => ReceiptSigner::load_or_create(path).expect("receipt key"),
        None => ReceiptSigner::generate(),
    };
    let config = Config {
        ledger,
        admin_token: AdminToken::new(ADMIN_TOKEN.into()).expect("valid admin token"),
        signer,
        limits: options.limits,
        clock: options.clock.clone(),
        protocols: options.protocols,
        sweep_interval: None,
        alerts: options.alerts,
        max_clock_skew: options.max_clock_skew,
    };
    let state = server::build_state(config).await.expect("daemon starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = state.clone();
    tokio::spawn(async move {
        let _ = server::serve(served, listener, None, async {
            let _ = rx.await;
        })
        .await;
    });
    TestApp {
        base: format!("http://{addr}"),
        clock: options.clock,
        http: reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("client"),
        redis,
        shutdown: Some(tx),
    }
}

pub struct Agent {
    pub id: String,
    pub token: String,
    pub tree: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn agent_call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn create_agent(&self, handle: &str, cap: u64, parent: Option<&str>) -> Agent {
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                "/v1/agents",
                Some(json!({ "handle": handle, "cap_micros": cap, "parent": parent })),
            )
            .await;
        assert_eq!(status, 201, "create agent {handle}: {body}");
        Agent {
            id: body["agent"]["id"].as_str().expect("id").to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
            tree: body["agent"]["tree"].as_str().expect("tree").to_owned(),
        }
    }

    pub async fn hold(&self, agent: &Agent, amount: u64) -> (u16, Value) {
        self.agent_call(
            &agent.token,
            reqwest::Method::POST,
            "/v1/holds",
            Some(json!({ "amount_micros": amount, "service": "api.example.com", "task": "test" })),
        )
        .await
    }

    pub async fn settle(&self, agent: &Agent, hold: &str, amount: u64) -> (u16, Value) {
        self.agent_call(
            &agent.token,
            reqwest::Method::POST,
            &format!("/v1/holds/{hold}/settle"),
            Some(json!({ "amount_micros": amount })),
        )
        .await
    }

    pub async fn show(&self, agent: &str) -> Value {
        let (status, body) = self.admin(reqwest::Method::GET, &format!("/v1/agents/{agent}"), None).await;
        assert_eq!(status, 200, "show {agent}: {body}");
        body
    }

    /// The whole log as JSON entries.
    pub async fn log(&self) -> Vec<Value> {
        let response = self.http.get(self.url("/v1/log")).bearer_auth(ADMIN_TOKEN).send().await.expect("log");
        assert_eq!(response.status(), 200);
        response.text().await.expect("text").lines().map(|l| serde_json::from_str(l).expect("JSONL")).collect()
    }
}
