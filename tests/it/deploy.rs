//! The container image's entrypoint (`docker/entrypoint.sh`), run as a plain process by an
//! unprivileged user the way the image runs it (no container engine runs here): secrets mounted as
//! files become settings, empty compose variables are dropped, and a receipt-key directory the
//! user cannot write is reported plainly instead of failing later.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{free_port, wait_for, RedisServer};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("spendcap-{name}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The entrypoint as the image's unprivileged user would run it: as uid/gid 65534 when the tests
/// run as root (CI does), as the current user otherwise.
fn entrypoint(args: &[&str]) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/entrypoint.sh");
    let mut command = if nix_is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]).arg(script);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg(script);
        c
    };
    command.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    command.env("SPENDCAP_BIN", env!("CARGO_BIN_EXE_spendcap"));
    command
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Makes `dir` and its files usable only by the entrypoint's user.
fn give_to_entrypoint_user(dir: &Path, mode: u32) {
    if nix_is_root() {
        let status = Command::new("chown").args(["-R", "65534:65534"]).arg(dir).status().expect("chown");
        assert!(status.success());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test]
async fn entrypoint_reads_mounted_secrets_and_writes_the_receipt_key_as_the_image_user() {
    let redis = RedisServer::start();
    let secrets = TempDir::new("secrets");
    let admin_token = "entrypoint-admin-token-0123456789abcdef0123";
    std::fs::write(secrets.0.join("admin-token"), format!("{admin_token}\n")).expect("admin token");
    std::fs::write(secrets.0.join("x402-private-key"), format!("0x{}", "11".repeat(32))).expect("x402 key");
    let keys = TempDir::new("keys");
    give_to_entrypoint_user(&secrets.0, 0o500);
    for file in ["admin-token", "x402-private-key"] {
        std::fs::set_permissions(secrets.0.join(file), std::fs::Permissions::from_mode(0o400)).expect("chmod");
    }

    // A keys directory the user cannot write: a clear message and no daemon.
    give_to_entrypoint_user(&keys.0, 0o500);
    let key_path = keys.0.join("receipt-key.pem");
    let refused = entrypoint(&["serve"])
        .env("SPENDCAP_SECRETS_DIR", &secrets.0)
        .env("SPENDCAP_RECEIPT_KEY", &key_path)
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("SPENDCAP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("entrypoint");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("cannot be created there"), "{stderr}");

    // Writable by the user, as the image's keys directory is: the daemon starts with the admin
    // token and the x402 key from the secrets directory, while the empty variables compose passes
    // for unset options are ignored.
    give_to_entrypoint_user(&keys.0, 0o700);
    let port = free_port();
    let child = entrypoint(&["serve"])
        .env("SPENDCAP_SECRETS_DIR", &secrets.0)
        .env("SPENDCAP_RECEIPT_KEY", &key_path)
        .env("SPENDCAP_REDIS_URL", redis.url())
        .env("SPENDCAP_LISTEN", format!("127.0.0.1:{port}"))
        .env("SPENDCAP_ACP_CONFIG", "")
        .env("SPENDCAP_AP2_KEK_FILE", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("entrypoint");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Kill(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for("the daemon behind the entrypoint to start", Duration::from_secs(20), || {
        let request = http.get(format!("{base}/healthz"));
        async move { request.send().await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
    let agents = http.get(format!("{base}/v1/agents")).bearer_auth(admin_token).send().await.expect("agents");
    assert_eq!(agents.status(), 200, "the admin token came from the secrets directory");
    let created: serde_json::Value = http
        .post(format!("{base}/v1/agents"))
        .bearer_auth(admin_token)
        .json(&serde_json::json!({"handle": "container", "cap_micros": 1000}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let token = created["token"].as_str().expect("token");
    // x402 is configured from the mounted key: the answer is about the URL, not x402_not_configured.
    let fetched: serde_json::Value = http
        .post(format!("{base}/v1/x402/fetch"))
        .bearer_auth(token)
        .json(&serde_json::json!({"url": "http://127.0.0.1:1/"}))
        .send()
        .await
        .expect("fetch")
        .json()
        .await
        .expect("json");
    assert_ne!(fetched["code"], "x402_not_configured", "{fetched}");
    let meta = std::fs::metadata(&key_path).expect("the receipt key was written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the receipt key is private to its user");
}

/// `serve` says at start which Redis it uses (never its password) and where its receipt key is,
/// so that nobody runs on someone else's Redis without knowing.
#[tokio::test]
async fn serve_logs_which_redis_and_key_it_uses_without_credentials() {
    // A second user with a password; `default` stays open so that the test harness can ping.
    let redis = RedisServer::start_with(&["--user", "spendcap", "on", ">s3cret-redis-password", "~*", "&*", "+@all"]);
    let keys = TempDir::new("serve-log");
    let key_path = keys.0.join("receipt-key.pem");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendcap"))
        .arg("serve")
        .env("SPENDCAP_REDIS_URL", format!("redis://spendcap:s3cret-redis-password@127.0.0.1:{}", redis.port))
        .env("SPENDCAP_ADMIN_TOKEN", crate::support::ADMIN_TOKEN)
        .env("SPENDCAP_RECEIPT_KEY", &key_path)
        .env("SPENDCAP_LISTEN", format!("127.0.0.1:{port}"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spendcap serve");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|line| line.contains("spendcap listening"))
    })
    .await
    .expect("reading the log");
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a 'spendcap listening' line");
    assert!(line.contains(&format!("redis=redis://127.0.0.1:{}", redis.port)), "{line}");
    assert!(line.contains(&key_path.display().to_string()), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
}
