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
    Serve(Box<ServeArgs>),
    /// Try it: the daemon on the in-process ledger, a small fleet run through a scenario, the
    /// report printed and the dashboard left up until Ctrl-C.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8402")]
        listen: SocketAddr,
        /// Start the daemon and the simulated x402, ACP and AP2 providers, print the environment
        /// an agent needs to pay them, and run no scenario.
        #[arg(long)]
        providers_only: bool,
        /// Upstream MCP servers whose paid tools agents may call (as for `serve`).
        #[command(flatten)]
        mcp: crate::protocols::mcp_upstream::McpUpstreamArgs,
    },
    /// Serve MCP on stdin/stdout for one agent, as an MCP host launches it (SPENDCAP_URL,
    /// SPENDCAP_AGENT_TOKEN).
    Mcp(crate::mcp::stdio::McpArgs),
    /// Manage agents (admin token required).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Read the attributed log (admin token required).
    #[command(subcommand)]
    Log(LogCommand),
    /// Cost report: per task type (success, failure, spread, suggested cap), by agent, service
    /// and protocol, refusals by reason (admin token required).
    Report {
        /// Only this agent (id or handle).
        #[arg(long)]
        agent: Option<String>,
        /// From this time: a duration back from now (24h, 7d), a UTC date (2026-12-01), an
        /// RFC 3339 time or ms since the epoch.
        #[arg(long, alias = "since-ms")]
        since: Option<String>,
        /// Until this time (exclusive), in the same forms as --since.
        #[arg(long, alias = "until-ms")]
        until: Option<String>,
        /// Print CSV (one row per task type, agent, service, protocol and refusal reason).
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Mark a task finished (admin token; names the agent).
    TaskOutcome {
        /// The agent (id or handle).
        agent: String,
        /// The task label its holds carried.
        task: String,
        /// success, failed or abandoned.
        outcome: String,
        /// e.g. research, enrichment, booking.
        #[arg(long)]
        task_type: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Holds whose payment outcome is unknown: list them, resolve one (admin token required).
    #[command(subcommand)]
    Holds(HoldsCommand),
    /// Payments waiting for a person's approval: list, approve or deny (admin token required).
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Operator tokens with a role (viewer, operator, admin), optionally limited to one budget
    /// tree: create, list, revoke (admin token required).
    #[command(subcommand)]
    Operators(OperatorsCommand),
    /// Who the token in SPENDCAP_ADMIN_TOKEN is: name, role, tree, allowed actions.
    Whoami {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Work with signed receipts.
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Audit the ledger in Redis directly.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Check what `serve` would use (same flags and SPENDCAP_* variables): Redis reachable, its
    /// function library this binary's, the clock offset, key files private, protocol configs
    /// valid. Prints ok/FAIL with a hint per check; exits non-zero when one fails. Changes nothing.
    Doctor(Box<DoctorArgs>),
    /// Make the daemon's agents what a fleet file (YAML) says: prints the plan (create, update
    /// with diffs, archive, unchanged), then applies it through the admin API. Idempotent.
    Apply {
        /// The fleet file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write new agents' tokens here (JSON, handle → token, mode 0600) instead of printing them.
        #[arg(long)]
        tokens_out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Replay every tree's log and compare it with every balance, budget and open hold; exits
    /// non-zero on any difference and prints where it is. Reads only.
    Check {
        #[arg(long, env = "SPENDCAP_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        #[arg(long, env = "SPENDCAP_REDIS_CLUSTER", default_value_t = false)]
        redis_cluster: bool,
        #[arg(long, env = "SPENDCAP_REDIS_NAMESPACE", default_value = "sc")]
        redis_namespace: String,
        #[arg(long)]
        json: bool,
    },
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
    /// The most this host's clock may be off Redis's (ms) before the daemon stops paying: what it
    /// signs (x402 validBefore, AP2 exp) must agree with the ledger's expiry, decided by Redis's clock.
    #[arg(long, env = "SPENDCAP_MAX_CLOCK_SKEW_MS", default_value_t = 2000)]
    pub max_clock_skew_ms: u64,
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
        /// Create a sub-agent for this task of its parent (it spends what remains of the
        /// parent's per-task budget for it).
        #[arg(long)]
        task: Option<String>,
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
    /// Issue a short-lived token for one task (prints it once): its payments are that task's,
    /// and it stops working after --ttl (or when revoked, or when its agent is).
    Token {
        agent: String,
        /// The task the token's payments are attributed to.
        #[arg(long)]
        task: String,
        /// Lifetime: seconds, or with a unit: 90s, 15m, 1h, 2d (at most 30d).
        #[arg(long, value_parser = parse_ttl)]
        ttl: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Issue a new token; the old one stops working at once.
    RotateToken {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an agent's spending controls, or replace them (every flag given describes the whole
    /// new set; the default breaker and alerts apply unless --no-breaker / --alerts say).
    Controls {
        agent: String,
        #[command(flatten)]
        controls: ControlArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change an agent's expiry.
    Expiry {
        agent: String,
        /// Expire this many seconds from now.
        #[arg(long, conflicts_with_all = ["at_ms", "never"])]
        ttl_secs: Option<u64>,
        /// Expire at this time (ms since the epoch).
        #[arg(long, conflicts_with = "never")]
        at_ms: Option<u64>,
        /// Never expire.
        #[arg(long)]
        never: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lift a suspension by the runaway-loop breaker.
    Reinstate {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Archive an agent: revoked for good and its handle free for a new agent; its log, receipts
    /// and report lines are kept and still name it.
    Archive {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Spend per calendar period (newest first).
    Periods {
        agent: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Flags of `agent controls`. Money in USD as exact decimals.
#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// Show the controls without changing them (also the default with no other flag).
    #[arg(long)]
    pub show: bool,
    /// Most spent + held per task label, e.g. 1.50.
    #[arg(long, allow_hyphen_values = true)]
    pub task_cap: Option<String>,
    /// Limit per period, as period=USD (repeatable): per_payment, daily, weekly, monthly, all_time.
    #[arg(long = "limit", value_parser = parse_label, allow_hyphen_values = true)]
    pub limits: Vec<(String, String)>,
    /// Only these services may be paid (repeatable; `*.example.com` for subdomains).
    #[arg(long)]
    pub allow_service: Vec<String>,
    #[arg(long)]
    pub deny_service: Vec<String>,
    #[arg(long)]
    pub allow_protocol: Vec<String>,
    #[arg(long)]
    pub deny_protocol: Vec<String>,
    /// Turn the runaway-loop breaker off.
    #[arg(long, conflicts_with_all = ["max_holds", "window_secs", "max_spend", "spend_window_secs", "max_repeats"])]
    pub no_breaker: bool,
    /// Breaker: most holds within --window-secs.
    #[arg(long, requires = "window_secs", allow_hyphen_values = true)]
    pub max_holds: Option<i64>,
    #[arg(long, allow_hyphen_values = true)]
    pub window_secs: Option<i64>,
    /// Breaker: most USD held within --spend-window-secs.
    #[arg(long, requires = "spend_window_secs", allow_hyphen_values = true)]
    pub max_spend: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    pub spend_window_secs: Option<i64>,
    /// Breaker: most identical payments (same service and amount) in a row.
    #[arg(long, allow_hyphen_values = true)]
    pub max_repeats: Option<i64>,
    /// Alert thresholds in percent, comma-separated (e.g. 50,80,100); `none` for none.
    #[arg(long)]
    pub alerts: Option<String>,
}

impl ControlArgs {
    fn is_show(&self) -> bool {
        self.show
            || (self.task_cap.is_none()
                && self.limits.is_empty()
                && self.allow_service.is_empty()
                && self.deny_service.is_empty()
                && self.allow_protocol.is_empty()
                && self.deny_protocol.is_empty()
                && !self.no_breaker
                && self.max_holds.is_none()
                && self.window_secs.is_none()
                && self.max_spend.is_none()
                && self.spend_window_secs.is_none()
                && self.max_repeats.is_none()
                && self.alerts.is_none())
    }

    /// The `PUT /v1/agents/{agent}/controls` body. Negative numbers pass through, so that the
    /// daemon refuses them with its stable code.
    fn body(&self) -> Result<Value, CliError> {
        let mut body = serde_json::Map::new();
        if let Some(cap) = &self.task_cap {
            body.insert("task_cap_micros".into(), usd_or_raw(cap)?);
        }
        let mut limits = serde_json::Map::new();
        for (period, amount) in &self.limits {
            limits.insert(period.clone(), usd_or_raw(amount)?);
        }
        body.insert("limits".into(), Value::Object(limits));
        body.insert("services".into(), serde_json::json!({ "allow": self.allow_service, "deny": self.deny_service }));
        body.insert(
            "protocols".into(),
            serde_json::json!({ "allow": self.allow_protocol, "deny": self.deny_protocol }),
        );
        if self.no_breaker {
            body.insert("breaker".into(), Value::Null);
        } else if self.max_holds.is_some() || self.max_spend.is_some() || self.max_repeats.is_some() {
            let mut breaker = serde_json::Map::new();
            for (key, value) in [
                ("max_holds", self.max_holds),
                ("window_secs", self.window_secs),
                ("spend_window_secs", self.spend_window_secs),
                ("max_repeats", self.max_repeats),
            ] {
                if let Some(value) = value {
                    breaker.insert(key.into(), value.into());
                }
            }
            if let Some(spend) = &self.max_spend {
                breaker.insert("max_spend_micros".into(), usd_or_raw(spend)?);
            }
            body.insert("breaker".into(), Value::Object(breaker));
        }
        match self.alerts.as_deref() {
            None => {}
            Some("none") => {
                body.insert("alerts".into(), Value::Null);
            }
            Some(list) => {
                let percents = list
                    .split(',')
                    .map(|p| p.trim().parse::<i64>().map(Value::from))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| CliError::Usage(format!("--alerts {list:?}: comma-separated percents")))?;
                body.insert("alerts".into(), Value::Array(percents));
            }
        }
        Ok(Value::Object(body))
    }
}

/// USD text as micros, or, for a negative amount, the negated micros (for the daemon to refuse).
fn usd_or_raw(text: &str) -> Result<Value, CliError> {
    match text.strip_prefix('-') {
        Some(rest) => Ok(Value::from(-(usd(rest)?.get() as i64))),
        None => Ok(Value::from(usd(text)?.get())),
    }
}

fn controls_table(c: &Value, handles: &Handles) -> String {
    let mut out = format!("controls of {}\n", handles.name(&c["agent_id"]));
    if !c["task_cap_micros"].is_null() {
        out.push_str(&format!("  per task      {}\n", money(&c["task_cap_micros"])));
    }
    if let Some(limits) = c["limits"].as_object() {
        for (period, limit) in limits {
            out.push_str(&format!("  {period:<13} {}\n", money(limit)));
        }
    }
    for kind in ["services", "protocols"] {
        for side in ["allow", "deny"] {
            let list: Vec<&str> =
                c[kind][side].as_array().map(|l| l.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            if !list.is_empty() {
                out.push_str(&format!("  {kind} {side}: {}\n", list.join(", ")));
            }
        }
    }
    match c["breaker"].as_object() {
        None => out.push_str("  breaker       off\n"),
        Some(b) => out.push_str(&format!("  breaker       {}\n", Value::Object(b.clone()))),
    }
    out.push_str(&format!("  alerts at     {}%\n", c["alerts"]));
    out
}

#[derive(Subcommand, Debug)]
pub enum OperatorsCommand {
    /// Create an operator token; prints it once.
    Create {
        /// Unique name, 1 to 64 characters of [a-z0-9_.-] (shown as `by` in the log).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Limit the token to this agent's budget tree (id or handle).
        #[arg(long)]
        tree: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List operator tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke an operator token by name; it stops at once.
    Revoke {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum HoldsCommand {
    /// List holds whose outcome is unknown (every tree), or open ones.
    List {
        /// `unknown` or `open`.
        #[arg(long, default_value = "unknown")]
        state: String,
        /// Only this agent's (id or handle).
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resolve a hold whose outcome is unknown: settle what was charged, or void it.
    Resolve {
        hold: String,
        /// Money moved: settle this much, in USD (`0.25`) or micro-USD (`250000micros`).
        #[arg(long, conflicts_with = "void", required_unless_present = "void")]
        settle: Option<String>,
        /// No money moved: release the hold.
        #[arg(long)]
        void: bool,
        /// What was checked (logged with the decision).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// List approvals of the last week (every tree), newest first.
    List {
        /// Only those in this state: pending, approved, denied, expired or canceled.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve a waiting payment: the agent's repeated request pays it from its reservation.
    Approve {
        id: String,
        /// Why (logged with the decision, shown to the agent).
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deny a waiting payment: its money is released.
    Deny {
        id: String,
        /// Why (logged with the decision, shown to the agent).
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn approvals_table(list: &Value) -> String {
    let mut out = String::new();
    for a in list["approvals"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{}  {:<8} {:>12}  {}  {}  {} ({})\n",
            a["approval_id"].as_str().unwrap_or(""),
            a["state"].as_str().unwrap_or(""),
            money(&a["amount_micros"]),
            a["agent"].as_str().unwrap_or(""),
            a["service"].as_str().unwrap_or(""),
            a["reason"].as_str().unwrap_or(""),
            a["protocol"].as_str().unwrap_or(""),
        ));
    }
    if out.is_empty() {
        out.push_str("no approvals\n");
    }
    out
}

/// `spendcap approvals approve|deny ID --note …`.
async fn decide_approval(id: &str, decision: &str, note: &str, client: &ClientArgs) -> Result<(), CliError> {
    let api = Client::new(client)?;
    let path = format!("/v1/approvals/{}/{decision}", path_segment(id));
    let decided = api.json(reqwest::Method::POST, &path, Some(serde_json::json!({ "note": note }))).await?;
    print(client.json, &decided, |d| {
        format!("{} {}\n", d["approval_id"].as_str().unwrap_or(""), d["state"].as_str().unwrap_or(""))
    });
    Ok(())
}

/// An amount in USD (`0.25`) or, with the suffix `micros`, micro-USD (`250000micros`).
fn usd_or_micros(text: &str) -> Result<Micros, CliError> {
    match text.strip_suffix("micros") {
        Some(micros) => micros
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|m| Micros::new(m).ok())
            .ok_or_else(|| CliError::Usage(format!("amount {text:?}: an integer number of micro-USD"))),
        None => usd(text),
    }
}

fn holds_table(list: &Value, handles: &Handles, state: &str) -> String {
    let holds = list["holds"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if holds.is_empty() {
        return format!("no {state} holds\n");
    }
    let mut out = format!(
        "{:<42} {:<56} {:<8} {:>14} {:<8} {:<24} {}\n",
        "HOLD", "AGENT", "STATE", "AMOUNT", "PROTOCOL", "SERVICE", "REASON"
    );
    for h in holds {
        out.push_str(&format!(
            "{:<42} {:<56} {:<8} {:>14} {:<8} {:<24} {}\n",
            h["hold_id"].as_str().unwrap_or(""),
            handles.name(&h["agent_id"]),
            h["state"].as_str().unwrap_or(""),
            money(&h["amount_micros"]),
            h["protocol"].as_str().unwrap_or(""),
            h["service"].as_str().unwrap_or(""),
            h["reason"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!("total {}\n", money(&list["total_micros"])));
    out
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
        /// x402, acp, ap2, generic, api or mpp.
        #[arg(long)]
        protocol: Option<String>,
        /// From this time: a duration back from now (24h, 7d), a UTC date (2026-12-01), an
        /// RFC 3339 time or ms since the epoch.
        #[arg(long, alias = "since-ms")]
        since: Option<String>,
        /// Until this time (exclusive), in the same forms as --since.
        #[arg(long, alias = "until-ms")]
        until: Option<String>,
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
        /// The daemon's receipt public key (base64url), as served at /v1/receipt-key. A
        /// base64url key may begin with `-`, so the value is taken as it is.
        #[arg(long, env = "SPENDCAP_RECEIPT_PUBLIC_KEY", allow_hyphen_values = true)]
        public_key: String,
        #[arg(long)]
        json: bool,
    },
}

/// A lifetime in seconds from `90`, `90s`, `15m`, `1h` or `2d`.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: use seconds, or a number with s, m, h or d (e.g. 1h)")),
    };
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a lifetime like 1h"))?;
    number.checked_mul(scale).filter(|s| *s > 0).ok_or_else(|| format!("{text:?} is not a positive lifetime"))
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
    #[error("cannot reach spendcap at {url} — is `spendcap serve` running? (set SPENDCAP_URL or pass --url)")]
    Unreachable { url: String },
    /// The answer broke off or was not what the daemon sends; the text says how, once.
    #[error("talking to the daemon: {0}")]
    Http(String),
    #[error("{0}")]
    Receipt(#[from] crate::receipt::ReceiptError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Ledger(crate::ledger::LedgerError),
    #[error("the ledger check found {0} difference(s)")]
    Audit(usize),
    #[error("{0} doctor check(s) failed")]
    Doctor(usize),
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
        let response = request.send().await.map_err(|e| self.http_error(e))?;
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
        self.send(method, path, body).await?.json().await.map_err(|e| self.http_error(e))
    }

    /// Every agent's handle (none needed for JSON output, which carries ids only).
    async fn handles(&self, json: bool) -> Result<Handles, CliError> {
        if json {
            return Ok(Handles::default());
        }
        let list = self.json(reqwest::Method::GET, "/v1/agents", None).await?;
        let pairs = list["agents"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter_map(|a| Some((a["id"].as_str()?.to_owned(), a["handle"].as_str()?.to_owned())));
        Ok(Handles(pairs.collect()))
    }

    /// A connection that could not be made says where it tried and what to check; anything else
    /// is said once (the error's own text with its causes, not the chain printed twice).
    fn http_error(&self, error: reqwest::Error) -> CliError {
        if error.is_connect() || (error.is_timeout() && error.is_request()) {
            return CliError::Unreachable { url: self.base.clone() };
        }
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        CliError::Http(text)
    }
}

/// Agent id → handle, so that tables name an agent by both.
#[derive(Default)]
struct Handles(std::collections::BTreeMap<String, String>);

impl Handles {
    /// `handle (id)`, or the id alone when the agent is unknown.
    fn name(&self, id: &Value) -> String {
        let id = id.as_str().unwrap_or("");
        match self.0.get(id) {
            Some(handle) => format!("{handle} ({id})"),
            None => id.to_owned(),
        }
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
    value.as_u64().map(crate::human::usd).unwrap_or_default()
}

/// An ISO-8601 UTC time from a JSON `*_ms` value; empty when there is none.
fn when(value: &Value) -> String {
    value.as_u64().map(crate::human::time).unwrap_or_default()
}

/// `--since` / `--until` as the API's `since_ms` / `until_ms`.
fn time_range(query: &mut Vec<(String, String)>, since: Option<&str>, until: Option<&str>) -> Result<(), CliError> {
    let now = crate::clock::Clock::system().now_ms();
    for (key, flag, text) in [("since_ms", "--since", since), ("until_ms", "--until", until)] {
        if let Some(text) = text {
            let ms = crate::human::parse_time(text, now).map_err(|e| CliError::Usage(format!("{flag} {e}")))?;
            query.push((key.to_owned(), ms.to_string()));
        }
    }
    Ok(())
}

/// An agent's effective state as the daemon computed it (`ledger::standing`): `active`,
/// `revoked (runaway_loop)` for its own revocation, `revoked (via research)` for an ancestor's;
/// the same for `suspended` and `expired`.
fn agent_status(agent: &Value) -> String {
    let state = agent["state"].as_str().unwrap_or("active");
    let own_reason = match state {
        "revoked" => agent["revoked"].as_str(),
        "suspended" => agent["suspended"].as_str(),
        _ => None,
    };
    match (agent["state_via"]["handle"].as_str(), own_reason) {
        _ if state == "active" => state.to_owned(),
        (Some(via), _) => format!("{state} (via {via})"),
        (None, Some(reason)) => format!("{state} ({reason})"),
        (None, None) => state.to_owned(),
    }
}

fn agent_table(agents: &[Value]) -> String {
    if agents.is_empty() {
        return "no agents yet (create one with `spendcap agent create --handle research --cap 5.00`)\n".into();
    }
    let mut out = format!(
        "{:<24} {:<38} {:>16} {:>16} {:>16} {:>16}  {}\n",
        "HANDLE", "ID", "CAP", "SPENT", "HELD", "REMAINING", "STATUS"
    );
    for a in agents {
        let status = match a["archived_at_ms"].is_null() {
            true => agent_status(a),
            false => format!("archived {}", when(&a["archived_at_ms"])),
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

/// `spendcap apply`: plan, print, and (unless a dry run) apply a fleet file.
async fn apply(
    file: &std::path::Path,
    dry_run: bool,
    tokens_out: Option<PathBuf>,
    client: &ClientArgs,
) -> Result<(), CliError> {
    use reqwest::Method;
    let api = Client::new(client)?;
    let text = std::fs::read_to_string(file)?;
    let fleet = crate::fleet::parse(&text).map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let list = api.json(Method::GET, "/v1/agents", None).await?;
    let current: std::collections::BTreeMap<String, Value> = list["agents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        // An archived agent's handle is free: it names no agent for the file.
        .filter(|a| a["archived_at_ms"].is_null())
        .filter_map(|a| Some((a["handle"].as_str()?.to_owned(), a.clone())))
        .collect();
    let api_ref = &api;
    let steps = crate::fleet::plan(&fleet, &current, |id: String| async move {
        api_ref
            .json(Method::GET, &format!("/v1/agents/{}/controls", path_segment(&id)), None)
            .await
            .map_err(|e| crate::fleet::FleetError::Invalid(e.to_string()))
    })
    .await
    .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    print!("{}", crate::fleet::render(&steps));
    if dry_run {
        println!("--dry-run: nothing was changed");
        return Ok(());
    }
    let mut tokens = std::collections::BTreeMap::new();
    for step in &steps {
        match &step.action {
            crate::fleet::Action::Create { body } => {
                let created = api.json(Method::POST, "/v1/agents", Some(body.clone())).await?;
                tokens.insert(step.handle.clone(), created["token"].as_str().unwrap_or_default().to_owned());
            }
            crate::fleet::Action::Update { calls, .. } => {
                for (method, path, body) in calls {
                    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::PUT);
                    api.json(method, path, Some(body.clone())).await?;
                }
            }
            crate::fleet::Action::Archive { agent_id } => {
                api.json(Method::POST, &format!("/v1/agents/{}/archive", path_segment(agent_id)), None).await?;
            }
            crate::fleet::Action::Unchanged => {}
        }
    }
    match tokens_out {
        Some(path) if !tokens.is_empty() => {
            use std::io::Write;
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mut out =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
            // An existing file keeps its mode on open: make it private before writing a token.
            out.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            out.write_all(serde_json::to_string_pretty(&tokens).unwrap_or_default().as_bytes())?;
            println!("applied; the tokens of {} new agent(s) are in {} (mode 0600)", tokens.len(), path.display());
        }
        _ if tokens.is_empty() => println!("applied"),
        _ => {
            println!("applied; new agents' tokens (shown once, store them now):");
            for (handle, token) in &tokens {
                println!("{handle} {token}");
            }
        }
    }
    Ok(())
}

/// Runs one client subcommand.
pub async fn run_client(command: Command) -> Result<(), CliError> {
    use reqwest::Method;
    match command {
        Command::Serve(_) | Command::Demo { .. } | Command::Mcp(_) => {
            Err(CliError::Usage("not a client command".into()))
        }
        Command::Apply { file, dry_run, tokens_out, client } => apply(&file, dry_run, tokens_out, &client).await,
        Command::Agent(AgentCommand::Archive { agent, client }) => {
            let api = Client::new(&client)?;
            let done = api.json(Method::POST, &format!("/v1/agents/{}/archive", path_segment(&agent)), None).await?;
            print(client.json, &done, |r| {
                format!(
                    "archived {} ({}) at {}{}; the handle is free again, its history is kept\n",
                    r["handle"].as_str().unwrap_or(""),
                    r["agent_id"].as_str().unwrap_or(""),
                    when(&r["archived_at_ms"]),
                    if r["already_archived"].as_bool().unwrap_or(false) { " (it already was)" } else { "" }
                )
            });
            Ok(())
        }
        Command::Doctor(args) => {
            let checks = crate::doctor::checks(&args.serve).await;
            if args.json {
                println!("{}", serde_json::json!({ "ok": checks.iter().all(|c| c.ok), "checks": checks }));
            } else {
                print!("{}", crate::doctor::render(&checks));
            }
            match checks.iter().filter(|c| !c.ok).count() {
                0 => Ok(()),
                failed => Err(CliError::Doctor(failed)),
            }
        }
        Command::Ledger(LedgerCommand::Check { redis_url, redis_cluster, redis_namespace, json }) => {
            let config = crate::ledger::RedisConfig {
                url: redis_url,
                cluster: redis_cluster,
                namespace: redis_namespace,
                timeout: std::time::Duration::from_secs(10),
                clock: crate::ledger::LedgerClock::Redis,
            };
            let ledger = crate::ledger::Ledger::Redis(
                crate::ledger::RedisLedger::connect_without_loading(&config).await.map_err(CliError::Ledger)?,
            );
            let report = crate::audit::check(&ledger).await.map_err(CliError::Ledger)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                for difference in &report.differences {
                    println!("DIFFERENCE {difference}");
                }
                println!(
                    "{}: {} trees, {} agents, {} budgets, {} open holds, {} log entries replayed",
                    if report.is_clean() { "ok" } else { "FAILED" },
                    report.trees,
                    report.agents,
                    report.budgets,
                    report.open_holds,
                    report.log_entries
                );
            }
            if report.is_clean() {
                Ok(())
            } else {
                Err(CliError::Audit(report.differences.len()))
            }
        }
        Command::Agent(AgentCommand::Create { handle, cap, parent, ttl_secs, labels, task, client }) => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({
                "handle": handle,
                "cap_micros": usd(&cap)?.get(),
                "parent": parent,
                "ttl_secs": ttl_secs,
                "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "task": task,
            });
            let created = api.json(Method::POST, "/v1/agents", Some(body)).await?;
            print(client.json, &created, |c| {
                format!(
                    "{}token (shown once, store it now):\nexport SPENDCAP_AGENT_TOKEN={}\n",
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
            let handles = api.handles(client.json).await?;
            print(client.json, &revoked, |r| {
                format!(
                    "revoked {} ({}) at {}{}\n",
                    handles.name(&r["agent_id"]),
                    r["reason"].as_str().unwrap_or(""),
                    when(&r["revoked_at_ms"]),
                    if r["already_revoked"].as_bool().unwrap_or(false) { " (it already was)" } else { "" }
                )
            });
            Ok(())
        }
        Command::Agent(AgentCommand::Token { agent, task, ttl, client }) => {
            let api = Client::new(&client)?;
            let created = api
                .json(
                    Method::POST,
                    &format!("/v1/agents/{}/tokens", path_segment(&agent)),
                    Some(serde_json::json!({ "task": task, "ttl_secs": ttl })),
                )
                .await?;
            print(client.json, &created, |r| {
                format!(
                    "task token {} for task {} (shown once; expires {}):\nexport SPENDCAP_AGENT_TOKEN={}\n",
                    r["token_id"].as_str().unwrap_or(""),
                    r["task"].as_str().unwrap_or(""),
                    r["expires_at_ms"].as_u64().map(crate::human::time).unwrap_or_default(),
                    r["token"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
        Command::Agent(AgentCommand::RotateToken { agent, client }) => {
            let api = Client::new(&client)?;
            let rotated =
                api.json(Method::POST, &format!("/v1/agents/{}/rotate-token", path_segment(&agent)), None).await?;
            print(client.json, &rotated, |r| {
                format!("new token (shown once):\nexport SPENDCAP_AGENT_TOKEN={}\n", r["token"].as_str().unwrap_or(""))
            });
            Ok(())
        }
        Command::Agent(AgentCommand::Controls { agent, controls, client }) => {
            let api = Client::new(&client)?;
            let path = format!("/v1/agents/{}/controls", path_segment(&agent));
            let shown = if controls.is_show() {
                api.json(Method::GET, &path, None).await?
            } else {
                api.json(Method::PUT, &path, Some(controls.body()?)).await?
            };
            let handles = api.handles(client.json).await?;
            print(client.json, &shown, |c| controls_table(c, &handles));
            Ok(())
        }
        Command::Agent(AgentCommand::Expiry { agent, ttl_secs, at_ms, never, client }) => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({ "ttl_secs": ttl_secs, "expires_at_ms": at_ms, "never": never });
            let shown =
                api.json(Method::PUT, &format!("/v1/agents/{}/expiry", path_segment(&agent)), Some(body)).await?;
            print(client.json, &shown, |a| agent_table(std::slice::from_ref(a)));
            Ok(())
        }
        Command::Agent(AgentCommand::Reinstate { agent, client }) => {
            let api = Client::new(&client)?;
            let done = api.json(Method::POST, &format!("/v1/agents/{}/reinstate", path_segment(&agent)), None).await?;
            let handles = api.handles(client.json).await?;
            print(client.json, &done, |r| match r["was_suspended"].as_str() {
                Some(was) => format!("reinstated {} (was suspended: {was})\n", handles.name(&r["agent_id"])),
                None => format!("{} was not suspended\n", handles.name(&r["agent_id"])),
            });
            Ok(())
        }
        Command::Agent(AgentCommand::Periods { agent, client }) => {
            let api = Client::new(&client)?;
            let list = api.json(Method::GET, &format!("/v1/agents/{}/periods", path_segment(&agent)), None).await?;
            let periods = list["periods"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if periods.is_empty() && !client.json {
                // Say why there is nothing: no limit is set, or nothing was paid under one yet.
                let controls =
                    api.json(Method::GET, &format!("/v1/agents/{}/controls", path_segment(&agent)), None).await?;
                let limits: Vec<String> = controls["limits"]
                    .as_object()
                    .map(|l| l.iter().map(|(period, limit)| format!("{period} {}", money(limit))).collect())
                    .unwrap_or_default();
                if limits.is_empty() {
                    println!(
                        "{agent} has no period limits, so no spend is counted per period (set one with \
                         `spendcap agent controls {agent} --limit daily=5.00`)"
                    );
                } else {
                    println!("{agent} has period limits ({}) but has paid nothing under them yet", limits.join(", "));
                }
                return Ok(());
            }
            print(client.json, &list, |_| {
                let mut out =
                    format!("{:<10} {:<20} {:>16} {:>16} {:>16}\n", "PERIOD", "START (UTC)", "SPENT", "HELD", "LIMIT");
                for p in periods {
                    out.push_str(&format!(
                        "{:<10} {:<20} {:>16} {:>16} {:>16}{}\n",
                        p["period"].as_str().unwrap_or(""),
                        when(&p["start_ms"]),
                        money(&p["spent_micros"]),
                        money(&p["held_micros"]),
                        money(&p["limit_micros"]),
                        if p["current"].as_bool().unwrap_or(false) { "  (current)" } else { "" }
                    ));
                }
                out
            });
            Ok(())
        }
        Command::Report { agent, since, until, csv, client } => {
            let api = Client::new(&client)?;
            let mut query = vec![("format".to_owned(), if csv { "csv" } else { "json" }.to_owned())];
            if let Some(agent) = agent {
                query.push(("agent".into(), agent));
            }
            time_range(&mut query, since.as_deref(), until.as_deref())?;
            let encoded = query.iter().map(|(k, v)| format!("{k}={}", path_segment(v))).collect::<Vec<_>>().join("&");
            let response = api.send(Method::GET, &format!("/v1/reports?{encoded}"), None).await?;
            if csv {
                print!("{}", response.text().await.map_err(|e| api.http_error(e))?);
                return Ok(());
            }
            let value: Value = response.json().await.map_err(|e| api.http_error(e))?;
            print(client.json, &value, |v| match serde_json::from_value::<crate::report::Report>(v.clone()) {
                Ok(report) => crate::report::table(&report),
                Err(e) => format!("unreadable report: {e}\n"),
            });
            Ok(())
        }
        Command::Operators(command) => operators_command(command).await,
        Command::Whoami { client } => {
            let api = Client::new(&client)?;
            let me = api.json(Method::GET, "/v1/whoami", None).await?;
            print(client.json, &me, whoami_text);
            Ok(())
        }
        Command::Holds(HoldsCommand::List { state, agent, client }) => {
            let api = Client::new(&client)?;
            let mut query = format!("/v1/holds?state={}", path_segment(&state));
            if let Some(agent) = agent {
                query.push_str(&format!("&agent={}", path_segment(&agent)));
            }
            let list = api.json(Method::GET, &query, None).await?;
            let handles = api.handles(client.json).await?;
            print(client.json, &list, |l| holds_table(l, &handles, &state));
            Ok(())
        }
        Command::Holds(HoldsCommand::Resolve { hold, settle, void, reason, client }) => {
            let api = Client::new(&client)?;
            let body = match (settle, void) {
                (Some(amount), false) => serde_json::json!({
                    "outcome": "settled", "amount_micros": usd_or_micros(&amount)?.get(), "reason": reason,
                }),
                (None, true) => serde_json::json!({ "outcome": "voided", "reason": reason }),
                _ => return Err(CliError::Usage("give --settle <amount> or --void".into())),
            };
            let path = format!("/v1/holds/{}/resolve", path_segment(&hold));
            let resolved = api.json(Method::POST, &path, Some(body)).await?;
            print(client.json, &resolved, |r| {
                format!(
                    "{} {}: {} spent, {} released{}\n",
                    r["hold_id"].as_str().unwrap_or(""),
                    r["outcome"].as_str().unwrap_or(""),
                    money(&r["amount_micros"]),
                    money(&r["released_micros"]),
                    if r["replayed"].as_bool().unwrap_or(false) { " (already resolved so)" } else { "" }
                )
            });
            Ok(())
        }
        Command::Approvals(ApprovalsCommand::List { state, client }) => {
            let api = Client::new(&client)?;
            let path = match state {
                Some(state) => format!("/v1/approvals?state={}", path_segment(&state)),
                None => "/v1/approvals".to_owned(),
            };
            let list = api.json(Method::GET, &path, None).await?;
            print(client.json, &list, approvals_table);
            Ok(())
        }
        Command::Approvals(ApprovalsCommand::Approve { id, note, client }) => {
            decide_approval(&id, "approve", &note, &client).await
        }
        Command::Approvals(ApprovalsCommand::Deny { id, note, client }) => {
            decide_approval(&id, "deny", &note, &client).await
        }
        Command::TaskOutcome { agent, task, outcome, task_type, client } => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({ "outcome": outcome, "task_type": task_type, "agent": agent });
            let value =
                api.json(Method::POST, &format!("/v1/tasks/{}/outcome", path_segment(&task)), Some(body)).await?;
            print(client.json, &value, |v| {
                format!(
                    "{} {}: {} ({})\n",
                    v["agent"].as_str().unwrap_or(""),
                    v["task"].as_str().unwrap_or(""),
                    v["outcome"].as_str().unwrap_or(""),
                    v["task_type"].as_str().unwrap_or("")
                )
            });
            Ok(())
        }
        Command::Log(LogCommand::Export { format, agent, task, service, protocol, since, until, client }) => {
            let api = Client::new(&client)?;
            let mut query = vec![(
                "format".to_owned(),
                match format {
                    ExportFormat::Jsonl => "jsonl".to_owned(),
                    ExportFormat::Csv => "csv".to_owned(),
                },
            )];
            for (key, value) in [("agent", agent), ("task", task), ("service", service), ("protocol", protocol)] {
                if let Some(value) = value {
                    query.push((key.to_owned(), value));
                }
            }
            time_range(&mut query, since.as_deref(), until.as_deref())?;
            let encoded = query.iter().map(|(k, v)| format!("{k}={}", path_segment(v))).collect::<Vec<_>>().join("&");
            let mut response = api.send(Method::GET, &format!("/v1/log?{encoded}"), None).await?;
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = response.chunk().await.map_err(|e| api.http_error(e))? {
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

/// `spendcap operators create|list|revoke`.
async fn operators_command(command: OperatorsCommand) -> Result<(), CliError> {
    use reqwest::Method;
    match command {
        OperatorsCommand::Create { name, role, tree, client } => {
            let api = Client::new(&client)?;
            let body = serde_json::json!({ "name": name, "role": role, "tree": tree });
            let created = api.json(Method::POST, "/v1/operators", Some(body)).await?;
            print(client.json, &created, |c| {
                format!(
                    "{}operator token (shown once):\nexport SPENDCAP_ADMIN_TOKEN={}\n",
                    operators_table(std::slice::from_ref(c)),
                    c["token"].as_str().unwrap_or("")
                )
            });
        }
        OperatorsCommand::List { client } => {
            let api = Client::new(&client)?;
            let list = api.json(Method::GET, "/v1/operators", None).await?;
            print(client.json, &list, |l| operators_table(l["operators"].as_array().map(Vec::as_slice).unwrap_or(&[])));
        }
        OperatorsCommand::Revoke { name, client } => {
            let api = Client::new(&client)?;
            let path = format!("/v1/operators/{}/revoke", path_segment(&name));
            let revoked = api.json(Method::POST, &path, None).await?;
            print(client.json, &revoked, |r| {
                format!(
                    "revoked operator {} at {}{}\n",
                    r["name"].as_str().unwrap_or(""),
                    when(&r["revoked_at_ms"]),
                    if r["already_revoked"].as_bool().unwrap_or(false) { " (it already was)" } else { "" }
                )
            });
        }
    }
    Ok(())
}

fn operators_table(operators: &[Value]) -> String {
    let mut out = format!("{:<24} {:<9} {:<17} {:<20} {}\n", "NAME", "ROLE", "TREE", "CREATED", "REVOKED");
    for o in operators {
        out.push_str(&format!(
            "{:<24} {:<9} {:<17} {:<20} {}\n",
            o["name"].as_str().unwrap_or(""),
            o["role"].as_str().unwrap_or(""),
            o["tree"].as_str().unwrap_or("every tree"),
            when(&o["created_at_ms"]),
            when(&o["revoked_at_ms"]),
        ));
    }
    out
}

fn whoami_text(me: &Value) -> String {
    let list = |key: &str| {
        me[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    format!(
        "{} ({}, {})\nactions: {}\ntighten only: {}\n",
        me["name"].as_str().unwrap_or(""),
        me["role"].as_str().unwrap_or(""),
        me["tree"].as_str().map_or("every tree".to_owned(), |t| format!("tree {t}")),
        list("actions"),
        list("tighten_only"),
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, ReceiptCommand};

    /// A receipt key is base64url: one in 64 begins with `-` (a flaky CLI test found it).
    #[test]
    fn a_public_key_beginning_with_a_hyphen_is_a_value() {
        let key = "-jA8xq0Yw3c1n5m2Vb6t9Lk4Hs7Gd0Fe1Zr2Xy3Wu4I";
        let cli =
            Cli::try_parse_from(["spendcap", "receipt", "verify", "chain.jsonl", "--public-key", key]).expect("parses");
        let Command::Receipt(ReceiptCommand::Verify { public_key, .. }) = cli.command else {
            panic!("a receipt verify command");
        };
        assert_eq!(public_key, key);
    }
}
