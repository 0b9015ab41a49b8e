//! `spendcap doctor`: the checks an operator runs before (or instead of) guessing why `serve`
//! misbehaves. It reads the same flags and `SPENDCAP_*` variables as `serve` ([`ServeArgs`]) and
//! reuses the daemon's own loading code (the Redis connection, `ProtocolConfig::from_args`,
//! `Protocols::build`), so a configuration it passes is one `serve` accepts. It changes nothing:
//! no function library is loaded, no key file is created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cli::ServeArgs;
use crate::clock::{Clock, ClockGuard};
use crate::ledger::{LedgerClock, RedisConfig, RedisLedger};
use crate::protocols::{self, ProtocolConfig};

/// One check: what was looked at, whether it is fine, and what to do when it is not.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it (every failed check has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, ok: true, detail: detail.into(), hint: None }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check { name, ok: false, detail: detail.into(), hint: Some(hint.into()) }
    }
}

/// A Redis URL (or a comma-separated list of them) as it may be printed or logged: without user
/// or password.
pub fn without_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|text| match reqwest::Url::parse(text.trim()) {
            Ok(mut url) => {
                let _ = url.set_password(None);
                let _ = url.set_username("");
                url.to_string()
            }
            Err(_) => "<unparsable URL>".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs every check for the daemon `args` describe.
pub async fn checks(args: &ServeArgs) -> Vec<Check> {
    let mut out = Vec::new();
    if args.dev {
        out.push(Check::ok("redis", "--dev: the in-process ledger, nothing is durable (no Redis is used)"));
    } else {
        redis_checks(args, &mut out).await;
    }
    key_file_checks(args, &mut out);
    protocol_checks(args, &mut out);
    out
}

async fn redis_checks(args: &ServeArgs, out: &mut Vec<Check>) {
    let shown = without_credentials(&args.redis_url);
    let config = RedisConfig {
        url: args.redis_url.clone(),
        cluster: args.redis_cluster,
        namespace: args.redis_namespace.clone(),
        timeout: Duration::from_millis(args.redis_timeout_ms.max(1)),
        clock: LedgerClock::Redis,
    };
    let connected = match RedisLedger::connect_without_loading(&config).await {
        Ok(ledger) => ledger.ping().await.map(|()| ledger),
        Err(e) => Err(e),
    };
    let ledger = match connected {
        Ok(ledger) => {
            out.push(Check::ok("redis", format!("{shown} answers")));
            ledger
        }
        Err(e) => {
            out.push(Check::fail(
                "redis",
                format!("cannot reach Redis at {shown}: {e}"),
                "start Redis or set SPENDCAP_REDIS_URL (and SPENDCAP_REDIS_CLUSTER for a cluster)",
            ));
            let not_checked = "not checked: Redis is unreachable";
            out.push(Check::fail("functions", not_checked, "fix the Redis check first"));
            out.push(Check::fail("clock", not_checked, "fix the Redis check first"));
            return;
        }
    };
    out.push(match ledger.loaded_library().await {
        Ok(Some(code)) if code == crate::ledger::LIBRARY => Check::ok(
            "functions",
            format!("the spendcap library is loaded, the same as this binary's ({})", short_hash(&code)),
        ),
        Ok(Some(code)) => Check::fail(
            "functions",
            format!(
                "the spendcap library in Redis ({}) is not this binary's ({})",
                short_hash(&code),
                short_hash(crate::ledger::LIBRARY)
            ),
            "another spendcap version loaded it: run one version against this Redis (`spendcap serve` loads its \
             own at start)",
        ),
        Ok(None) => Check::fail(
            "functions",
            "the spendcap function library is not loaded",
            "start `spendcap serve` against this Redis once: it loads the library",
        ),
        Err(e) => Check::fail("functions", format!("FUNCTION LIST failed: {e}"), "check the Redis user's ACL"),
    });
    let clock = Clock::system();
    let guard = ClockGuard::new(args.max_clock_skew_ms);
    let before = clock.now_ms();
    out.push(match ledger.server_time_ms().await {
        Ok(Some(ledger_ms)) => {
            let offset = guard.record(before, ledger_ms, clock.now_ms());
            match guard.check() {
                Ok(()) => Check::ok(
                    "clock",
                    format!("this host is {offset} ms off Redis's clock (at most {} allowed)", args.max_clock_skew_ms),
                ),
                Err(offset) => Check::fail(
                    "clock",
                    format!(
                        "this host is {offset} ms off Redis's clock, more than SPENDCAP_MAX_CLOCK_SKEW_MS ({}): \
                         serve would refuse payments (clock_skew)",
                        args.max_clock_skew_ms
                    ),
                    "fix the time sync (NTP) of this host or of the Redis host",
                ),
            }
        }
        Ok(None) => Check::ok("clock", "the ledger has no clock of its own"),
        Err(e) => Check::fail("clock", format!("TIME failed: {e}"), "check the Redis user's ACL"),
    });
}

/// The files holding secrets: each must be readable, owned by this user and private.
fn key_file_checks(args: &ServeArgs, out: &mut Vec<Check>) {
    let p = &args.protocols;
    let dev_key = args.dev && std::env::var_os("SPENDCAP_RECEIPT_KEY").is_none();
    if dev_key {
        out.push(Check::ok("receipt key", "--dev: a key generated in memory"));
    } else if args.receipt_key.exists() {
        out.push(private_file("receipt key", &args.receipt_key));
    } else {
        let shown = absolute(&args.receipt_key);
        out.push(Check::ok(
            "receipt key",
            format!("{} does not exist yet: `serve` creates it there (mode 0600)", shown.display()),
        ));
    }
    let files: [(&'static str, &Option<PathBuf>); 4] = [
        ("x402 key", &p.x402.private_key_file),
        ("AP2 KEK", &p.ap2.ap2_kek_file),
        ("ACP config", &p.acp.acp_config),
        ("APIs config", &p.api.apis_config),
    ];
    for (name, path) in files {
        if let Some(path) = path {
            out.push(private_file(name, path));
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// A file with a secret: readable by this user, owned by it, and not readable by anyone else
/// (mode 0600 or 0400).
fn private_file(name: &'static str, path: &Path) -> Check {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(
                name,
                format!("{shown}: {}", e.kind()),
                "check the path (the setting names a file that does not exist or cannot be reached)",
            )
        }
    };
    if let Err(e) = std::fs::File::open(path) {
        return Check::fail(
            name,
            format!("{shown} is not readable: {}", e.kind()),
            "give the daemon's user read access",
        );
    }
    let mode = metadata.mode() & 0o777;
    let me = nix::unistd::geteuid().as_raw();
    if metadata.uid() != me {
        return Check::fail(
            name,
            format!("{shown} is owned by uid {}, not by this user (uid {me})", metadata.uid()),
            format!("chown {me} {shown}"),
        );
    }
    if mode & 0o077 != 0 || mode & 0o400 == 0 {
        return Check::fail(
            name,
            format!("{shown} has mode {mode:04o}: other users can read it"),
            format!("chmod 600 {shown}"),
        );
    }
    Check::ok(name, format!("{shown}: mode {mode:04o}, owned by uid {me}"))
}

/// Each protocol's configuration, loaded the way `serve` loads it.
fn protocol_checks(args: &ServeArgs, out: &mut Vec<Check>) {
    let p = &args.protocols;
    let hint = "fix the setting named above; `serve` refuses to start with it";
    let mut config = ProtocolConfig::default();
    let mut all_ok = true;
    match protocols::x402::X402Config::from_args(&p.x402) {
        Ok(c) => {
            let state =
                if c.signer.is_some() { "configured (a payer key is set)" } else { "not configured (no payer key)" };
            out.push(Check::ok("x402", state));
            config.x402 = c;
        }
        Err(e) => {
            all_ok = false;
            out.push(Check::fail("x402", e.to_string(), hint));
        }
    }
    match protocols::acp::AcpConfig::from_args(&p.acp) {
        Ok(c) => {
            out.push(Check::ok(
                "ACP",
                match &c.file {
                    Some(file) => format!("configured: {} merchant(s), PSP {}", file.merchants.len(), file.psp.name),
                    None => "not configured (no SPENDCAP_ACP_CONFIG)".to_owned(),
                },
            ));
            config.acp = c;
        }
        Err(e) => {
            all_ok = false;
            out.push(Check::fail("ACP", e.to_string(), hint));
        }
    }
    match protocols::ap2::Ap2Config::from_args(&p.ap2) {
        Ok(c) => {
            out.push(Check::ok(
                "AP2",
                match &c.file {
                    Some(file) => format!("configured: {} merchant(s)", file.merchants.len()),
                    None => "not configured (no SPENDCAP_AP2_CONFIG)".to_owned(),
                },
            ));
            config.ap2 = c;
        }
        Err(e) => {
            all_ok = false;
            out.push(Check::fail("AP2", e.to_string(), hint));
        }
    }
    match protocols::api::ApiConfig::from_args(&p.api) {
        Ok(c) => {
            out.push(Check::ok(
                "keyed APIs",
                match &c.file {
                    Some(file) => format!(
                        "configured: {}",
                        file.apis.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    None => "not configured (no SPENDCAP_APIS_CONFIG)".to_owned(),
                },
            ));
            config.api = c;
        }
        Err(e) => {
            all_ok = false;
            out.push(Check::fail("keyed APIs", e.to_string(), hint));
        }
    }
    // What only building the services finds (clients, keys that parse but cannot be used).
    if all_ok {
        if let Err(e) = protocols::Protocols::build(config) {
            out.push(Check::fail("protocols", e.to_string(), hint));
        }
    }
}

fn short_hash(code: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(code.as_bytes());
    format!("sha256 {}", &hex::encode(digest)[..12])
}

/// The checks as lines for people: `ok` or `FAIL`, the check, what was found, and a hint.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        out.push_str(&format!("{:<4}  {:<12} {}\n", if check.ok { "ok" } else { "FAIL" }, check.name, check.detail));
        if let Some(hint) = &check.hint {
            out.push_str(&format!("      {:<12} hint: {hint}\n", ""));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    out.push_str(&if failed == 0 {
        format!("all {} checks passed\n", checks.len())
    } else {
        format!("{failed} of {} checks failed\n", checks.len())
    });
    out
}
