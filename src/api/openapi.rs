//! The OpenAPI document: the handlers' annotations, the routes documented in `routes.rs` (those
//! without an annotated handler), and every operation's error answers from `errors.rs`.
//! `tests/it/openapi.rs` checks it against the router's own route table, resolves every `$ref`
//! and validates it; `scripts/api-fuzz` checks the daemon's answers against it.

pub mod errors;
mod routes;

use std::sync::OnceLock;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{agents, approvals, budget, controls, holds, log, operators, orchestrators, reports, unknown};

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [
            ("admin", "The admin token (`SPENDCAP_ADMIN_TOKEN`), or an operator token (`sco_op_…`) whose role allows the route (see `GET /v1/whoami`)."),
            (
                "agent",
                "An agent's own token (`sct_…`), shown once when the agent is created or its token rotated; \
                       or a task-scoped token of the agent (`sct_<agent>_t<id>_…`), which pays for its task \
                       until it expires or is revoked, and manages nothing.",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(description)).build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "spendcap", description = "Hard spending caps, cost attribution and revocation for AI agents. \
        Every error is `{code, detail}` with a stable snake_case code."),
    paths(
        super::healthz,
        routes::root, routes::openapi_json, routes::metrics,
        routes::dashboard, routes::dashboard_login, routes::events,
        routes::dashboard_session, routes::events_recent, routes::reports_series,
        agents::create_agent, agents::list_agents, agents::show_agent, agents::set_cap, agents::revoke, agents::rotate_token, agents::archive,
        controls::set_controls, controls::show_controls, controls::set_expiry, controls::reinstate, controls::periods,
        holds::me, holds::create_hold, holds::settle, holds::void,
        unknown::list, unknown::resolve,
        budget::budget,
        log::export_log, log::spend, log::export_receipts, log::receipt_key,
        reports::record_outcome, reports::reports,
        orchestrators::create_sub_agent, orchestrators::list_sub_agents, orchestrators::revoke_sub_agent,
        orchestrators::create_my_token, orchestrators::list_my_tokens, orchestrators::revoke_my_token,
        orchestrators::create_agent_token, orchestrators::list_agent_tokens, orchestrators::revoke_agent_token,
        operators::create, operators::list, operators::revoke, operators::whoami,
        routes::mcp,
        crate::protocols::x402::routes::fetch, routes::x402_proxy,
        routes::acp_checkout, routes::acp_cancel,
        routes::ap2_own_key, routes::ap2_admin_key, routes::ap2_register_mandates, routes::ap2_admin_register_mandates,
        routes::ap2_show_mandate, routes::ap2_pay, routes::ap2_v01_pay,
        routes::keyed_api,
        approvals::list, approvals::show, approvals::list_own, approvals::show_own, approvals::approve, approvals::deny,
        crate::protocols::mpp::routes::fetch, routes::mpp_proxy,
        crate::protocols::mcp_upstream::routes::tools, crate::protocols::mcp_upstream::routes::call,
    ),
    components(schemas(log::Format, crate::log::GroupBy, reports::ReportFormat, holds::RefusalView)),
    modifiers(&BearerSchemes)
)]
pub struct ApiDoc;

/// The document as served: the annotations' plus every operation's error answers.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    errors::add(&mut doc);
    unique_operation_ids(&mut doc);
    doc
}

/// A route that takes any method is one annotated function, so every method's operation has its
/// name; OpenAPI wants operation ids unique: those get their method appended.
fn unique_operation_ids(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(serde_json::Value::as_object_mut) else { return };
    for item in paths.values_mut() {
        let methods: Vec<&str> = errors::METHODS.into_iter().filter(|m| item.get(*m).is_some()).collect();
        if methods.len() < 2 {
            continue;
        }
        for method in methods {
            if let Some(serde_json::Value::String(id)) = item.pointer_mut(&format!("/{method}/operationId")) {
                id.push('_');
                id.push_str(method);
            }
        }
    }
}

pub async fn serve() -> Json<serde_json::Value> {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document).clone())
}
