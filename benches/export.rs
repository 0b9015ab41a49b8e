//! Log export in constant memory: `cargo bench --bench export`.
//!
//! Writes `SPENDCAP_EXPORT_ENTRIES` (default 1,000,000) log entries into a private
//! `redis-server` (one tree's stream, pipelined XADDs), starts a `spendcap serve` process on it,
//! streams `GET /v1/log` (JSONL, then CSV) to the end while counting lines, and prints the
//! daemon's peak resident memory (VmHWM from /proc) before and after each export.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TREE: &str = "e4c0000000000001";
const ADMIN: &str = "export-bench-admin-token-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn resp(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
}

#[tokio::main]
async fn main() {
    let entries: u64 = std::env::var("SPENDCAP_EXPORT_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("spendcap-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let redis_port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let agent = format!("ag_{TREE}_0000000000000001");
    let mut batch = Vec::with_capacity(32 << 20);
    resp(&mut batch, &["SADD", "sc:trees", TREE]);
    let key = format!("sc:{{{TREE}}}:log");
    let ts0 = 1_767_225_600_000u64;
    for i in 0..entries {
        let (ts, task, hold) = ((ts0 + i).to_string(), format!("task-{}", i % 1000), format!("hd_{TREE}_{i:016x}"));
        resp(
            &mut batch,
            &[
                "XADD",
                &key,
                "*",
                "ts",
                &ts,
                "ev",
                "settle",
                "agent",
                &agent,
                "task",
                &task,
                "svc",
                "api.example.com",
                "proto",
                "generic",
                "amt",
                "1000",
                "rel",
                "0",
                "hold",
                &hold,
            ],
        );
    }
    let mut pipe = Command::new("redis-cli")
        .args(["-p", &redis_port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli");
    pipe.stdin.take().expect("stdin").write_all(&batch).expect("pipe");
    assert!(pipe.wait().expect("redis-cli").success());
    drop(batch);
    println!("wrote {entries} log entries in {:.1} s", started.elapsed().as_secs_f64());

    let port = free_port();
    let daemon = Killed(
        Command::new(env!("CARGO_BIN_EXE_spendcap"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("SPENDCAP_REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
            .env("SPENDCAP_ADMIN_TOKEN", ADMIN)
            .env("SPENDCAP_RECEIPT_KEY", dir.join("receipt.pem"))
            .env("SPENDCAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spendcap serve"),
    );
    let pid = daemon.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.map(|r| !r.status().is_success()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("daemon idle: VmRSS {} KiB, VmHWM {} KiB", kib(pid, "VmRSS:"), kib(pid, "VmHWM:"));
    for format in ["jsonl", "csv"] {
        let started = Instant::now();
        let mut response =
            http.get(format!("{base}/v1/log?format={format}")).bearer_auth(ADMIN).send().await.expect("export");
        assert!(response.status().is_success());
        let (mut lines, mut bytes) = (0u64, 0u64);
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            bytes += chunk.len() as u64;
            lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        let expected = entries + u64::from(format == "csv");
        assert_eq!(lines, expected, "every entry exported once");
        println!(
            "export {format}: {lines} lines, {:.0} MiB in {:.1} s; daemon VmRSS {} KiB, peak VmHWM {} KiB",
            bytes as f64 / 1048576.0,
            started.elapsed().as_secs_f64(),
            kib(pid, "VmRSS:"),
            kib(pid, "VmHWM:")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
