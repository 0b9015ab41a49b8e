//! Paid MCP tools: the upstream MCP servers the daemon fronts for agents, and one tool call to
//! them as a transport of the x402 purchase flow.
//!
//! The operator names the upstreams (`--mcp-upstream weather=https://…/mcp`); agents reach them
//! through the daemon only (`GET /v1/mcp/tools`, `POST /v1/mcp/call`, and the MCP face, which
//! offers their tools next to its own), because a paid call is signed with the daemon's master
//! key, which never leaves it. Each upstream URL goes through the x402 fetch's destination checks
//! (public addresses only unless allow-listed, never Redis nor the daemon itself), checked again
//! by the resolver of the client's every connection.
//!
//! ```text
//! POST /v1/mcp/call ─▶ purchase::fetch_via(Transport::Mcp) ─▶ tools/call (unpaid)
//!   ─▶ isError + PaymentRequired? ─▶ the x402 flow: precheck, choose, hold, sign
//!   ─▶ tools/call again with _meta["x402/payment"] ─▶ _meta["x402/payment-response"] ─▶ settle
//! ```
//!
//! The MCP binding is read into the HTTP shape the flow already knows
//! (`adapters::x402::http_answer_of_tool_result`): a payment request is a 402 with
//! `PAYMENT-REQUIRED`, a result a 200 whose body is the tool result, a settlement report the
//! `PAYMENT-RESPONSE` header. Everything the flow decides (hold, one authorization per purchase,
//! unknown outcomes, idempotency and replays) is therefore the HTTP fetch's.

pub(crate) mod routes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use adapters::x402::{http_answer_of_tool_result, meta_with_payment, PaymentPayload};
use bytes::Bytes;
use clap::Args;
use reqwest::{Method, Url};
use rmcp::model::{CallToolRequestParams, JsonObject, MetaObject, RequestMetaObject, Tool};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt as _;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::x402::destination::{check_url, refused_in, CheckedResolver, Destinations};
use super::x402::upstream::{Answer, Outgoing, UpstreamError};
use super::ConfigError;
use crate::outcome::{Failure, Kind};

/// The separator of a prefixed tool name (`weather__get_forecast`), used only when two upstreams
/// (or an upstream and spendcap's own tools) offer the same name.
pub const PREFIX_SEPARATOR: &str = "__";

/// `serve` flags of paid MCP tools.
#[derive(Args, Debug, Clone, Default)]
pub struct McpUpstreamArgs {
    /// Upstream MCP servers (streamable HTTP) whose tools agents may call through the daemon,
    /// paid within their caps: `NAME=URL`, comma-separated (e.g.
    /// weather=https://weather.example/mcp). Their addresses go through the x402 destination
    /// checks (SPENDCAP_X402_ALLOW_PRIVATE).
    #[arg(long = "mcp-upstream", env = "SPENDCAP_MCP_UPSTREAMS", value_delimiter = ',', value_name = "NAME=URL")]
    pub upstreams: Vec<String>,
}

/// One upstream as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub name: String,
    pub url: Url,
}

/// Paid MCP tools' configuration.
#[derive(Clone, Debug, Default)]
pub struct McpUpstreamConfig {
    pub upstreams: Vec<UpstreamSpec>,
}

fn config_error(reason: impl Into<String>) -> ConfigError {
    ConfigError { protocol: "mcp upstream", reason: reason.into() }
}

/// Whether a name is a usable upstream (or tool-name prefix): 1 to 32 of `[a-z0-9_-]`.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl McpUpstreamConfig {
    pub fn from_args(args: &McpUpstreamArgs) -> Result<McpUpstreamConfig, ConfigError> {
        let mut upstreams: Vec<UpstreamSpec> = Vec::new();
        for entry in args.upstreams.iter().map(|entry| entry.trim()).filter(|entry| !entry.is_empty()) {
            let (name, url) = entry
                .split_once('=')
                .ok_or_else(|| config_error(format!("SPENDCAP_MCP_UPSTREAMS: {entry:?} is not NAME=URL")))?;
            let name = name.trim();
            if !valid_name(name) {
                return Err(config_error(format!(
                    "SPENDCAP_MCP_UPSTREAMS: {name:?} is not a name (1 to 32 of a-z, 0-9, - and _)"
                )));
            }
            let url = Url::parse(url.trim())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && url.username().is_empty())
                .ok_or_else(|| {
                    config_error(format!("SPENDCAP_MCP_UPSTREAMS: the URL of {name} is not an http(s) URL"))
                })?;
            if upstreams.iter().any(|known| known.name == name) {
                return Err(config_error(format!("SPENDCAP_MCP_UPSTREAMS: {name} is named twice")));
            }
            upstreams.push(UpstreamSpec { name: name.to_owned(), url });
        }
        Ok(McpUpstreamConfig { upstreams })
    }
}

/// One upstream at run time: its URL and the client that reaches it.
struct Upstream {
    spec: UpstreamSpec,
    client: reqwest013::Client,
}

/// The upstreams at run time.
pub struct McpUpstreams {
    upstreams: Vec<Arc<Upstream>>,
    destinations: Destinations,
    timeout: Duration,
}

/// A tool as offered to agents: the upstream's tool unchanged but for its name, prefixed with
/// the upstream's (`weather__forecast`) only when another upstream or spendcap itself offers
/// the same name.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OfferedTool {
    /// The upstream's name, as configured.
    pub upstream: String,
    /// The tool's name on its upstream (what `POST /v1/mcp/call` takes as `tool`).
    pub upstream_tool: String,
    /// The MCP tool definition offered to agents (`name` is the offered name).
    #[schema(value_type = Object)]
    pub tool: Value,
}

/// Why the upstreams' tools could not be listed or called (nothing was paid).
fn upstream_failure(kind: Kind, code: &'static str, detail: impl Into<String>) -> Failure {
    Failure::new(kind, code, detail)
}

impl McpUpstreams {
    pub fn build(
        config: McpUpstreamConfig,
        destinations: Destinations,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<McpUpstreams, ConfigError> {
        let mut upstreams = Vec::new();
        for spec in config.upstreams {
            // The resolver knows the upstream's port, so a name that resolves to Redis or to the
            // daemon's own listen address is refused like an x402 fetch's.
            let resolver =
                CheckedResolver { destinations: destinations.clone(), port: spec.url.port_or_known_default() };
            let client = reqwest013::Client::builder()
                .no_proxy()
                .redirect(reqwest013::redirect::Policy::none())
                .dns_resolver(Arc::new(resolver))
                .connect_timeout(connect_timeout)
                .user_agent(concat!("spendcap/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|err| config_error(format!("cannot build the MCP client of {}: {err}", spec.name)))?;
            tracing::info!(upstream = %spec.name, host = spec.url.host_str().unwrap_or_default(), "paid MCP tools: upstream configured");
            upstreams.push(Arc::new(Upstream { spec, client }));
        }
        Ok(McpUpstreams { upstreams, destinations, timeout })
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    fn upstream(&self, name: &str) -> Result<&Arc<Upstream>, Failure> {
        self.upstreams.iter().find(|upstream| upstream.spec.name == name).ok_or_else(|| {
            upstream_failure(Kind::NotFound, "mcp_upstream_unknown", format!("no MCP upstream is named {name:?}"))
        })
    }

    /// Every upstream's tools, as offered to agents. `reserved` are names offered already
    /// (spendcap's own tools): an upstream tool with one of them is prefixed too.
    pub async fn list_tools(&self, only: Option<&str>, reserved: &[&str]) -> Result<Vec<OfferedTool>, Failure> {
        if let Some(name) = only {
            self.upstream(name)?;
        }
        let mut listed: Vec<(String, Tool)> = Vec::new();
        for upstream in &self.upstreams {
            if only.is_some_and(|name| name != upstream.spec.name) {
                continue;
            }
            let session = Session::open(upstream, &self.destinations, self.timeout).await.map_err(listing_failure)?;
            let tools = tokio::time::timeout(self.timeout, session.client.list_all_tools()).await.map_err(|_| {
                upstream_failure(
                    Kind::ProviderTimeout,
                    "mcp_upstream_timeout",
                    "the upstream did not list its tools in time",
                )
            })?;
            session.close().await;
            let tools = tools.map_err(|err| {
                listing_failure(UpstreamError::NoResponse { timed_out: false, detail: err.to_string() })
            })?;
            listed.extend(tools.into_iter().map(|tool| (upstream.spec.name.clone(), tool)));
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (_, tool) in &listed {
            *counts.entry(tool.name.to_string()).or_default() += 1;
        }
        Ok(listed
            .into_iter()
            .map(|(upstream, tool)| {
                let name = tool.name.to_string();
                let collides = counts.get(&name).copied().unwrap_or_default() > 1 || reserved.contains(&name.as_str());
                let offered = if collides { format!("{upstream}{PREFIX_SEPARATOR}{name}") } else { name.clone() };
                let mut definition = serde_json::to_value(&tool).unwrap_or_else(|_| json!({}));
                if let Value::Object(object) = &mut definition {
                    object.insert("name".to_owned(), Value::String(offered));
                }
                OfferedTool { upstream, upstream_tool: name, tool: definition }
            })
            .collect())
    }

    /// One call of an upstream tool, for the purchase flow. Checks the upstream's URL now (an IP
    /// literal, against the reserved addresses the daemon learnt at start-up).
    pub fn tool_call(&self, upstream: &str, tool: &str, arguments: Option<JsonObject>) -> Result<ToolCall, Failure> {
        let upstream = self.upstream(upstream)?;
        check_url(upstream.spec.url.as_str(), &self.destinations).map_err(|err| {
            upstream_failure(
                Kind::Forbidden,
                "x402_destination_forbidden",
                format!("MCP upstream {}: {err}", upstream.spec.name),
            )
        })?;
        Ok(ToolCall {
            upstream: upstream.clone(),
            destinations: self.destinations.clone(),
            tool: tool.to_owned(),
            arguments,
            session: Mutex::new(None),
            timeout: self.timeout,
        })
    }
}

fn listing_failure(err: UpstreamError) -> Failure {
    match err {
        UpstreamError::Refused(refused) => {
            upstream_failure(Kind::Forbidden, "x402_destination_forbidden", refused.to_string())
        }
        UpstreamError::NoResponse { timed_out: true, detail } => {
            upstream_failure(Kind::ProviderTimeout, "mcp_upstream_timeout", detail)
        }
        UpstreamError::NoResponse { detail, .. } | UpstreamError::Body { detail, .. } => {
            upstream_failure(Kind::Provider, "mcp_upstream_unreachable", detail)
        }
    }
}

/// An initialised MCP session with an upstream.
struct Session {
    client: RunningService<RoleClient, ()>,
}

/// A transport or session error as the flow's [`UpstreamError`]: a refused destination, or no
/// answer.
fn no_answer(err: &(dyn std::error::Error + 'static), timed_out: bool) -> UpstreamError {
    match refused_in(err) {
        Some(refused) => UpstreamError::Refused(refused),
        None => {
            let mut detail = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                detail.push_str(": ");
                detail.push_str(&cause.to_string());
                source = cause.source();
            }
            UpstreamError::NoResponse { timed_out, detail }
        }
    }
}

impl Session {
    async fn open(
        upstream: &Upstream,
        destinations: &Destinations,
        timeout: Duration,
    ) -> Result<Session, UpstreamError> {
        check_url(upstream.spec.url.as_str(), destinations).map_err(|err| match err {
            super::x402::destination::UrlError::Refused(refused) => UpstreamError::Refused(refused),
            other => UpstreamError::NoResponse { timed_out: false, detail: other.to_string() },
        })?;
        let config = StreamableHttpClientTransportConfig::with_uri(upstream.spec.url.as_str());
        let transport = StreamableHttpClientTransport::with_client(upstream.client.clone(), config);
        match tokio::time::timeout(timeout, ().serve(transport)).await {
            Ok(Ok(client)) => Ok(Session { client }),
            Ok(Err(err)) => Err(no_answer(&err, false)),
            Err(_) => Err(UpstreamError::NoResponse {
                timed_out: true,
                detail: "the MCP session with the upstream did not open in time".to_owned(),
            }),
        }
    }

    async fn close(mut self) {
        let _ = self.client.close().await;
    }
}

/// One tool call to an upstream, sent unpaid first and then, when it asks, with the payment: a
/// transport of the x402 purchase flow. Both calls go over one MCP session.
pub struct ToolCall {
    upstream: Arc<Upstream>,
    destinations: Destinations,
    tool: String,
    arguments: Option<JsonObject>,
    session: Mutex<Option<Session>>,
    timeout: Duration,
}

impl ToolCall {
    /// What the purchase flow keys and fingerprints the purchase by, and logs as its resource:
    /// the upstream's URL with the tool as fragment (`https://weather.example/mcp#forecast`),
    /// and the call as body (tool and arguments, canonical JSON). It is never sent anywhere.
    pub fn outgoing(&self) -> Outgoing {
        let mut url = self.upstream.spec.url.clone();
        url.set_fragment(Some(&self.tool));
        // serde_json's maps are sorted: the same call is always the same bytes.
        let body = serde_json::to_vec(&json!({ "tool": self.tool, "arguments": self.arguments })).unwrap_or_default();
        Outgoing { method: Method::POST, url, headers: Default::default(), body: Bytes::from(body) }
    }

    /// Calls the tool (with `_meta["x402/payment"]` when paying) and reads the result into the
    /// flow's answer; a JSON-RPC error of the upstream is an answer too (a 502-like one: no
    /// payment request, no settlement).
    pub async fn send(&self, payment: Option<&PaymentPayload>, timeout: Duration) -> Result<Answer, UpstreamError> {
        let timeout = timeout.min(self.timeout);
        let mut session = self.session.lock().await;
        if session.is_none() {
            *session = Some(Session::open(&self.upstream, &self.destinations, timeout).await?);
        }
        let Some(open) = session.as_ref() else {
            return Err(UpstreamError::NoResponse { timed_out: false, detail: "no MCP session".to_owned() });
        };
        let mut params = CallToolRequestParams::new(self.tool.clone());
        params.arguments = self.arguments.clone();
        if let Some(payment) = payment {
            let meta = meta_with_payment(None, payment)
                .map_err(|err| UpstreamError::NoResponse { timed_out: false, detail: err.to_string() })?;
            params.meta = Some(RequestMetaObject(MetaObject(meta)));
        }
        let result = match tokio::time::timeout(timeout, open.client.call_tool(params)).await {
            Err(_) => {
                return Err(UpstreamError::NoResponse {
                    timed_out: true,
                    detail: format!("the upstream's tool {} did not answer in time", self.tool),
                })
            }
            Ok(Ok(result)) => serde_json::to_value(&result).unwrap_or_else(|_| json!({})),
            Ok(Err(ServiceError::McpError(error))) => {
                // The upstream answered with a JSON-RPC error: passed back as the tool's error.
                let body = json!({ "jsonrpc_error": error });
                return Answer::from_parts(200, Vec::new(), Bytes::from(body.to_string()))
                    .ok_or_else(|| UpstreamError::NoResponse { timed_out: false, detail: "unreadable".to_owned() });
            }
            Ok(Err(err)) => return Err(no_answer(&err, matches!(err, ServiceError::Timeout { .. }))),
        };
        let (status, headers, body) = http_answer_of_tool_result(&result);
        Answer::from_parts(status, headers, Bytes::from(body))
            .ok_or_else(|| UpstreamError::NoResponse { timed_out: false, detail: "unreadable tool result".to_owned() })
    }

    /// Ends the MCP session.
    pub async fn close(&self) {
        if let Some(session) = self.session.lock().await.take() {
            session.close().await;
        }
    }
}

/// The tool result of a 200 answer body (see [`ToolCall::send`]), or the upstream's JSON-RPC
/// error as an MCP error result.
pub fn tool_result_of_body(body: &[u8]) -> Map<String, Value> {
    let mut object = adapters::x402::tool_result_of_http_body(body).unwrap_or_default();
    if let Some(error) = object.remove("jsonrpc_error") {
        let message =
            error.get("message").and_then(Value::as_str).unwrap_or("the upstream refused the call").to_owned();
        return Map::from_iter([
            ("content".to_owned(), json!([{ "type": "text", "text": message }])),
            ("isError".to_owned(), Value::Bool(true)),
            ("structuredContent".to_owned(), json!({ "upstream_error": error })),
        ]);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<McpUpstreamConfig, String> {
        let args = McpUpstreamArgs { upstreams: entries.iter().map(|entry| (*entry).to_owned()).collect() };
        McpUpstreamConfig::from_args(&args).map_err(|err| err.reason)
    }

    #[test]
    fn upstreams_are_named_http_urls_each_named_once() {
        let config = parse(&["weather=https://weather.example/mcp", " maps = http://10.0.0.7:9000/mcp ", ""])
            .expect("two upstreams");
        let names: Vec<_> = config.upstreams.iter().map(|u| (u.name.as_str(), u.url.as_str())).collect();
        assert_eq!(names, [("weather", "https://weather.example/mcp"), ("maps", "http://10.0.0.7:9000/mcp")]);
        assert!(parse(&["weather"]).expect_err("no URL").contains("NAME=URL"));
        assert!(parse(&["Weather!=https://w.example/mcp"]).expect_err("bad name").contains("is not a name"));
        assert!(parse(&["w=ftp://w.example/mcp"]).expect_err("scheme").contains("not an http(s) URL"));
        assert!(parse(&["w=https://user:pw@w.example/mcp"]).expect_err("credentials").contains("not an http(s) URL"));
        let twice = parse(&["w=https://a.example/mcp", "w=https://b.example/mcp"]).expect_err("twice");
        assert!(twice.contains("named twice"));
    }
}
