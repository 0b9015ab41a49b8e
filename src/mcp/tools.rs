//! The tools. Each one checks what only the tool knows (dollars given as text), makes one call of
//! the agent API, and hands the answer to `outcome::tool_result`.

use std::collections::BTreeMap;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult, PaginatedRequestParams,
    RequestId, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{schemars, tool, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::backend::{ApiCall, Backend};
use super::explain::explain;
use super::outcome::{micros_of_usd, tool_result};

const INSTRUCTIONS: &str = "spendcap pays for you within a hard spending cap that someone else set. \
Check get_budget before a large purchase. Every paying tool either pays and returns what was bought, \
or returns an error result with a code. When refusal is true (cap_exceeded, agent_revoked, ...), stop \
spending: retrying the same call will not pass. When retryable is true, call again with the same \
idempotency_key: it never pays twice. Dollar amounts are decimal strings. explain_refusal tells what \
any code means. Report how each task ended with record_task_outcome.";

/// spendcap's own tools: an upstream tool of the same name is offered prefixed with its upstream's
/// name (`weather__get_budget`).
pub const OWN_TOOLS: [&str; 6] =
    ["get_budget", "paid_fetch", "acp_checkout", "ap2_pay", "record_task_outcome", "explain_refusal"];

/// `_meta` keys an agent may set on a call of an upstream tool (whose arguments are the
/// upstream's): the task, the most the call may pay (dollars, a decimal string) and the purchase's
/// idempotency key.
pub const META_TASK: &str = "spendcap/task";
pub const META_MAX_USD: &str = "spendcap/max_usd";
pub const META_IDEMPOTENCY_KEY: &str = "spendcap/idempotency_key";
/// `_meta` key of the payment made for an upstream tool's result.
pub const META_PAYMENT: &str = "spendcap/payment";

/// `get_budget`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetBudget {
    /// A task label: also report what this task has spent and held against your per-task cap,
    /// if you have one.
    #[serde(default)]
    pub task: Option<String>,
}

/// `paid_fetch`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PaidFetch {
    /// The http or https URL to fetch. If the server asks for an x402 payment, spendcap pays it
    /// within your budget and returns the server's answer.
    pub url: String,
    /// The HTTP method (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS). Default GET.
    #[serde(default)]
    pub method: Option<String>,
    /// Headers to send to the server.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// The request body, as text.
    #[serde(default)]
    pub body: Option<String>,
    /// The most this one call may pay, in US dollars as a decimal string, e.g. "0.05". A higher
    /// price is refused before anything is paid.
    #[serde(default)]
    pub max_usd: Option<String>,
    /// A label for the task this spend belongs to (used for cost reports and per-task caps).
    #[serde(default)]
    pub task: Option<String>,
    /// Names this purchase. Calling again with the same key returns the first result and never
    /// pays twice: reuse it only to retry the same call. Default: a new key for every call.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// One item to buy in an ACP checkout.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct AcpItem {
    /// The merchant's item id.
    pub id: String,
    /// The item's name, if the merchant wants it.
    #[serde(default)]
    pub name: Option<String>,
}

/// `acp_checkout`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct AcpCheckout {
    /// The merchant's name, as configured in spendcap.
    pub merchant: String,
    /// An existing checkout session to pay. Give this or items.
    #[serde(default)]
    pub checkout_session_id: Option<String>,
    /// Items to buy: a checkout session is created with them and paid. Give this or
    /// checkout_session_id.
    #[serde(default)]
    pub items: Option<Vec<AcpItem>>,
    /// The currency of a session created from items (default "usd").
    #[serde(default)]
    pub currency: Option<String>,
    /// A label for the task this spend belongs to.
    #[serde(default)]
    pub task: Option<String>,
    /// Names this purchase; reuse it only to retry the same call (never pays twice). Default: a
    /// new key for every call.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `ap2_pay`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Ap2Pay {
    /// The merchant-signed checkout JWT, exactly as the merchant returned it.
    pub checkout_jwt: String,
    /// The user-signed open checkout mandate (SD-JWT), exactly as issued.
    pub open_checkout_mandate: String,
    /// The user-signed open payment mandate (SD-JWT), exactly as issued.
    pub open_payment_mandate: String,
    /// The configured merchant id (default: the checkout's merchant).
    #[serde(default)]
    pub merchant: Option<String>,
    /// A label for the task this spend belongs to.
    #[serde(default)]
    pub task: Option<String>,
    /// Names this payment; reuse it only to retry the same call (never pays twice). Default: the
    /// checkout itself names the payment, so the same checkout is paid at most once.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// How a task ended.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Success,
    Failed,
    Abandoned,
}

/// `record_task_outcome`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RecordTaskOutcome {
    /// The task label your payments carried.
    pub task: String,
    /// How the task ended: success, failed or abandoned.
    pub outcome: TaskOutcome,
    /// What kind of task it was, e.g. "research", "enrichment", "booking".
    pub task_type: String,
}

/// `explain_refusal`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExplainRefusal {
    /// The code from an error result, e.g. "cap_exceeded".
    pub code: String,
}

/// The MCP server of one agent.
#[derive(Clone)]
pub struct SpendcapMcp {
    backend: Backend,
    /// Random, per server instance: with the MCP request id it names a paying call that came
    /// without an `idempotency_key`, so a re-delivered request never pays twice.
    instance: String,
    tool_router: ToolRouter<SpendcapMcp>,
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved bytes).
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The bearer token of the HTTP request that carried this MCP request (`/mcp` only).
fn request_token(context: &RequestContext<RoleServer>) -> Option<String> {
    let parts = context.extensions.get::<axum::http::request::Parts>()?;
    crate::api::bearer(parts).map(str::to_owned)
}

/// Adds the fields that are set.
fn object(fields: impl IntoIterator<Item = (&'static str, Option<Value>)>) -> Value {
    Value::Object(fields.into_iter().filter_map(|(name, value)| Some((name.to_owned(), value?))).collect::<Map<_, _>>())
}

impl SpendcapMcp {
    pub fn new(backend: Backend) -> SpendcapMcp {
        SpendcapMcp { backend, instance: hex::encode(rand::random::<[u8; 8]>()), tool_router: Self::tool_router() }
    }

    /// The key of a paying call: the agent's own, or one derived from this server instance and
    /// the MCP request id.
    fn idempotency_key(&self, given: Option<String>, id: &RequestId) -> String {
        given.unwrap_or_else(|| {
            let id = id.to_string();
            let id = if id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                id
            } else {
                hex::encode(&Sha256::digest(id.as_bytes())[..12])
            };
            format!("mcp-{}-{id}", self.instance)
        })
    }

    async fn run(&self, context: &RequestContext<RoleServer>, call: ApiCall) -> CallToolResult {
        let key = call.idempotency_key.clone();
        let answer = self.backend.call(request_token(context).as_deref(), call).await;
        tool_result(answer, key.as_deref())
    }
}

#[tool_router]
impl SpendcapMcp {
    /// Your budget now.
    #[tool(
        description = "Your budget now: cap, spent, held (reserved by payments in progress), remaining \
            (your own cap) and available (what you can spend now, counting every parent budget), in US \
            dollars; whether you are revoked, suspended or expiring; your period limits (daily, weekly, \
            monthly, all-time, per payment) with what is left of each; and, given a task, that task's \
            spend against your per-task cap, if you have one.",
        annotations(title = "Budget", read_only_hint = true, open_world_hint = false)
    )]
    async fn get_budget(
        &self,
        Parameters(input): Parameters<GetBudget>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let path = match input.task.as_deref() {
            Some(task) => format!("/v1/me/budget?task={}", encode(task)),
            None => "/v1/me/budget".to_owned(),
        };
        self.run(&context, ApiCall::get(path)).await
    }

    /// x402: fetch a URL, paying for it if the server asks.
    #[tool(
        description = "Fetch a URL, paying for it when the server asks for payment (HTTP 402, x402 \
            stablecoin payments): spendcap pays within your budget and returns the server's status, \
            headers and body, with the payment (amount_usd, receipt). A price above max_usd or above \
            your budget is refused before anything is paid.",
        annotations(
            title = "Paid fetch (x402)",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn paid_fetch(
        &self,
        Parameters(input): Parameters<PaidFetch>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let max_amount = match input.max_usd.as_deref().map(|text| micros_of_usd("max_usd", text)).transpose() {
            Ok(max) => max,
            Err(result) => return result,
        };
        let body = object([
            ("url", Some(json!(input.url))),
            ("method", input.method.map(Value::from)),
            ("headers", input.headers.map(|headers| json!(headers))),
            ("body", input.body.map(Value::from)),
            ("task", input.task.map(Value::from)),
            ("max_amount_micros", max_amount.map(Value::from)),
        ]);
        let key = self.idempotency_key(input.idempotency_key, &context.id);
        self.run(&context, ApiCall::post("/v1/x402/fetch".into(), body, Some(key))).await
    }

    /// ACP: pay a merchant's checkout.
    #[tool(
        description = "Buy from a merchant through its checkout (Stripe's Agentic Commerce Protocol): \
            give the merchant and either items to buy or an existing checkout_session_id. spendcap \
            holds the total within your budget, pays with a card you never see, and returns the order \
            with the amount paid; over budget, nothing is sent to the merchant's payment processor.",
        annotations(
            title = "Checkout (ACP)",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn acp_checkout(
        &self,
        Parameters(input): Parameters<AcpCheckout>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let items = input.items.map(|items| {
            Value::Array(
                items
                    .into_iter()
                    .map(|item| object([("id", Some(json!(item.id))), ("name", item.name.map(Value::from))]))
                    .collect(),
            )
        });
        let body = object([
            ("merchant", Some(json!(input.merchant))),
            ("checkout_session_id", input.checkout_session_id.map(Value::from)),
            ("items", items),
            ("currency", input.currency.map(Value::from)),
            ("task", input.task.map(Value::from)),
        ]);
        let key = self.idempotency_key(input.idempotency_key, &context.id);
        self.run(&context, ApiCall::post("/v1/acp/checkouts".into(), body, Some(key))).await
    }

    /// AP2: pay a merchant-signed checkout under the user's mandates.
    #[tool(
        description = "Pay a merchant-signed checkout under mandates the user signed (Google's Agent \
            Payments Protocol, AP2): spendcap verifies the checkout and mandates, holds the total within \
            your budget and the mandate's, signs the payment mandate and returns the merchant's receipt.",
        annotations(
            title = "Pay (AP2)",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn ap2_pay(
        &self,
        Parameters(input): Parameters<Ap2Pay>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let body = object([
            ("checkout_jwt", Some(json!(input.checkout_jwt))),
            ("open_checkout_mandate", Some(json!(input.open_checkout_mandate))),
            ("open_payment_mandate", Some(json!(input.open_payment_mandate))),
            ("merchant", input.merchant.map(Value::from)),
            ("task", input.task.map(Value::from)),
        ]);
        // Without a key the daemon names the payment by its checkout: paid at most once.
        self.run(&context, ApiCall::post("/v1/ap2/payments".into(), body, input.idempotency_key)).await
    }

    /// Record how a task ended.
    #[tool(
        description = "Record how one of your tasks ended (success, failed or abandoned) and what kind \
            of task it was, so its cost counts in the cost reports (cost per successful task, suggested \
            caps). Spends nothing; a later call for the same task replaces the earlier outcome.",
        annotations(
            title = "Record task outcome",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn record_task_outcome(
        &self,
        Parameters(input): Parameters<RecordTaskOutcome>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let outcome = match input.outcome {
            TaskOutcome::Success => "success",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Abandoned => "abandoned",
        };
        let path = format!("/v1/tasks/{}/outcome", encode(&input.task));
        let body = json!({ "outcome": outcome, "task_type": input.task_type });
        self.run(&context, ApiCall::post(path, body, None)).await
    }

    /// What a code means.
    #[tool(
        description = "Explain a code from an error result (e.g. cap_exceeded, agent_revoked, \
            x402_payment_outcome_unknown): what it means, whether it is a budget refusal, whether \
            retrying with the same idempotency_key can help, and what to do.",
        annotations(title = "Explain a refusal", read_only_hint = true, open_world_hint = false)
    )]
    async fn explain_refusal(&self, Parameters(input): Parameters<ExplainRefusal>) -> CallToolResult {
        match explain(input.code.trim()) {
            Some(explanation) => CallToolResult::structured(json!(explanation)),
            None => CallToolResult::structured(json!({
                "code": input.code,
                "known": false,
                "meaning": "spendcap documents no such code for agents. Codes come from an error result's `code` field.",
                "what_to_do": "Read the error's detail; do not retry a payment that was refused.",
            })),
        }
    }
}

impl SpendcapMcp {
    /// The upstream MCP servers' tools the daemon offers (`GET /v1/mcp/tools`): none when no
    /// upstream is configured or the listing failed (then logged).
    async fn upstream_tools(&self, context: &RequestContext<RoleServer>) -> Vec<Value> {
        let token = request_token(context);
        match self.backend.call(token.as_deref(), ApiCall::get("/v1/mcp/tools".to_owned())).await {
            Ok(answer) if answer.status == 200 => {
                answer.body.get("tools").and_then(Value::as_array).cloned().unwrap_or_default()
            }
            Ok(answer) if answer.body.get("code").and_then(Value::as_str) == Some("mcp_not_configured") => Vec::new(),
            Ok(answer) => {
                tracing::warn!(status = answer.status, code = ?answer.body.get("code"), "MCP: upstream tools not listed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    /// A call of an upstream tool: through `POST /v1/mcp/call`, paid within the budget when the
    /// tool asks. The tool's own result comes back unchanged (with the payment in
    /// `_meta["spendcap/payment"]`); a refusal is spendcap's refusal result.
    async fn call_upstream(
        &self,
        request: CallToolRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let offered = self
            .upstream_tools(context)
            .await
            .into_iter()
            .find(|tool| tool.pointer("/tool/name").and_then(Value::as_str) == Some(request.name.as_ref()));
        let Some(offered) = offered else {
            return Err(ErrorData::invalid_params(format!("no tool is named {}", request.name), None));
        };
        let meta = request.meta.as_ref().map(|meta| meta.0 .0.clone()).unwrap_or_default();
        let text = |key: &str| meta.get(key).and_then(Value::as_str).map(str::to_owned);
        let max_amount = match text(META_MAX_USD).as_deref().map(|text| micros_of_usd(META_MAX_USD, text)).transpose() {
            Ok(max) => max,
            Err(result) => return Ok(result.into()),
        };
        let body = object([
            ("upstream", offered.get("upstream").cloned()),
            ("tool", offered.get("upstream_tool").cloned()),
            ("arguments", request.arguments.map(Value::Object)),
            ("task", text(META_TASK).map(Value::from)),
            ("max_amount_micros", max_amount.map(Value::from)),
        ]);
        let key = self.idempotency_key(text(META_IDEMPOTENCY_KEY), &context.id);
        let token = request_token(context);
        let answer =
            self.backend.call(token.as_deref(), ApiCall::post("/v1/mcp/call".into(), body, Some(key.clone()))).await;
        match answer {
            Ok(answer) if answer.status == 200 => {
                let mut result: CallToolResult = match answer.body.get("result").cloned().map(serde_json::from_value) {
                    Some(Ok(result)) => result,
                    _ => return Ok(tool_result(Ok(answer), Some(&key)).into()),
                };
                let payment = answer.body.get("payment").cloned().unwrap_or(Value::Null);
                if !payment.is_null() {
                    let mut meta = result.meta.take().unwrap_or_default();
                    meta.0.insert(META_PAYMENT.to_owned(), payment);
                    meta.0.insert(META_IDEMPOTENCY_KEY.to_owned(), Value::String(key));
                    result.meta = Some(meta);
                }
                Ok(result.into())
            }
            other => Ok(tool_result(other, Some(&key)).into()),
        }
    }
}

impl ServerHandler for SpendcapMcp {
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if self.tool_router.has_route(request.name.as_ref()) {
            let tcc = ToolCallContext::new(self, request, context);
            return self.tool_router.call(tcc).await;
        }
        self.call_upstream(request, &context).await
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = self.tool_router.list_all();
        for offered in self.upstream_tools(&context).await {
            match offered.get("tool").cloned().map(serde_json::from_value::<Tool>) {
                Some(Ok(tool)) => tools.push(tool),
                _ => tracing::warn!("MCP: an upstream tool that is not a tool definition is left out"),
            }
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned()
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spendcap", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_percent_encoded_into_paths() {
        assert_eq!(encode("research-7"), "research-7");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
