//! The OpenAPI document, generated from the handlers' and types' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{agents, budget, controls, holds, log, reports, unknown};

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["admin", "agent"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "spendcap", description = "Hard spending caps, cost attribution and revocation for AI agents."),
    paths(
        super::healthz,
        agents::create_agent, agents::list_agents, agents::show_agent, agents::set_cap, agents::revoke, agents::rotate_token, agents::archive,
        controls::set_controls, controls::show_controls, controls::set_expiry, controls::reinstate, controls::periods,
        holds::me, holds::create_hold, holds::settle, holds::void,
        unknown::list, unknown::resolve,
        budget::budget,
        log::export_log, log::spend, log::export_receipts, log::receipt_key,
        reports::record_outcome, reports::reports,
        crate::protocols::x402::routes::fetch,
    ),
    modifiers(&BearerSchemes)
)]
pub struct ApiDoc;

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
