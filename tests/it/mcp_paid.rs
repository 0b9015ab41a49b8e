//! Paid MCP tools against an upstream MCP server built with rmcp (the official Rust SDK) that
//! speaks the x402 MCP binding: the daemon's x402 payloads land under `target/conformance/` (the
//! CI validates them against the official SDK's models), the purchase is paid once, settled at
//! the price, replayed for the same key, and a result without a settlement report leaves the
//! amount held as unknown. The official x402 package's own MCP server is the counterpart of
//! `clients/python/tests/test_mcp_paid_official.py`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};
use spendcap::protocols::mcp_upstream::{McpUpstreamArgs, McpUpstreamConfig};
use spendcap::protocols::ProtocolConfig;

use crate::support::{spawn_app_with, AppOptions, TestApp};

const PRICE: u64 = 10_000;
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

/// An MCP server with one tool paid over the x402 MCP binding.
#[derive(Clone, Default)]
struct PaidWeather {
    calls: Arc<AtomicUsize>,
    payments: Arc<AtomicUsize>,
    /// Answer a paid call without a settlement report.
    no_settlement: bool,
}

fn payment_required() -> Value {
    json!({
        "x402Version": 2,
        "error": "Payment required to access this tool",
        "resource": {"url": "mcp://tool/get_forecast", "description": "Tool: get_forecast", "mimeType": "application/json"},
        "accepts": [{
            "scheme": "exact", "network": "eip155:84532", "amount": PRICE.to_string(),
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "payTo": PAY_TO, "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"}
        }]
    })
}

impl ServerHandler for PaidWeather {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tool: Tool = serde_json::from_value(json!({
            "name": "get_forecast", "description": "Tomorrow's sky ($0.01)",
            "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}}
        }))
        .expect("a tool");
        Ok(ListToolsResult::with_all_items(vec![tool]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let payment = request
            .meta
            .as_ref()
            .and_then(|meta| meta.0 .0.get("x402/payment").cloned())
            .or_else(|| context.meta.0 .0.get("x402/payment").cloned());
        let result = match payment {
            None => {
                let required = payment_required();
                json!({"content": [{"type": "text", "text": required.to_string()}], "structuredContent": required, "isError": true})
            }
            Some(payment) => {
                self.payments.fetch_add(1, Ordering::SeqCst);
                assert_eq!(payment["accepted"]["payTo"], PAY_TO, "{payment}");
                let text =
                    json!({"city": request.arguments.as_ref().and_then(|a| a.get("city")).cloned(), "sky": "clear"});
                let mut result = json!({"content": [{"type": "text", "text": text.to_string()}]});
                if !self.no_settlement {
                    result["_meta"] = json!({"x402/payment-response": {
                        "success": true, "transaction": "0xfeed", "network": "eip155:84532",
                        "payer": payment["payload"]["authorization"]["from"]
                    }});
                }
                result
            }
        };
        let result: CallToolResult = serde_json::from_value(result).expect("a tool result");
        Ok(result.into())
    }
}

/// Serves `server` over streamable HTTP on 127.0.0.1; returns its `/mcp` URL.
async fn serve(server: PaidWeather) -> String {
    let config = StreamableHttpServerConfig::default().with_legacy_session_mode(false).with_json_response(true);
    let service = StreamableHttpService::new(move || Ok(server.clone()), NeverSessionManager::default().into(), config);
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{address}/mcp")
}

async fn app_fronting(url: &str, allow_loopback: bool) -> TestApp {
    let mut x402 = crate::x402::config();
    if !allow_loopback {
        x402.allow_private.clear();
    }
    let mcp = McpUpstreamConfig::from_args(&McpUpstreamArgs { upstreams: vec![format!("weather={url}")] })
        .expect("upstream configuration");
    spawn_app_with(AppOptions { protocols: ProtocolConfig { x402, mcp, ..Default::default() }, ..Default::default() })
        .await
}

async fn me(app: &TestApp, token: &str) -> Value {
    app.agent_call(token, reqwest::Method::GET, "/v1/me", None).await.1
}

async fn call(app: &TestApp, token: &str, key: &str) -> (u16, Value) {
    let response = app
        .http
        .post(app.url("/v1/mcp/call"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&json!({"upstream": "weather", "tool": "get_forecast", "arguments": {"city": "Paris"}, "task": "t"}))
        .send()
        .await
        .expect("answers");
    (response.status().as_u16(), response.json().await.expect("JSON"))
}

#[tokio::test]
async fn a_paid_tool_is_paid_once_settled_at_its_price_and_replayed_for_the_same_key() {
    let server = PaidWeather::default();
    let app = app_fronting(&serve(server.clone()).await, true).await;
    let agent = app.create_agent("mcp-paid", 1_000_000, None).await;

    let (status, body) = call(&app, &agent.token, "forecast-1").await;
    assert_eq!(status, 200, "{body}");
    let text: Value = serde_json::from_str(body["result"]["content"][0]["text"].as_str().expect("text")).expect("JSON");
    assert_eq!(text, json!({"city": "Paris", "sky": "clear"}));
    assert_eq!(
        (body["payment"]["status"].as_str(), body["payment"]["amount_micros"].as_u64()),
        (Some("settled"), Some(PRICE))
    );
    assert_eq!(me(&app, &agent.token).await["spent_micros"], PRICE);

    let (status, again) = call(&app, &agent.token, "forecast-1").await;
    assert_eq!((status, &again["replayed"]), (200, &json!(true)), "{again}");
    assert_eq!(server.payments.load(Ordering::SeqCst), 1);
    assert_eq!(me(&app, &agent.token).await["spent_micros"], PRICE);

    // The same key for other arguments is another purchase: refused, nothing paid.
    let response = app
        .http
        .post(app.url("/v1/mcp/call"))
        .bearer_auth(&agent.token)
        .header("idempotency-key", "forecast-1")
        .json(&json!({"upstream": "weather", "tool": "get_forecast", "arguments": {"city": "Lyon"}, "task": "t"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 422);
    assert_eq!(server.payments.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_paid_result_without_a_settlement_report_stays_held_as_unknown() {
    let server = PaidWeather { no_settlement: true, ..PaidWeather::default() };
    let app = app_fronting(&serve(server.clone()).await, true).await;
    let agent = app.create_agent("mcp-unknown", 1_000_000, None).await;
    let (status, body) = call(&app, &agent.token, "forecast-unknown").await;
    assert_eq!((status, body["payment"]["status"].as_str()), (200, Some("unconfirmed")), "{body}");
    let me = me(&app, &agent.token).await;
    assert_eq!((me["spent_micros"].as_u64(), me["unknown_micros"].as_u64()), (Some(0), Some(PRICE)), "{me}");
}

#[tokio::test]
async fn an_upstream_on_a_private_address_is_not_contacted_unless_allow_listed() {
    let server = PaidWeather::default();
    let app = app_fronting(&serve(server.clone()).await, false).await;
    let agent = app.create_agent("mcp-private", 1_000_000, None).await;
    let (status, body) = call(&app, &agent.token, "forecast-private").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("x402_destination_forbidden")), "{body}");
    assert_eq!(server.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unknown_upstreams_and_unconfigured_daemons_are_refused_with_codes() {
    let app = crate::x402::app_with(crate::x402::config()).await;
    let agent = app.create_agent("mcp-none", 1_000_000, None).await;
    let (status, body) = call(&app, &agent.token, "none").await;
    assert_eq!((status, body["code"].as_str()), (503, Some("mcp_not_configured")), "{body}");

    let app = app_fronting("http://127.0.0.1:9/mcp", true).await;
    let agent = app.create_agent("mcp-unknown-upstream", 1_000_000, None).await;
    let response = app
        .http
        .post(app.url("/v1/mcp/call"))
        .bearer_auth(&agent.token)
        .json(&json!({"upstream": "nope", "tool": "get_forecast"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "mcp_upstream_unknown");
}
