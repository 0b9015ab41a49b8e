//! Proof under fire: many instances with randomised operations, Redis killed mid-load, a slow
//! Redis, a Redis that lost its functions, a killed daemon, and Redis Cluster. After each, the
//! ledger audit (`spendcap ledger check`, the real binary) must pass.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::clock::Clock;
use spendcap::ledger::RedisConfig;
use spendcap::sim::Providers;

use crate::support::{
    free_port, spawn_app, spawn_app_with, wait_for, Agent, AppOptions, RedisServer, TestApp, ADMIN_TOKEN,
};

/// Runs the real `spendcap ledger check` against a Redis and returns (success, output).
fn ledger_check(url: &str, cluster: bool) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .args(["ledger", "check"])
        .env("SPENDCAP_REDIS_URL", url)
        .env("SPENDCAP_REDIS_CLUSTER", cluster.to_string())
        .output()
        .expect("runs the CLI");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// A budget tree for the randomised run: a root, two children, one grandchild.
struct Tree {
    agents: Vec<Agent>,
}

async fn build_trees(app: &TestApp, prefix: &str, n: usize) -> Vec<Tree> {
    let mut trees = Vec::new();
    for t in 0..n {
        let root = app.create_agent(&format!("{prefix}-{t}-root"), 200_000, None).await;
        let a = app.create_agent(&format!("{prefix}-{t}-a"), 120_000, Some(&root.id)).await;
        let b = app.create_agent(&format!("{prefix}-{t}-b"), 150_000, Some(&root.id)).await;
        let a1 = app.create_agent(&format!("{prefix}-{t}-a1"), 90_000, Some(&a.id)).await;
        trees.push(Tree { agents: vec![root, a, b, a1] });
    }
    trees
}

/// `clients` concurrent clients spread over `apps`, `ops` operations in all, from `seed`.
/// Operations: holds (random size, some with short lifetimes), settles, voids, cap changes,
/// rare revocations; a side task moves the shared clock so holds expire.
async fn randomised_run(apps: &[TestApp], trees: &[Tree], seed: u64, clients: usize, ops: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let apps: Arc<Vec<&TestApp>> = Arc::new(apps.iter().collect());
    let tasks = (0..clients).map(|client| {
        let apps = apps.clone();
        let done = done.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client as u64));
            let mut open: Vec<(usize, usize, String, u64)> = Vec::new();
            let per_client = ops / clients as u64;
            for _ in 0..per_client {
                let app = apps[rng.gen_range(0..apps.len())];
                let (t, i) = (rng.gen_range(0..trees.len()), rng.gen_range(0..4));
                let agent = &trees[t].agents[i];
                match rng.gen_range(0..100) {
                    0..=49 => {
                        let ttl = if rng.gen_bool(0.2) { 1 } else { 600 };
                        let (status, body) = app
                            .agent_call(
                                &agent.token,
                                Method::POST,
                                "/v1/holds",
                                Some(json!({"amount_micros": rng.gen_range(1..=9_000), "service": "svc", "ttl_secs": ttl})),
                            )
                            .await;
                        assert!(status == 201 || status == 402, "hold: {status} {body}");
                        if status == 201 {
                            let amount = body["amount_micros"].as_u64().expect("amount");
                            open.push((t, i, body["hold_id"].as_str().expect("id").to_owned(), amount));
                        }
                    }
                    50..=79 if !open.is_empty() => {
                        let (t, i, hold, amount) = open.swap_remove(rng.gen_range(0..open.len()));
                        let settle = rng.gen_range(0..=amount);
                        let (status, body) = app.settle(&trees[t].agents[i], &hold, settle).await;
                        // 409: the hold expired first (moved clock) — its money came back.
                        assert!(status == 200 || status == 409, "settle: {status} {body}");
                    }
                    80..=89 if !open.is_empty() => {
                        let (t, i, hold, _) = open.swap_remove(rng.gen_range(0..open.len()));
                        let (status, body) = app
                            .agent_call(&trees[t].agents[i].token, Method::POST, &format!("/v1/holds/{hold}/void"), Some(json!({})))
                            .await;
                        assert!(status == 200 || status == 409, "void: {status} {body}");
                    }
                    90..=97 => {
                        let cap = rng.gen_range(50_000..=250_000);
                        let (status, body) =
                            app.admin(Method::PUT, &format!("/v1/agents/{}/cap", agent.id), Some(json!({"cap_micros": cap}))).await;
                        assert!(status == 200 || status == 409, "cap: {status} {body}");
                    }
                    98 if rng.gen_bool(0.1) && i != 0 => {
                        let (status, _) = app
                            .admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({"reason": "random"})))
                            .await;
                        assert_eq!(status, 200);
                    }
                    _ => {
                        let (status, _) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
                        assert_eq!(status, 200);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    join_all(tasks).await;
    done.load(Ordering::Relaxed)
}

/// Every level of every tree: spent + held ≤ cap.
async fn assert_no_overshoot(app: &TestApp) {
    let (_, list) = app.admin(Method::GET, "/v1/agents", None).await;
    for agent in list["agents"].as_array().expect("agents") {
        let (cap, spent, held) =
            (agent["cap_micros"].as_u64(), agent["spent_micros"].as_u64(), agent["held_micros"].as_u64());
        let (cap, spent, held) = (cap.expect("cap"), spent.expect("spent"), held.expect("held"));
        assert!(spent + held <= cap, "overshoot: {agent}");
    }
}

/// After every hold's expiry has passed, nothing may still be held anywhere.
async fn assert_no_leaked_holds(app: &TestApp) {
    app.clock.advance_ms(24 * 3600 * 1000 + 1);
    let (_, list) = app.admin(Method::GET, "/v1/agents", None).await;
    for agent in list["agents"].as_array().expect("agents") {
        assert_eq!(agent["held_micros"], 0, "leaked hold: {agent}");
    }
}

async fn many_instances(apps: Vec<TestApp>, audit_url: &str, cluster: bool) {
    let seed: u64 = std::env::var("SPENDCAP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with SPENDCAP_TEST_SEED={seed})");
    let trees = build_trees(&apps[0], "fire", 10).await;
    // A monitor samples every level during the run: the cap holds at every instant it looks.
    let running = Arc::new(AtomicBool::new(true));
    let clock = apps[0].clock.clone();
    let ticker = {
        let running = running.clone();
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                clock.advance_ms(700);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let ops = randomised_run(&apps, &trees, seed, 200, 10_000).await;
    running.store(false, Ordering::Relaxed);
    ticker.await.expect("ticker");
    assert!(ops >= 10_000, "ran {ops} operations");
    assert_no_overshoot(&apps[1]).await;
    let (ok, report) = ledger_check(audit_url, cluster);
    assert!(ok, "audit failed (seed {seed}):\n{report}");
    assert_no_leaked_holds(&apps[2]).await;
    let (ok, report) = ledger_check(audit_url, cluster);
    assert!(ok, "audit failed after expiry (seed {seed}):\n{report}");
    assert!(report.contains("ok: 10 trees, 40 agents"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_ten_thousand_random_operations_no_overshoot_no_leak() {
    let first = spawn_app().await;
    let redis = first.redis.clone().expect("redis");
    let clock = first.clock.clone();
    let mut apps = vec![first];
    for _ in 0..3 {
        apps.push(
            spawn_app_with(AppOptions {
                redis: Some((redis.clone(), "sc".into())),
                clock: clock.clone(),
                ..Default::default()
            })
            .await,
        );
    }
    many_instances(apps, &redis.url(), false).await;
}

/// A local 3-master Redis Cluster on loopback ports.
struct Cluster {
    nodes: Vec<(u16, Child, std::path::PathBuf)>,
}

impl Cluster {
    fn start() -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("spendcap-cluster-{port}-{}", rand::random::<u32>()));
            std::fs::create_dir_all(&dir).expect("dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir"])
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server");
            nodes.push((port, child, dir));
        }
        let cluster = Cluster { nodes };
        for (port, _, _) in &cluster.nodes {
            let start = Instant::now();
            while !cluster.cli(*port, &["PING"]).contains("PONG") {
                assert!(start.elapsed() < Duration::from_secs(10), "cluster node did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|(p, _, _)| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stdout));
        for (port, _, _) in &cluster.nodes {
            let start = Instant::now();
            while !cluster.cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(start.elapsed() < Duration::from_secs(20), "cluster did not become ready");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn url(&self) -> String {
        self.nodes.iter().map(|(p, _, _)| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child, dir) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_many_instance_run_passes_unchanged_on_redis_cluster() {
    let cluster = Cluster::start();
    let config = RedisConfig {
        url: cluster.url(),
        cluster: true,
        namespace: "sc".into(),
        timeout: Duration::from_secs(5),
        clock: spendcap::ledger::LedgerClock::Caller,
    };
    let clock = Clock::system();
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(
            spawn_app_with(AppOptions {
                redis_config: Some(config.clone()),
                clock: clock.clone(),
                ..Default::default()
            })
            .await,
        );
    }
    many_instances(apps, &cluster.url(), true).await;
    // The budget trees really are spread over the cluster's masters (10 trees on one of three
    // masters by chance: 3 in 59,049).
    let holding = cluster
        .nodes
        .iter()
        .filter(|(port, _, _)| cluster.cli(*port, &["--scan", "--pattern", "sc:{*}:log"]).lines().count() > 0)
        .count();
    assert!(holding >= 2, "the trees landed on {holding} master(s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_load_keeps_every_acknowledged_payment_and_counts_nothing_twice() {
    let redis = Arc::new(RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]));
    let app = spawn_app_with(AppOptions { redis: Some((redis.clone(), "sc".into())), ..Default::default() }).await;
    let agents: Vec<Agent> = {
        let mut v = Vec::new();
        for i in 0..8 {
            let agent = app.create_agent(&format!("aof-{i}"), 5_000_000, None).await;
            // The same payment in a tight loop is what the runaway-loop breaker stops; this test
            // is about Redis crashing, so the breaker is off.
            let path = format!("/v1/agents/{}/controls", agent.id);
            let (status, body) = app.admin(Method::PUT, &path, Some(json!({"breaker": null}))).await;
            assert_eq!(status, 200, "{body}");
            v.push(agent);
        }
        v
    };
    let stop = Arc::new(AtomicBool::new(false));
    let app = Arc::new(app);
    let workers = agents.into_iter().map(|agent| {
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // (hold id, amount) of acknowledged holds; acknowledged settles.
            let (mut held, mut settled) = (Vec::new(), Vec::new());
            let mut unavailable = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = app.hold(&agent, 1_000).await;
                match status {
                    201 => {
                        let id = body["hold_id"].as_str().expect("id").to_owned();
                        let (status, _) = app.settle(&agent, &id, 700).await;
                        if status == 200 {
                            settled.push(id);
                        } else {
                            held.push(id);
                        }
                    }
                    503 => unavailable += 1,
                    other => panic!("hold answered {other}: {body}"),
                }
            }
            (agent, held, settled, unavailable)
        })
    });
    let workers: Vec<_> = workers.collect();
    wait_for("some settled payments", Duration::from_secs(20), || {
        let app = app.clone();
        async move { app.log().await.iter().filter(|e| e["event"] == "settle").count() >= 50 }
    })
    .await;
    redis.kill();
    // While Redis is down the daemon fails closed.
    wait_for("a fail-closed refusal", Duration::from_secs(10), || {
        let app = app.clone();
        async move {
            let response = app.http.get(app.url("/healthz")).send().await;
            response.map(|r| r.status() == 503).unwrap_or(false)
        }
    })
    .await;
    redis.restart();
    wait_for("recovery", Duration::from_secs(20), || {
        let app = app.clone();
        async move { app.http.get(app.url("/healthz")).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total_settled = 0;
    for worker in workers {
        let (agent, held, settled, _) = worker.await.expect("worker");
        // Every acknowledged settle is still there: settling again replays it.
        for id in &settled {
            let (status, body) = app.settle(&agent, id, 700).await;
            assert_eq!((status, body["replayed"].as_bool()), (200, Some(true)), "acknowledged settle lost: {body}");
        }
        // Every acknowledged hold still exists (open, or settled if the answer was lost).
        for id in &held {
            let (status, body) = app.settle(&agent, id, 700).await;
            assert!(status == 200, "acknowledged hold {id} lost: {status} {body}");
        }
        let me = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await.1;
        let spent = me["spent_micros"].as_u64().expect("spent");
        assert_eq!(spent, 700 * (settled.len() + held.len()) as u64, "spent counts each payment once");
        total_settled += settled.len();
    }
    assert!(total_settled >= 50);
    let (ok, report) = ledger_check(&redis.url(), false);
    assert!(ok, "audit after the crash:\n{report}");
}

#[tokio::test]
async fn a_redis_that_lost_its_functions_gets_them_back() {
    let app = spawn_app().await;
    let agent = app.create_agent("flushed", 10_000, None).await;
    let redis = app.redis.clone().expect("redis");
    assert!(redis.cli(&["FUNCTION", "FLUSH"]).is_some_and(|o| o.contains("OK")));
    let (status, body) = app.hold(&agent, 10).await;
    assert_eq!(status, 201, "{body}");
    assert!(redis.cli(&["FUNCTION", "LIST"]).is_some_and(|o| o.contains("spendcap")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_redis_never_debits_twice() {
    let redis = Arc::new(RedisServer::start_with(&["--enable-debug-command", "yes"]));
    let app = Arc::new(spawn_app_with(AppOptions { redis: Some((redis, "sc".into())), ..Default::default() }).await);
    let agent = Arc::new(app.create_agent("slow", 10_000_000, None).await);
    let redis = app.redis.clone().expect("redis");
    // Redis stalls for longer than the daemon's 2 s timeout while 20 keyed holds are sent.
    let stall = std::thread::spawn(move || redis.cli(&["DEBUG", "SLEEP", "3"]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let send = |key: String| {
        let app = app.clone();
        let agent = agent.clone();
        async move {
            app.http
                .post(app.url("/v1/holds"))
                .bearer_auth(&agent.token)
                .header("Idempotency-Key", key)
                .json(&json!({"amount_micros": 1_000, "service": "svc"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let first: Vec<u16> = join_all((0..20).map(|i| send(format!("slow-{i}")))).await;
    stall.join().expect("stall");
    // The stall outlives the timeout but not the bound of re-asking (3 timeouts): the daemon
    // learns each outcome before answering.
    assert!(first.iter().all(|s| *s == 201), "every hold resolved before the answer: {first:?}");
    // The agent retries every key, as a client should after a 503.
    let retried: Vec<u16> = join_all((0..20).map(|i| send(format!("slow-{i}")))).await;
    assert!(retried.iter().all(|s| *s == 200 || *s == 201), "{retried:?}");
    let me = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await.1;
    assert_eq!(me["held_micros"], 20 * 1_000, "each key debited once");
    let holds = app.log().await.iter().filter(|e| e["event"] == "hold").count();
    assert_eq!(holds, 20);
}

struct DaemonProcess {
    child: Child,
    base: String,
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn daemon_process(redis: &RedisServer, key: &std::path::Path) -> DaemonProcess {
    daemon_process_with(redis, key, &[], Stdio::null()).await
}

/// Runs the `spendcap serve` binary on a free port against `redis`, with extra environment
/// variables and its stdout (where it logs) sent to `stdout`, and waits until it answers.
async fn daemon_process_with(
    redis: &RedisServer,
    key: &std::path::Path,
    env: &[(&str, &str)],
    stdout: Stdio,
) -> DaemonProcess {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .arg("serve")
        .env("SPENDCAP_LISTEN", format!("127.0.0.1:{port}"))
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("SPENDCAP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SPENDCAP_RECEIPT_KEY", key)
        .env("SPENDCAP_SWEEP_INTERVAL_SECS", "0")
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("spendcap binary");
    let daemon = DaemonProcess { child, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    let url = format!("{}/healthz", daemon.base);
    wait_for("the daemon to start", Duration::from_secs(20), || {
        let http = http.clone();
        let url = url.clone();
        async move { http.get(url).send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_daemon_leaves_holds_that_expire_while_another_keeps_serving() {
    let redis = RedisServer::start();
    let key = std::env::temp_dir().join(format!("spendcap-fire-key-{}.pem", rand::random::<u64>()));
    let mut a = daemon_process(&redis, &key).await;
    let b = daemon_process(&redis, &key).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/v1/agents", b.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"handle": "survivor", "cap_micros": 100_000}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let token = created["token"].as_str().expect("token").to_owned();
    let hold = |base: String, amount: u64, ttl: u64| {
        let http = http.clone();
        let token = token.clone();
        async move {
            http.post(format!("{base}/v1/holds"))
                .bearer_auth(&token)
                .json(&json!({"amount_micros": amount, "service": "svc", "ttl_secs": ttl}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // Daemon A takes holds for most of the cap, then dies before settling any of them.
    for _ in 0..9 {
        assert_eq!(hold(a.base.clone(), 10_000, 3).await, 201);
    }
    let _ = a.child.kill();
    let _ = a.child.wait();
    // B serves throughout; at first only 10,000 is free, then the dead daemon's holds expire.
    assert_eq!(hold(b.base.clone(), 10_001, 600).await, 402);
    let me_url = format!("{}/v1/me", b.base);
    wait_for("the dead daemon's holds to expire", Duration::from_secs(10), || {
        let http = http.clone();
        let token = token.clone();
        let me_url = me_url.clone();
        async move {
            let me: Value = http.get(me_url).bearer_auth(&token).send().await.expect("me").json().await.expect("json");
            me["held_micros"] == 0
        }
    })
    .await;
    assert_eq!(hold(b.base.clone(), 100_000, 600).await, 201, "the full cap is back");
    let (ok, report) = ledger_check(&redis.url(), false);
    assert!(ok, "{report}");
    let _ = std::fs::remove_file(key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let redis = RedisServer::start();
    let unique = rand::random::<u64>();
    let log = std::env::temp_dir().join(format!("spendcap-secrets-{unique}.log"));
    let key_file = std::env::temp_dir().join(format!("spendcap-secrets-key-{unique}.pem"));
    let x402_key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    let kek = "5f4dcc3b5aa765d61d8327deb882cf995f4dcc3b5aa765d61d8327deb882cf99";
    // Every protocol configured against the simulated providers (ACP: a card, PSP and merchant
    // API keys; AP2: the key-encryption key), and everything the daemon can say, at the most
    // verbose level.
    let providers = Providers::start().await.expect("simulated providers");
    let config_dir = std::env::temp_dir().join(format!("spendcap-secrets-config-{unique}"));
    std::fs::create_dir_all(&config_dir).expect("config dir");
    let provider_env = providers.daemon_env(&config_dir).expect("provider configuration");
    let mut env: Vec<(&str, &str)> = provider_env
        .iter()
        .filter(|(name, _)| !matches!(*name, "SPENDCAP_X402_PRIVATE_KEY" | "SPENDCAP_AP2_KEK"))
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    env.extend([
        ("SPENDCAP_X402_PRIVATE_KEY", x402_key),
        ("SPENDCAP_AP2_KEK", kek),
        ("SPENDCAP_LOG", "trace"),
        ("SPENDCAP_LOG_FORMAT", "json"),
    ]);
    let stdout = Stdio::from(std::fs::File::create(&log).expect("log file"));
    let daemon = daemon_process_with(&redis, &key_file, &env, stdout).await;
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/v1/agents", daemon.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"handle": "secretive", "cap_micros": 100_000}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let token = created["token"].as_str().expect("token").to_owned();
    let id = created["agent"]["id"].as_str().expect("id").to_owned();
    let rotated: Value = http
        .post(format!("{}/v1/agents/{id}/rotate-token", daemon.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("json");
    let new_token = rotated["token"].as_str().expect("token").to_owned();
    for bearer in [&token, &new_token] {
        let _ = http
            .post(format!("{}/v1/holds", daemon.base))
            .bearer_auth(bearer)
            .json(&json!({"amount_micros": 10, "service": "svc"}))
            .send()
            .await
            .expect("hold");
        let _ = http.get(format!("{}/v1/me", daemon.base)).bearer_auth(bearer).send().await.expect("me");
    }
    // The AP2 key is generated and stored encrypted; an x402 destination that does not answer.
    let _ = http.get(format!("{}/v1/ap2/key", daemon.base)).bearer_auth(&new_token).send().await.expect("ap2 key");
    let _ = http
        .post(format!("{}/v1/x402/fetch", daemon.base))
        .bearer_auth(&new_token)
        .json(&json!({"url": "http://127.0.0.1:1/x"}))
        .send()
        .await
        .expect("x402");
    // The dashboard's event stream takes the admin token in the query string.
    let events = http
        .get(format!("{}/v1/events?token={ADMIN_TOKEN}", daemon.base))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(events.is_ok_and(|r| r.status() == 200), "the event stream accepts the query token");
    // The demo's whole fleet, paying through x402, ACP and AP2: delegated card tokens, AP2
    // payment tokens and mandates, x402 authorizations all pass through the daemon.
    let outcome = spendcap::demo::scenario(&daemon.base, ADMIN_TOKEN, &providers).await.expect("the demo scenario");
    assert_eq!(outcome.payments, (12, 2, 3), "{outcome:?}");
    drop(daemon);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.lines().count() > 10, "the daemon logged at trace level:\n{text}");
    assert!(text.contains("/v1/events"), "the event stream request was logged (by path)");
    let receipt_key = std::fs::read_to_string(&key_file).expect("receipt key");
    let receipt_key_body: String = receipt_key.lines().filter(|l| !l.starts_with("-----")).collect();
    let acp = providers.acp.config_json();
    let text_of = |value: &Value| value.as_str().expect("text").to_owned();
    let (card, psp_key, merchant_key) =
        (text_of(&acp["card"]["number"]), text_of(&acp["psp"]["api_key"]), text_of(&acp["merchants"][0]["api_key"]));
    for path in ["/v1/x402/fetch", "/v1/acp/checkouts", "/v1/ap2/payments"] {
        assert!(text.contains(path), "the {path} requests were logged");
    }
    assert!(contains_token(&format!("bearer {token}."), "sct_"), "the token detector finds a real token");
    for (what, prefix) in
        [("an agent token", "sct_"), ("an ACP delegated token", "vt_"), ("an AP2 payment token", "tok_")]
    {
        assert!(!contains_token(&text, prefix), "{what} ({prefix}…) appears in the daemon's logs");
    }
    for (what, secret) in [
        ("the card number", card.as_str()),
        ("the card's CVC", "\"123\""),
        ("the billing address", "1 Main Street"),
        ("the PSP's API key", psp_key.as_str()),
        ("the merchant's API key", merchant_key.as_str()),
        ("the admin token", ADMIN_TOKEN),
        ("an agent token", token.as_str()),
        ("a rotated agent token", new_token.as_str()),
        ("an agent token's secret part", &token[token.len() - 64..]),
        ("the x402 key", &x402_key[2..]),
        ("the AP2 key-encryption key", kek),
        ("the receipt signing key", receipt_key_body.as_str()),
    ] {
        assert!(!text.contains(secret), "{what} appears in the daemon's logs");
    }
    let _ = std::fs::remove_file(log);
    let _ = std::fs::remove_file(key_file);
    let _ = std::fs::remove_dir_all(config_dir);
}

/// Whether `text` holds `prefix` followed by at least 24 token characters (letters, digits, `_`,
/// `-`): a credential of that kind, whatever its value.
fn contains_token(text: &str, prefix: &str) -> bool {
    text.match_indices(prefix).any(|(at, _)| {
        let rest = &text[at + prefix.len()..];
        rest.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-').count() >= 24
    })
}

/// What one client saw during the Redis-stall run: its journal.
#[derive(Default)]
struct StallJournal {
    /// Holds granted to the client (201, or 200 for a retry that replayed).
    acked: Vec<String>,
    /// Acknowledged settles and voids.
    settled: Vec<String>,
    voided: Vec<String>,
    /// Settles or voids answered `ledger_unavailable`: nothing may have happened to the hold.
    untouched: Vec<(String, &'static str)>,
    /// The keys `ledger_outcome_unknown` holds named; settles and voids answered so.
    unknown_holds: Vec<String>,
    unknown_ends: Vec<(String, &'static str)>,
    unavailable_holds: u64,
}

const STALL_HOLD: u64 = 1_000;
const STALL_SETTLE: u64 = 700;

async fn stall_hold(app: &TestApp, agent: &Agent, key: Option<&str>) -> (u16, Value) {
    let mut request = app
        .http
        .post(app.url("/v1/holds"))
        .bearer_auth(&agent.token)
        .json(&json!({"amount_micros": STALL_HOLD, "service": "api.example.com", "task": "stall"}));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("hold");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// Settles (`settle`) or voids (`void`) a hold.
/// Retries `call` while the ledger still cannot say (a 503: Redis is working through what piled
/// up while it was paused), as an agent would, up to a deadline; returns the first known answer.
async fn until_known<F, Fut>(mut call: F) -> (u16, Value)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = call().await;
        if status != 503 || std::time::Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stall_end(app: &TestApp, agent: &Agent, hold: &str, op: &str) -> (u16, Value) {
    let body = if op == "settle" { json!({"amount_micros": STALL_SETTLE}) } else { json!({}) };
    app.agent_call(&agent.token, Method::POST, &format!("/v1/holds/{hold}/{op}"), Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_past_the_timeout_gets_honest_answers_and_leaves_nothing_unacknowledged_held() {
    let redis = Arc::new(RedisServer::start());
    let config = RedisConfig { timeout: Duration::from_millis(300), ..crate::support::redis_config(&redis, "sc") };
    let options =
        AppOptions { redis: Some((redis.clone(), "sc".into())), redis_config: Some(config), ..Default::default() };
    let app = Arc::new(spawn_app_with(options).await);
    let mut agents = Vec::new();
    for i in 0..8 {
        let agent = app.create_agent(&format!("stall-{i}"), 50_000_000, None).await;
        let path = format!("/v1/agents/{}/controls", agent.id);
        let (status, body) = app.admin(Method::PUT, &path, Some(json!({"breaker": null}))).await;
        assert_eq!(status, 200, "{body}");
        agents.push(Arc::new(agent));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let (app, agent, stop) = (app.clone(), agent.clone(), stop.clone());
            // Half the clients send an Idempotency-Key, half do not.
            let keyed = i % 2 == 0;
            tokio::spawn(async move {
                let mut journal = StallJournal::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = keyed.then(|| format!("stall-{i}-{n}"));
                    let (status, body) = stall_hold(&app, &agent, key.as_deref()).await;
                    match (status, body["code"].as_str()) {
                        (201, _) => {}
                        (503, Some("ledger_outcome_unknown")) => {
                            let key = body["idempotency_key"].as_str().expect("the key to retry with");
                            journal.unknown_holds.push(key.to_owned());
                            continue;
                        }
                        (503, Some("ledger_unavailable")) => {
                            journal.unavailable_holds += 1;
                            continue;
                        }
                        _ => panic!("hold answered {status}: {body}"),
                    }
                    let id = body["hold_id"].as_str().expect("id").to_owned();
                    journal.acked.push(id.clone());
                    let op = if n.is_multiple_of(3) { "void" } else { "settle" };
                    let (status, body) = stall_end(&app, &agent, &id, op).await;
                    match (status, body["code"].as_str(), op) {
                        (200, _, "settle") => journal.settled.push(id),
                        (200, _, _) => journal.voided.push(id),
                        (503, Some("ledger_outcome_unknown"), _) => journal.unknown_ends.push((id, op)),
                        (503, Some("ledger_unavailable"), _) => journal.untouched.push((id, op)),
                        _ => panic!("{op} answered {status}: {body}"),
                    }
                }
                (agent, journal)
            })
        })
        .collect();
    // Two stalls, each longer than the timeout and the bound of re-asking.
    for round in 1..=2 {
        wait_for("payments between stalls", Duration::from_secs(30), || {
            let app = app.clone();
            async move { app.log().await.iter().filter(|e| e["event"] == "settle").count() >= 40 * round }
        })
        .await;
        redis.signal("STOP");
        tokio::time::sleep(Duration::from_millis(2_500)).await; // the stall itself
        redis.signal("CONT");
    }
    wait_for("payments after the stalls", Duration::from_secs(30), || {
        let app = app.clone();
        async move { app.log().await.iter().filter(|e| e["event"] == "settle").count() >= 120 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut journals = Vec::new();
    for worker in workers {
        journals.push(worker.await.expect("worker"));
    }
    let unknown: usize = journals.iter().map(|(_, j)| j.unknown_holds.len() + j.unknown_ends.len()).sum();
    let unknown_unkeyed: usize = journals.iter().skip(1).step_by(2).map(|(_, j)| j.unknown_holds.len()).sum();
    assert!(unknown > 0 && unknown_unkeyed > 0, "the stalls left some outcomes unknown ({unknown}, {unknown_unkeyed})");
    let total = |f: fn(&StallJournal) -> usize| journals.iter().map(|(_, j)| f(j)).sum::<usize>();
    eprintln!(
        "stall run: {} holds acknowledged, {} unknown holds, {} unknown settles/voids, {} unavailable holds, {} unavailable settles/voids",
        total(|j| j.acked.len()),
        total(|j| j.unknown_holds.len()),
        total(|j| j.unknown_ends.len()),
        total(|j| j.unavailable_holds as usize),
        total(|j| j.untouched.len()),
    );

    for (agent, journal) in &mut journals {
        // Every `ledger_outcome_unknown` resolves by retrying with what it named.
        for key in std::mem::take(&mut journal.unknown_holds) {
            let (status, body) = until_known(|| stall_hold(&app, agent, Some(&key))).await;
            assert!(status == 200 || status == 201, "retry of {key}: {status} {body}");
            let id = body["hold_id"].as_str().expect("id").to_owned();
            journal.acked.push(id.clone());
            let (status, body) = stall_end(&app, agent, &id, "settle").await;
            assert_eq!(status, 200, "{body}");
            journal.settled.push(id);
        }
        for (id, op) in std::mem::take(&mut journal.unknown_ends) {
            let (status, body) = until_known(|| stall_end(&app, agent, &id, op)).await;
            assert_eq!(status, 200, "retry of {op} {id}: {body}");
            if op == "settle" {
                journal.settled.push(id)
            } else {
                journal.voided.push(id)
            }
        }
        // Every `ledger_unavailable` settle or void did nothing: doing it now is the first time.
        for (id, op) in std::mem::take(&mut journal.untouched) {
            let (status, body) = until_known(|| stall_end(&app, agent, &id, op)).await;
            assert_eq!((status, body["replayed"].as_bool()), (200, Some(false)), "{op} {id} had run: {body}");
            if op == "settle" {
                journal.settled.push(id)
            } else {
                journal.voided.push(id)
            }
        }
    }
    // No hold that was never acknowledged stays held: the daemon voids them once Redis answers.
    wait_for("unacknowledged holds released", Duration::from_secs(10), || {
        let (app, agents) = (app.clone(), agents.clone());
        async move {
            for agent in &agents {
                let me = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await.1;
                if me["held_micros"] != 0 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    // The client-side journal against Redis.
    let log = app.log().await;
    for (agent, journal) in &journals {
        // Every acknowledged settle is in Redis: settling again replays it; each counts once.
        for id in &journal.settled {
            let (status, body) = stall_end(&app, agent, id, "settle").await;
            assert_eq!((status, body["replayed"].as_bool()), (200, Some(true)), "acknowledged settle lost: {body}");
        }
        let me = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await.1;
        assert_eq!(me["spent_micros"], STALL_SETTLE * journal.settled.len() as u64, "{}", agent.id);
        // Every hold in Redis was either acknowledged to the client or withdrawn by the daemon
        // (a 503 `ledger_unavailable` hold made none); no acknowledged hold was withdrawn.
        let mine = |event: &str| -> Vec<String> {
            log.iter()
                .filter(|e| e["event"] == event && e["agent"] == agent.id.as_str())
                .map(|e| e["hold"].as_str().expect("hold").to_owned())
                .collect()
        };
        let withdrawn: Vec<String> = log
            .iter()
            .filter(|e| e["event"] == "void" && e["agent"] == agent.id.as_str() && e["reason"] == "grant_not_delivered")
            .map(|e| e["hold"].as_str().expect("hold").to_owned())
            .collect();
        let mut made = mine("hold");
        let mut expected: Vec<String> = journal.acked.iter().chain(&withdrawn).cloned().collect();
        made.sort();
        expected.sort();
        assert_eq!(made, expected, "holds in Redis = acknowledged + withdrawn, for {}", agent.id);
    }
    let withdrawn = log.iter().filter(|e| e["reason"] == "grant_not_delivered").count();
    eprintln!("stall run: {withdrawn} unacknowledged holds withdrawn by the daemon");
    let (ok, report) = ledger_check(&redis.url(), false);
    assert!(ok, "audit after the stalls:\n{report}");
}

/// What one client of the clock-skew run saw acknowledged, per agent index.
#[derive(Default)]
struct SkewJournal {
    /// Settles answered 200: (agent, amount).
    settled: Vec<(usize, u64)>,
    /// Long-lived holds answered 201 and neither settled nor voided: (agent, amount).
    open: Vec<(usize, u64)>,
}

/// Three instances whose clocks are 90 s behind, right and 90 s ahead of Redis's (the skew bound
/// opened wide so they all serve) share a load of holds (some living 1 s, most 10 minutes),
/// settles and voids. Afterwards every acknowledged settle is in Redis and nothing else is spent;
/// every acknowledged long-lived hold is still held (none was released early by an instance
/// whose clock is ahead); the short ones are gone (none kept by one whose clock is behind); and
/// `spendcap ledger check` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_with_skewed_clocks_under_load_release_nothing_early_and_keep_every_settle() {
    let redis = Arc::new(RedisServer::start());
    let wide = Duration::from_secs(3600);
    let apps = Arc::new(vec![
        crate::clock::instance(&redis, -90_000, wide).await,
        crate::clock::instance(&redis, 0, wide).await,
        crate::clock::instance(&redis, 90_000, wide).await,
    ]);
    let mut agents = Vec::new();
    for i in 0..6 {
        let agent = apps[1].create_agent(&format!("skew-{i}"), 5_000_000, None).await;
        let path = format!("/v1/agents/{}/controls", agent.id);
        let (status, body) = apps[1].admin(Method::PUT, &path, Some(json!({"breaker": null}))).await;
        assert_eq!(status, 200, "{body}");
        agents.push(agent);
    }
    let agents = Arc::new(agents);
    let seed: u64 = std::env::var("SPENDCAP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with SPENDCAP_TEST_SEED={seed})");
    let clients = (0..24u64).map(|client| {
        let (apps, agents) = (apps.clone(), agents.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client));
            let mut journal = SkewJournal::default();
            let mut live: Vec<(usize, String, u64)> = Vec::new();
            for _ in 0..60 {
                let app = &apps[rng.gen_range(0..apps.len())];
                let i = rng.gen_range(0..agents.len());
                let agent = &agents[i];
                match rng.gen_range(0..10) {
                    0..=4 => {
                        let short = rng.gen_bool(0.2);
                        let amount = rng.gen_range(1..=20_000);
                        let ttl = if short { 1 } else { 600 };
                        let body = json!({"amount_micros": amount, "service": "svc", "ttl_secs": ttl});
                        let (status, held) = app.agent_call(&agent.token, Method::POST, "/v1/holds", Some(body)).await;
                        assert!(status == 201 || status == 402, "hold: {status} {held}");
                        if status == 201 && !short {
                            live.push((i, held["hold_id"].as_str().expect("id").to_owned(), amount));
                        }
                    }
                    5..=7 if !live.is_empty() => {
                        let (i, hold, amount) = live.swap_remove(rng.gen_range(0..live.len()));
                        let settle = rng.gen_range(0..=amount);
                        let (status, body) = app.settle(&agents[i], &hold, settle).await;
                        // A ten-minute hold settled within seconds: only 200 is right, whatever
                        // the clocks of the instance that held it and of this one say.
                        assert_eq!(status, 200, "settle of a live hold through a skewed instance: {body}");
                        journal.settled.push((i, settle));
                    }
                    8 if !live.is_empty() => {
                        let (i, hold, _) = live.swap_remove(rng.gen_range(0..live.len()));
                        let path = format!("/v1/holds/{hold}/void");
                        let (status, body) =
                            app.agent_call(&agents[i].token, Method::POST, &path, Some(json!({}))).await;
                        assert_eq!(status, 200, "void of a live hold: {body}");
                    }
                    _ => {
                        let (status, me) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
                        assert_eq!(status, 200, "{me}");
                    }
                }
            }
            journal.open = live.into_iter().map(|(i, _, amount)| (i, amount)).collect();
            journal
        })
    });
    let journals: Vec<SkewJournal> = join_all(clients).await.into_iter().map(|j| j.expect("client")).collect();

    // The one-second holds have passed their expiry by Redis's clock.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for (i, agent) in agents.iter().enumerate() {
        let spent: u64 = journals.iter().flat_map(|j| &j.settled).filter(|(a, _)| *a == i).map(|(_, m)| m).sum();
        let open: u64 = journals.iter().flat_map(|j| &j.open).filter(|(a, _)| *a == i).map(|(_, m)| m).sum();
        // Read through the instance ahead: its clock must not release the live holds.
        let (status, me) = apps[2].agent_call(&agent.token, Method::GET, "/v1/me", None).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["spent_micros"].as_u64(), Some(spent), "agent {i}: acknowledged settles vs Redis: {me}");
        assert_eq!(me["held_micros"].as_u64(), Some(open), "agent {i}: acknowledged live holds vs Redis: {me}");
    }
    let (ok, report) = ledger_check(&redis.url(), false);
    assert!(ok, "audit failed (seed {seed}):\n{report}");
}

/// A Redis paused past the timeout: a read answers `ledger_unavailable` (nothing was paid and
/// nothing the agent asked for changed), not `ledger_outcome_unknown`; an admin call that is safe
/// to repeat (revoke) is asked again and answers what happened once Redis is back within the
/// bound, instead of leaving the operator to guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_gets_reads_called_unavailable_and_repeatable_admin_calls_resolved() {
    let redis = Arc::new(RedisServer::start());
    let config = RedisConfig { timeout: Duration::from_millis(300), ..crate::support::redis_config(&redis, "sc") };
    let options =
        AppOptions { redis: Some((redis.clone(), "sc".into())), redis_config: Some(config), ..Default::default() };
    let app = spawn_app_with(options).await;
    let agent = app.create_agent("stalled-read", 1_000_000, None).await;

    redis.signal("STOP");
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    redis.signal("CONT");
    assert_eq!((status, body["code"].as_str()), (503, Some("ledger_unavailable")), "{body}");

    // Paused for less than the re-asking bound (3 × 300 ms): the revoke's answer is known.
    redis.signal("STOP");
    let resume = {
        let redis = redis.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.signal("CONT");
        })
    };
    let path = format!("/v1/agents/{}/revoke", agent.id);
    let (status, body) = app.admin(Method::POST, &path, Some(json!({"reason": "stalled"}))).await;
    resume.await.expect("resumes");
    assert_eq!(status, 200, "{body}");
    let (status, refused) = app.hold(&agent, 1).await;
    assert_eq!((status, refused["code"].as_str()), (402, Some("agent_revoked")), "{refused}");
}
