//! `/mcp` on the daemon: MCP over streamable HTTP for agents, each request authenticated with the
//! agent's bearer token, each tool call dispatched to the daemon's own routes in process.
//!
//! The server is stateless (no MCP session kept between requests), so any daemon instance can
//! answer any request and shutting down never waits on an open event stream.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::{Backend, SpendcapMcp};
use crate::api::{agent_scoped, AgentAuth, ApiError, SharedState};

/// The path MCP is served on.
pub const PATH: &str = "/mcp";

/// The `/mcp` route. `api` is the daemon's router without it: tool calls go there.
pub fn router(state: SharedState, api: Router) -> Router {
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        // Every request carries the agent's token, so a rebinding DNS name gains nothing; the
        // daemon answers on whatever host name it is deployed under.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(state.limits.body_bytes);
    let service = StreamableHttpService::new(
        move || Ok(SpendcapMcp::new(Backend::InProcess(api.clone()))),
        NeverSessionManager::default().into(),
        config,
    );
    Router::new().nest_service(PATH, service).layer(axum::middleware::from_fn_with_state(state, authenticate))
}

/// Lets through requests whose bearer token is a live agent token (the ledger checks it); a
/// revoked agent still gets in, and its payments are refused as `agent_revoked`.
async fn authenticate(
    State(state): State<SharedState>,
    auth: Result<AgentAuth, ApiError>,
    request: Request,
    next: Next,
) -> Response {
    let checked = match auth {
        Ok(auth) => state.ledger.balance(state.clock.now_ms(), &auth.agent, &auth.caller()).await.map_err(agent_scoped),
        Err(err) => Err(err),
    };
    match checked {
        Ok(_) => next.run(request).await,
        Err(err) => {
            let unauthorized = err.status == axum::http::StatusCode::UNAUTHORIZED;
            let mut response = err.into_response();
            if unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"spendcap\""));
            }
            response
        }
    }
}
