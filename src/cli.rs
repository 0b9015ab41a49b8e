//! The command line: `spendcap serve` runs the daemon; every other subcommand is a client of a
//! running daemon's admin API (or, for `receipt verify`, works offline).

use std::net::SocketAddr;
use std::path::PathBuf;

use adapters::Micros;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "spendcap", version, about = "Hard spending caps, cost attribution and revocation for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Manage agents (admin token required).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Read the attributed log (admin token required).
    #[command(subcommand)]
    Log(LogCommand),
    /// Work with signed receipts.
    #[command(subcommand)]
    Receipt(ReceiptCommand),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SPENDCAP_LISTEN", default_value = "127.0.0.1:8402")]
    pub listen: SocketAddr,
    /// Run with the in-process ledger: nothing is durable. For trying spendcap out.
    #[arg(long)]
    pub dev: bool,
    /// Redis URL (for a cluster: comma-separated node URLs with --redis-cluster).
    #[arg(long, env = "SPENDCAP_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Connect to a Redis Cluster.
    #[arg(long, env = "SPENDCAP_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Namespace (first segment) of every Redis key.
    #[arg(long, env = "SPENDCAP_REDIS_NAMESPACE", default_value = "sc")]
    pub redis_namespace: String,
    /// How long one Redis command may take before the ledger counts as unavailable (ms).
    #[arg(long, env = "SPENDCAP_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,
    /// The admin bearer token (at least 32 characters). Required unless --dev.
    #[arg(long, env = "SPENDCAP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Ed25519 receipt signing key (PKCS#8 PEM); generated there on first start.
    #[arg(long, env = "SPENDCAP_RECEIPT_KEY", default_value = "spendcap-receipt-key.pem")]
    pub receipt_key: PathBuf,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "SPENDCAP_BODY_LIMIT", default_value_t = 65536)]
    pub body_limit: usize,
    /// Lifetime of a hold nobody settles, unless the request says otherwise (seconds).
    #[arg(long, env = "SPENDCAP_HOLD_TTL_SECS", default_value_t = 300)]
    pub hold_ttl_secs: u64,
    /// Longest hold lifetime a request may ask for (seconds).
    #[arg(long, env = "SPENDCAP_MAX_HOLD_TTL_SECS", default_value_t = 86400)]
    pub max_hold_ttl_secs: u64,
    /// Background release of expired holds every N seconds (0: off; expiry needs no sweeper).
    #[arg(long, env = "SPENDCAP_SWEEP_INTERVAL_SECS", default_value_t = 30)]
    pub sweep_interval_secs: u64,
    /// Where alert webhooks are sent (threshold crossings, refusals, suspensions, revocations).
    #[arg(long, env = "SPENDCAP_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key webhooks are signed with (at least 16 characters).
    #[arg(long, env = "SPENDCAP_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Take over alerts another instance left unacknowledged this long (seconds).
    #[arg(long, env = "SPENDCAP_WEBHOOK_CLAIM_IDLE_SECS", default_value_t = 300)]
    pub webhook_claim_idle_secs: u64,
    /// Log format.
    #[arg(long, env = "SPENDCAP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub protocols: crate::protocols::ProtocolArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's base URL.
    #[arg(long, env = "SPENDCAP_URL", default_value = "http://127.0.0.1:8402", global = true)]
    pub url: String,
    /// The admin bearer token.
    #[arg(long, env = "SPENDCAP_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an agent; prints its token once.
    Create {
        #[arg(long)]
        handle: String,
        /// Cap in USD, e.g. 5.00 (exact decimal; at most 6 decimals).
        #[arg(long, allow_hyphen_values = true)]
        cap: String,
        /// Parent agent (id or handle).
        #[arg(long)]
        parent: Option<String>,
        /// Expire the agent after this many seconds.
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Labels, as key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every agent with its cap, spend and holds.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one agent.
    Show {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change an agent's cap (USD).
    SetCap {
        agent: String,
        #[arg(allow_hyphen_values = true)]
        cap: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke an agent and all its sub-agents at once.
    Revoke {
        agent: String,
        /// Reason code, e.g. runaway_loop.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Issue a new token; the old one stops working at once.
    RotateToken {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Export the log to stdout.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        since_ms: Option<u64>,
        #[arg(long)]
        until_ms: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Subcommand, Debug)]
pub enum ReceiptCommand {
    /// Verify one receipt (JSON) or an exported chain (JSONL), offline.
    Verify {
        /// File with one receipt or one receipt per line; `-` for stdin.
        file: PathBuf,
        /// The daemon's receipt public key (base64url), as served at /v1/receipt-key.
        #[arg(long, env = "SPENDCAP_RECEIPT_PUBLIC_KEY")]
        public_key: String,
        #[arg(long)]
        json: bool,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| "labels are key=value".to_owned())
}

/// A CLI failure: printed to stderr, exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("the daemon answered {status}: {code}: {detail}")]
    Api { status: u16, code: String, detail: String },
    #[error("cannot reach the daemon: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Receipt(#[from] crate::receipt::ReceiptError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn usd(text: &str) -> Result<Micros, CliError> {
    Micros::from_decimal_str(text, 6).map_err(|e| CliError::Usage(format!("cap {text:?}: {e}")))
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Client, CliError> {
        let token = args
            .admin_token
            .clone()
            .ok_or_else(|| CliError::Usage("set SPENDCAP_ADMIN_TOKEN or pass --admin-token".into()))?;
        Ok(Client { http: reqwest::Client::new(), base: args.url.trim_end_matches('/').to_owned(), token })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response, CliError> {
        let mut request = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(CliError::Api {
            status,
            code: body["code"].as_str().unwrap_or("unknown").to_owned(),
            detail: body["detail"].as_str().unwrap_or("").to_owned(),
        })
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        Ok(self.send(method, path, body).await?.json().await?)
    }
}

fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn money(value: &Value) -> String {
    value.as_u64().and_then(|m| Micros::new(m).ok()).map(|m| format!("${}", m.to_usd_string())).unwrap_or_default()
}

fn agent_table(agents: &[Value]) -> String {
    let mut out = format!(
        "{:<24} {:<38} {:>16} {:>16} {:>16} {:>16}  {}\n",
        "HANDLE", "ID", "CAP", "SPENT", "HELD", "REMAINING", "STATUS"
    );
    for a in agents {
        let status = match a["revoked"].as_str() {
            Some(reason) => format!("revoked ({reason})"),
            None => "active".into(),
        };
        let indent = "  ".repeat(a["depth"].as_u64().unwrap_or(1).saturating_sub(1) as usize);
        out.push_str(&format!(
            "{:<24} {:<38} {:>16} {:>16} {:>16} {:>16}  {}\n",
            format!("{indent}{}", a["handle"].as_str().unwrap_or("")),
            a["id"].as_str().unwrap_or(""),
            money(&a["cap_micros"]),
            money(&a["spent_micros"]),
            money(&a["held_micros"]),
            money(&a["remaining_micros"]),
            status
        ));
    }
    out
}

fn print(json: bool, value: &Value, table: impl FnOnce(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        print!("{}", table(value));
    }
}

/// Runs one client subcommand.
pub async fn run_client(command: Command) -> Result<(), CliError> {
    use reqwest::Method;
    match command {
        Command::Serve(_) => Err(CliError::Usage("serve is not a client command".into())),
        Command::Agent(AgentCommand::Create { handle, cap, parent, ttl_secs, labels, client }) => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({
                "handle": handle,
                "cap_micros": usd(&cap)?.get(),
                "parent": parent,
                "ttl_secs": ttl_secs,
                "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            let created = api.json(Method::POST, "/v1/agents", Some(body)).await?;
            print(client.json, &created, |c| {
                format!(
                    "{}token (shown once, store it now): {}\n",
                    agent_table(std::slice::from_ref(&c["agent"])),
                    c["token"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
        Command::Agent(AgentCommand::List { client }) => {
            let api = Client::new(&client)?;
            let list = api.json(Method::GET, "/v1/agents", None).await?;
            print(client.json, &list, |l| agent_table(l["agents"].as_array().map(Vec::as_slice).unwrap_or(&[])));
            Ok(())
        }
        Command::Agent(AgentCommand::Show { agent, client }) => {
            let api = Client::new(&client)?;
            let shown = api.json(Method::GET, &format!("/v1/agents/{}", path_segment(&agent)), None).await?;
            print(client.json, &shown, |a| agent_table(std::slice::from_ref(a)));
            Ok(())
        }
        Command::Agent(AgentCommand::SetCap { agent, cap, client }) => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({ "cap_micros": usd(&cap)?.get() });
            let shown = api.json(Method::PUT, &format!("/v1/agents/{}/cap", path_segment(&agent)), Some(body)).await?;
            print(client.json, &shown, |a| agent_table(std::slice::from_ref(a)));
            Ok(())
        }
        Command::Agent(AgentCommand::Revoke { agent, reason, client }) => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({ "reason": reason });
            let revoked =
                api.json(Method::POST, &format!("/v1/agents/{}/revoke", path_segment(&agent)), Some(body)).await?;
            print(client.json, &revoked, |r| {
                format!(
                    "revoked {} ({}) at {} ms{}\n",
                    r["agent_id"].as_str().unwrap_or(""),
                    r["reason"].as_str().unwrap_or(""),
                    r["revoked_at_ms"],
                    if r["already_revoked"].as_bool().unwrap_or(false) { " (it already was)" } else { "" }
                )
            });
            Ok(())
        }
        Command::Agent(AgentCommand::RotateToken { agent, client }) => {
            let api = Client::new(&client)?;
            let rotated =
                api.json(Method::POST, &format!("/v1/agents/{}/rotate-token", path_segment(&agent)), None).await?;
            print(client.json, &rotated, |r| {
                format!("new token (shown once): {}\n", r["token"].as_str().unwrap_or(""))
            });
            Ok(())
        }
        Command::Log(LogCommand::Export { format, agent, task, service, since_ms, until_ms, client }) => {
            let api = Client::new(&client)?;
            let mut query = vec![(
                "format".to_owned(),
                match format {
                    ExportFormat::Jsonl => "jsonl".to_owned(),
                    ExportFormat::Csv => "csv".to_owned(),
                },
            )];
            for (key, value) in [("agent", agent), ("task", task), ("service", service)] {
                if let Some(value) = value {
                    query.push((key.to_owned(), value));
                }
            }
            for (key, value) in [("since_ms", since_ms), ("until_ms", until_ms)] {
                if let Some(value) = value {
                    query.push((key.to_owned(), value.to_string()));
                }
            }
            let encoded = query.iter().map(|(k, v)| format!("{k}={}", path_segment(v))).collect::<Vec<_>>().join("&");
            let mut response = api.send(Method::GET, &format!("/v1/log?{encoded}"), None).await?;
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = response.chunk().await? {
                stdout.write_all(&chunk)?;
            }
            Ok(())
        }
        Command::Receipt(ReceiptCommand::Verify { file, public_key, json }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)?
            };
            let key = crate::receipt::parse_public_key(&public_key)?;
            let receipts = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(|e| crate::receipt::ReceiptError::Malformed(e.to_string())))
                .collect::<Result<Vec<crate::receipt::Receipt>, _>>();
            // A single pretty-printed receipt spans several lines: try the whole text too.
            let receipts = match receipts {
                Ok(r) => r,
                Err(e) => vec![serde_json::from_str(&text).map_err(|_| e)?],
            };
            let report = crate::receipt::verify_chain(&receipts, &key)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "valid": true, "receipts": report.receipts, "trees": report.trees })
                );
            } else {
                println!("ok: {} receipt(s) in {} chain(s) verified", report.receipts, report.trees);
            }
            Ok(())
        }
    }
}
