//! `GET /v1/mcp/tools` and `POST /v1/mcp/call`: the upstream MCP servers' tools for agents, and
//! one call of one of them, paid (x402 MCP binding) within the agent's cap.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{tool_result_of_body, McpUpstreams, OfferedTool};
use crate::api::holds::idempotency_key;
use crate::api::{agent_scoped, label, AgentAuth, ApiError, ApiJson, SharedState};
use crate::protocols::x402::purchase::{self, FetchRequest, Transport};
use crate::protocols::x402::routes::{max_amount, PaymentView};

/// A call of an upstream MCP tool.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct McpCallBody {
    /// The upstream's name, as configured (`GET /v1/mcp/tools` lists it with each tool).
    pub upstream: String,
    /// The tool's name on its upstream (`upstream_tool` in the listing).
    pub tool: String,
    /// The tool's arguments (an object, as its input schema says).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<Map<String, Value>>,
    /// The task this spend is attributed to.
    #[serde(default)]
    pub task: String,
    /// The most this call may pay, in micro-USD (the daemon's x402 per-payment maximum applies too).
    #[serde(default)]
    #[schema(value_type = Option<u64>)]
    pub max_amount_micros: Option<serde_json::Number>,
}

/// The tool's result.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct McpCallResponse {
    pub upstream: String,
    pub tool: String,
    /// The upstream's `CallToolResult`, unchanged (an error result of the tool itself has
    /// `isError: true`).
    #[schema(value_type = Object)]
    pub result: Value,
    /// The payment made for this result; `null` when the tool asked for none.
    pub payment: Option<PaymentView>,
    /// True when this is the stored result of an earlier request for the same purchase.
    pub replayed: bool,
}

/// The upstreams' tools.
#[derive(Serialize, ToSchema, Debug)]
pub struct McpToolsResponse {
    pub tools: Vec<OfferedTool>,
}

fn upstreams(state: &SharedState) -> Result<&McpUpstreams, ApiError> {
    let upstreams = &state.protocols.mcp;
    if upstreams.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "mcp_not_configured",
            "no upstream MCP server is configured on this daemon (SPENDCAP_MCP_UPSTREAMS)",
        ));
    }
    Ok(upstreams)
}

fn tool_name(text: &str) -> Result<String, ApiError> {
    if (1..=128).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(text.to_owned());
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_tool",
        "tool must be 1 to 128 visible ASCII characters",
    ))
}

#[utoipa::path(get, path = "/v1/mcp/tools", operation_id = "mcp_tools", tag = "mcp",
    responses(
        (status = 200, body = McpToolsResponse, description = "every upstream's tools, named as offered to agents"),
        (status = 403, description = "x402_destination_forbidden: an upstream's address is not allowed"),
        (status = 502, description = "mcp_upstream_unreachable: an upstream did not answer"),
        (status = 503, description = "mcp_not_configured: no upstream MCP server"),
        (status = 504, description = "mcp_upstream_timeout")),
    security(("agent" = [])))]
pub async fn tools(auth: AgentAuth, State(state): State<SharedState>) -> Result<Json<McpToolsResponse>, ApiError> {
    // Checks the token against the ledger before any upstream is contacted.
    state.ledger.balance(state.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(agent_scoped)?;
    let upstreams = upstreams(&state)?;
    let tools = upstreams.list_tools(None, &crate::mcp::OWN_TOOLS).await?;
    Ok(Json(McpToolsResponse { tools }))
}

#[utoipa::path(post, path = "/v1/mcp/call", operation_id = "mcp_call", tag = "mcp", request_body = McpCallBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "names the purchase; without it, the same task + upstream + tool + arguments is the same purchase")),
    responses(
        (status = 200, body = McpCallResponse, description = "the tool answered (paid when it asked)"),
        (status = 402, description = "budget refusal (cap_exceeded, agent_revoked, ...), a policy refusal (x402_over_payment_maximum, ...) or x402_payment_rejected; nothing was paid"),
        (status = 403, description = "x402_destination_forbidden: the upstream's address is not allowed"),
        (status = 404, description = "mcp_upstream_unknown"),
        (status = 409, description = "idempotency_in_flight, x402_authorization_expired, x402_already_paid"),
        (status = 502, description = "the tool's payment request was unreadable, the upstream did not answer, or x402_payment_outcome_unknown"),
        (status = 503, description = "mcp_not_configured, x402_not_configured")),
    security(("agent" = [])))]
pub async fn call(
    auth: AgentAuth,
    State(state): State<SharedState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<McpCallBody>,
) -> Result<Json<McpCallResponse>, ApiError> {
    let upstreams = upstreams(&state)?;
    let engine = state.protocols.x402.engine().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "x402_not_configured",
            "paid MCP tools are paid with x402, which is not configured on this daemon (no SPENDCAP_X402_PRIVATE_KEY_FILE)",
        )
    })?;
    let idempotency_key = idempotency_key(&headers)?;
    let tool = tool_name(&body.tool)?;
    let task = label("task", &body.task, 128)?;
    let max_amount = body.max_amount_micros.as_ref().map(max_amount).transpose()?;
    let call = upstreams.tool_call(&body.upstream, &tool, body.arguments)?;
    let request = FetchRequest { outgoing: call.outgoing(), task, max_amount, idempotency_key };
    let delivered = purchase::fetch_via(&state.core, engine, &auth, &request, &Transport::Mcp(&call)).await;
    call.close().await;
    let delivered = delivered?;
    Ok(Json(McpCallResponse {
        upstream: body.upstream,
        tool,
        result: Value::Object(tool_result_of_body(&delivered.answer.body)),
        payment: delivered.payment,
        replayed: delivered.replayed,
    }))
}

pub fn router() -> axum::Router<SharedState> {
    axum::Router::new()
        .route("/v1/mcp/tools", axum::routing::get(tools))
        .route("/v1/mcp/call", axum::routing::post(call))
}
