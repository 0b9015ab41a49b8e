//! `spendcap doctor` against real `redis-server`s: a setup `serve` would run well passes every
//! check (exit 0); a Redis without this binary's functions, a key file others can read and a
//! broken protocol config each fail with a hint (exit non-zero); an unreachable Redis is named
//! without its password.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spendcap::ledger::{LedgerClock, RedisLedger};

use crate::support::{free_port, redis_config, RedisServer};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("spendcap-doctor-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `spendcap doctor` with only the given variables (and PATH) set.
fn doctor(env: &[(&str, &Path)]) -> (Output, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendcap"));
    command.arg("doctor").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("runs spendcap doctor");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

fn line<'a>(stdout: &'a str, status: &str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{status:<4}  {name:<12} ")))
        .unwrap_or_else(|| panic!("no `{status} {name}` line in:\n{stdout}"))
}

fn hint_after<'a>(stdout: &'a str, check_line: &str) -> &'a str {
    let mut lines = stdout.lines().skip_while(|l| *l != check_line);
    lines.next();
    lines.next().filter(|l| l.trim_start().starts_with("hint:")).unwrap_or_else(|| panic!("no hint after {check_line}"))
}

#[tokio::test]
async fn doctor_passes_a_setup_serve_would_run() {
    let redis = RedisServer::start();
    // What `serve` does at start: load this binary's function library.
    let config = spendcap::ledger::RedisConfig { clock: LedgerClock::Redis, ..redis_config(&redis, "sc") };
    RedisLedger::connect(&config).await.expect("loads the library");
    let dir = TempDir::new();
    let x402_key = dir.file("x402.key", &format!("0x{}\n", "11".repeat(32)), 0o600);
    let receipt_key = dir.0.join("receipt-key.pem");
    let url = PathBuf::from(redis.url());

    let (output, stdout) = doctor(&[
        ("SPENDCAP_REDIS_URL", &url),
        ("SPENDCAP_RECEIPT_KEY", &receipt_key),
        ("SPENDCAP_X402_PRIVATE_KEY_FILE", &x402_key),
    ]);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(line(&stdout, "ok", "redis").contains(&format!("{} answers", redis.url())));
    assert!(line(&stdout, "ok", "functions").contains("the same as this binary's"));
    assert!(line(&stdout, "ok", "clock").contains("off Redis's clock (at most 2000 allowed)"));
    assert!(line(&stdout, "ok", "receipt key").contains("does not exist yet: `serve` creates it there"));
    assert!(line(&stdout, "ok", "x402 key").contains("mode 0600"));
    assert!(line(&stdout, "ok", "x402").contains("configured (a payer key is set)"));
    assert!(line(&stdout, "ok", "ACP").contains("not configured"));
    assert!(stdout.ends_with("checks passed\n"), "{stdout}");
    assert!(!receipt_key.exists(), "doctor creates nothing");

    // A receipt key written by serve (mode 0600) passes too; JSON says the same.
    std::fs::write(&receipt_key, "x").expect("key");
    std::fs::set_permissions(&receipt_key, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    let (output, stdout) = doctor(&[("SPENDCAP_REDIS_URL", &url), ("SPENDCAP_RECEIPT_KEY", &receipt_key)]);
    assert!(output.status.success(), "{stdout}");
    assert!(line(&stdout, "ok", "receipt key").contains("mode 0400"));
}

/// The README's `spendcap doctor` block, run as written in a shell with the binary on the PATH.
#[tokio::test]
async fn readme_doctor_block_runs_as_written() {
    let redis = RedisServer::start();
    let config = spendcap::ledger::RedisConfig { clock: LedgerClock::Redis, ..redis_config(&redis, "sc") };
    RedisLedger::connect(&config).await.expect("loads the library");
    let dir = TempDir::new();
    let block = crate::readme::readme_blocks("doctor", 1).remove(0);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_spendcap")).parent().expect("the binary's directory");
    let output = Command::new("sh")
        .arg("-c")
        .arg(&block)
        .env_clear()
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("SPENDCAP_RECEIPT_KEY", dir.0.join("receipt-key.pem"))
        .output()
        .expect("sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(line(&stdout, "ok", "functions").contains("the same as this binary's"));
}

#[tokio::test]
async fn doctor_fails_with_a_hint_per_problem_and_a_non_zero_exit() {
    let redis = RedisServer::start();
    let url = PathBuf::from(redis.url());
    let dir = TempDir::new();
    let receipt_key = dir.file("receipt-key.pem", "x", 0o644);
    let acp_config = dir.file("acp.json", "{ not json", 0o600);

    // No library loaded yet, a world-readable key, an ACP config that does not parse.
    let (output, stdout) = doctor(&[
        ("SPENDCAP_REDIS_URL", &url),
        ("SPENDCAP_RECEIPT_KEY", &receipt_key),
        ("SPENDCAP_ACP_CONFIG", &acp_config),
    ]);
    assert!(!output.status.success(), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("3 doctor check(s) failed"));
    let functions = line(&stdout, "FAIL", "functions");
    assert!(functions.contains("not loaded"));
    assert!(hint_after(&stdout, functions).contains("start `spendcap serve` against this Redis once"));
    let key = line(&stdout, "FAIL", "receipt key");
    assert!(key.contains("mode 0644: other users can read it"), "{key}");
    assert!(hint_after(&stdout, key).contains(&format!("chmod 600 {}", receipt_key.display())));
    let acp = line(&stdout, "FAIL", "ACP");
    assert!(acp.contains("acp configuration") && acp.contains("acp.json"), "{acp}");
    assert!(line(&stdout, "ok", "redis").contains("answers"));
    assert!(stdout.ends_with("3 of 9 checks failed\n"), "{stdout}");

    // Another version's library (here: the test-clock build) is not this binary's.
    RedisLedger::connect(&redis_config(&redis, "sc")).await.expect("loads the test library");
    std::fs::set_permissions(&receipt_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (output, stdout) = doctor(&[("SPENDCAP_REDIS_URL", &url), ("SPENDCAP_RECEIPT_KEY", &receipt_key)]);
    assert!(!output.status.success());
    let functions = line(&stdout, "FAIL", "functions");
    assert!(functions.contains("is not this binary's"), "{functions}");
    assert!(hint_after(&stdout, functions).contains("run one version against this Redis"));
}

#[test]
fn doctor_names_an_unreachable_redis_without_its_password() {
    let url = format!("redis://spendcap:hunter2-secret@127.0.0.1:{}/0", free_port());
    let dir = TempDir::new();
    let receipt_key = dir.0.join("receipt-key.pem");
    let (output, stdout) = doctor(&[("SPENDCAP_REDIS_URL", Path::new(&url)), ("SPENDCAP_RECEIPT_KEY", &receipt_key)]);
    assert!(!output.status.success());
    let redis = line(&stdout, "FAIL", "redis");
    assert!(redis.contains("cannot reach Redis at redis://127.0.0.1:"), "{redis}");
    assert!(hint_after(&stdout, redis).contains("set SPENDCAP_REDIS_URL"));
    assert!(!stdout.contains("hunter2") && !String::from_utf8_lossy(&output.stderr).contains("hunter2"));
    assert!(line(&stdout, "FAIL", "functions").contains("not checked: Redis is unreachable"));
}
