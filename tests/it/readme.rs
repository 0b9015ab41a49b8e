//! The README's "A first session", run verbatim: `spendcap serve --dev` as a real process, the
//! export lines it prints pasted into a shell, then the README's blocks in that shell with the
//! `spendcap` binary on the PATH (`curl` and `jq` as the README uses them).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The `sh` blocks that follow the `<!-- <marker>` comment in README.md: the first, and as many
/// more as the marker says ("this block and the next" → 2).
pub fn readme_blocks(marker: &str, count: usize) -> Vec<String> {
    let readme = include_str!("../../README.md");
    let at = readme.find(&format!("<!-- {marker}")).unwrap_or_else(|| panic!("README has the {marker} marker"));
    let mut blocks = Vec::new();
    let mut rest = &readme[at..];
    while blocks.len() < count {
        let open = rest.find("```sh\n").expect("an sh block after the marker") + "```sh\n".len();
        let close = rest[open..].find("```").expect("the block ends") + open;
        blocks.push(rest[open..close].to_owned());
        rest = &rest[close + 3..];
    }
    blocks
}

#[tokio::test]
async fn readme_first_session_runs_as_written() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_spendcap"));
    let mut child = Command::new(binary)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .env_remove("SPENDCAP_ADMIN_TOKEN")
        .env_remove("SPENDCAP_RECEIPT_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spendcap serve --dev");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let _daemon = Kill(child);
    // What a user pastes: the export lines on stdout; the dashboard link on stderr.
    // Both streams are read to their end (the daemon's later lines must not meet a closed pipe).
    let (exports_tx, exports_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut env = BTreeMap::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((name, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                env.insert(name.to_owned(), value.to_owned());
                if env.len() == 2 {
                    let _ = exports_tx.send(env.clone());
                }
            }
        }
    });
    let (link_tx, link_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(word) = line.split_whitespace().find(|word| word.contains("/dashboard#login=")) {
                let _ = link_tx.send(word.to_owned());
            }
        }
    });
    let timeout = std::time::Duration::from_secs(20);
    let exports = exports_rx.recv_timeout(timeout).expect("serve --dev prints two export lines");
    let link = link_rx.recv_timeout(timeout).expect("a dashboard link that logs in once");
    let base = exports.get("SPENDCAP_URL").expect("SPENDCAP_URL").clone();
    let admin = exports.get("SPENDCAP_ADMIN_TOKEN").expect("SPENDCAP_ADMIN_TOKEN").clone();
    assert!(link.starts_with(&format!("{base}/dashboard#login=")), "{link}");

    let blocks = readme_blocks("first-session", 2);
    let path = format!(
        "{}:{}",
        binary.parent().expect("the binary's directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &blocks.join("\n")])
        .env_clear()
        .env("PATH", path)
        .env("HOME", std::env::temp_dir())
        .envs(&exports)
        .output()
        .expect("bash runs the README's blocks");
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the README's first session failed:\n{out}\n{err}");
    assert!(out.contains("research-sub"), "agent list shows the tree:\n{out}");
    let settle_line = out.lines().find(|l| l.starts_with('{') && l.contains("released_micros")).expect("settle answer");
    let settled: Value = serde_json::from_str(settle_line).expect("settle JSON");
    assert_eq!((settled["amount_micros"].as_u64(), settled["released_micros"].as_u64()), (Some(137_000), Some(63_000)));
    assert!(out.contains("api.openai.com"), "the CSV export lists the line items:\n{out}");

    // What the session left behind, through the API.
    let http = reqwest::Client::new();
    let agents: Value = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("agents")
        .json()
        .await
        .expect("json");
    let research = agents["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|agent| agent["handle"] == "research"))
        .expect("research")
        .clone();
    assert_eq!(research["spent_micros"], 137_000, "{research}");
    assert_eq!(research["revoked"], "runaway_loop", "{research}");

    // The printed link logs in once; the second use is refused.
    let code = link.split("#login=").nth(1).expect("code");
    let exchange = |code: String| {
        let request = http.post(format!("{base}/v1/dashboard/login")).json(&serde_json::json!({ "code": code }));
        async move {
            let response = request.send().await.expect("login");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, first) = exchange(code.to_owned()).await;
    assert_eq!((status, first["admin_token"].as_str()), (200, Some(admin.as_str())));
    let (status, again) = exchange(code.to_owned()).await;
    assert_eq!((status, again["code"].as_str()), (401, Some("invalid_login_code")));
    let root = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{base}/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(root.headers().get("location").and_then(|v| v.to_str().ok()), Some("/dashboard"));
}
