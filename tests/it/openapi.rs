//! The API document (`/openapi.json`) against the router it describes: every route the router
//! serves is documented with exactly its methods, every `$ref` resolves, optional query filters
//! are optional, and every operation documents its error answers with the `{code, detail}` body.
//! (`scripts/api-fuzz` validates the document with openapi-spec-validator and fuzzes the daemon
//! against it.)

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use spendcap::api::openapi::errors;
use spendcap::api::Limits;
use spendcap::clock::Clock;
use spendcap::identity::AdminToken;
use spendcap::protocols::ProtocolConfig;
use spendcap::receipt::ReceiptSigner;
use spendcap::server::{self, Config, LedgerConfig};

use crate::support::{spawn_app_with, AppOptions, Backend, ADMIN_TOKEN};

async fn router() -> axum::Router {
    let config = Config {
        ledger: LedgerConfig::Memory,
        admin_token: AdminToken::new(ADMIN_TOKEN.into()).expect("valid admin token"),
        signer: ReceiptSigner::generate(),
        limits: Limits::default(),
        clock: Clock::system(),
        protocols: ProtocolConfig::default(),
        sweep_interval: None,
        alerts: None,
        max_clock_skew: std::time::Duration::from_secs(2),
    };
    spendcap::api::router(server::build_state(config).await.expect("daemon state"))
}

async fn served_document() -> Value {
    let app = spawn_app_with(AppOptions { backend: Backend::Memory, ..Default::default() }).await;
    app.http.get(app.url("/openapi.json")).send().await.expect("get").json().await.expect("json")
}

/// What a route answers: the methods of a method router, or any method (a service mounted whole).
#[derive(Debug, PartialEq)]
enum Served {
    Methods(BTreeSet<&'static str>),
    Service,
}

/// The router's own route table. axum has no API to list routes, but its `Debug` output prints
/// the path router's table: `RouteId(n): MethodRouter(MethodRouter { get: Route, post: None, … })`
/// or `RouteId(n): Route(Route)` per route, and `RouteId(n): "/path"` per path. axum is pinned
/// exactly (Cargo.toml), and the caller checks that well-known routes were found, so a change of
/// that format fails this test instead of passing it.
fn route_table(router: &axum::Router) -> BTreeMap<String, Served> {
    let debug = format!("{router:?}");
    let table = debug.split(", fallback_router:").next().expect("the path router comes first");
    let mut endpoints: BTreeMap<&str, Served> = BTreeMap::new();
    let mut paths: BTreeMap<&str, &str> = BTreeMap::new();
    for chunk in table.split("RouteId(").skip(1) {
        let Some((id, rest)) = chunk.split_once("): ") else { continue };
        if let Some(path) = rest.strip_prefix('"') {
            paths.insert(id, path.split('"').next().expect("a quoted path"));
        } else if rest.starts_with("MethodRouter(") {
            let router = rest.split("allow_header:").next().expect("a method router");
            let mut methods: BTreeSet<_> =
                errors::METHODS.into_iter().filter(|m| !router.contains(&format!(" {m}: None"))).collect();
            // `any(handler)` is a method router whose fallback takes every method.
            if methods.is_empty()
                && rest.split("allow_header:").nth(1).is_some_and(|a| a.trim_start().starts_with("Skip"))
            {
                methods = errors::METHODS.into_iter().collect();
            }
            endpoints.insert(id, Served::Methods(methods));
        } else if rest.starts_with("Route(") {
            endpoints.insert(id, Served::Service);
        }
    }
    let mut routes = BTreeMap::new();
    for (id, path) in paths {
        // A service nested at `/p` is also routed at `/p/` and `/p/{*tail}`: one route, `/p`.
        if path.contains("__private__axum_nest_tail_param") || (path.len() > 1 && path.ends_with('/')) {
            continue;
        }
        // `{*rest}` (a wildcard) is `{rest}` in OpenAPI.
        let path = path.replace("{*", "{");
        routes.insert(path, endpoints.remove(id).expect("every path has an endpoint"));
    }
    routes
}

fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<&'static str>> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| (path.clone(), errors::METHODS.into_iter().filter(|m| item.get(*m).is_some()).collect()))
        .collect()
}

#[tokio::test]
async fn the_document_describes_every_route_the_router_serves_and_no_other() {
    let routes = route_table(&router().await);
    assert_eq!(routes.get("/healthz"), Some(&Served::Methods(BTreeSet::from(["get"]))), "the route table was read");
    assert_eq!(routes.get("/mcp"), Some(&Served::Service), "the route table was read");
    assert!(routes.len() > 40, "the route table was read: {routes:?}");

    let doc = served_document().await;
    let documented = documented(&doc);
    let served: BTreeSet<&String> = routes.keys().collect();
    let described: BTreeSet<&String> = documented.keys().collect();
    assert_eq!(
        served.difference(&described).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "routes the router serves that the document leaves out"
    );
    assert_eq!(
        described.difference(&served).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "paths the document has that the router does not serve"
    );
    for (path, served) in &routes {
        let methods = &documented[path];
        match served {
            Served::Methods(served) => {
                assert_eq!(methods, served, "{path}: the documented methods are the served ones")
            }
            Served::Service => assert!(!methods.is_empty(), "{path}: a mounted service documents its operations"),
        }
    }
}

/// Every `$ref` in `value`, with where it was found.
fn refs<'a>(value: &'a Value, at: String, found: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => found.push((at.clone(), target)),
                    _ => refs(value, format!("{at}/{key}"), found),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                refs(item, format!("{at}/{i}"), found);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn every_reference_in_the_document_resolves() {
    let doc = served_document().await;
    let mut found = Vec::new();
    refs(&doc, String::new(), &mut found);
    assert!(found.len() > 50, "the document uses references: {}", found.len());
    let broken: Vec<_> = found
        .iter()
        .filter(|(_, target)| target.strip_prefix('#').and_then(|pointer| doc.pointer(pointer)).is_none())
        .collect();
    assert!(broken.is_empty(), "references to nothing: {broken:?}");
}

#[tokio::test]
async fn query_filters_are_optional_query_parameters() {
    let doc = served_document().await;
    // The only query parameters a request must give.
    let required: BTreeSet<(&str, &str)> = BTreeSet::from([("/v1/spend", "group_by"), ("/v1/receipts", "agent")]);
    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let templated: BTreeSet<&str> =
            path.split('{').skip(1).filter_map(|rest| rest.split_once('}')).map(|(name, _)| name).collect();
        for method in errors::METHODS {
            for param in item.get(method).and_then(|op| op["parameters"].as_array()).into_iter().flatten() {
                let name = param["name"].as_str().expect("a parameter has a name");
                match param["in"].as_str() {
                    Some("path") => {
                        assert!(templated.contains(name), "{method} {path}: path parameter {name} is in the path")
                    }
                    Some("query") => {
                        seen += 1;
                        let must = required.contains(&(path.as_str(), name));
                        assert_eq!(param["required"].as_bool().unwrap_or(false), must, "{method} {path}: query {name}");
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(seen >= 20, "the filters are query parameters: {seen}");
    let log = &doc["paths"]["/v1/log"]["get"]["parameters"];
    let format = log.as_array().expect("params").iter().find(|p| p["name"] == "format").expect("format");
    let format = doc.pointer(&format["schema"]["$ref"].as_str().expect("a ref")[1..]).expect("Format resolves");
    assert_eq!(format["enum"], serde_json::json!(["jsonl", "csv"]));
}

#[tokio::test]
async fn every_operation_documents_its_errors_with_their_codes() {
    let doc = served_document().await;
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in errors::METHODS {
            let Some(op) = item.get(method) else { continue };
            operations.insert((method, path.clone()));
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s.starts_with('3') || s == "default"),
                "{method} {path}: success"
            );
            if responses.contains_key("default") {
                continue;
            }
            if op["security"].is_array() {
                let unauthorized = &responses["401"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]
                    ["code"]["enum"];
                assert!(
                    unauthorized.as_array().is_some_and(|codes| codes.contains(&"invalid_token".into())),
                    "{method} {path}: 401"
                );
            }
            // `/mcp`'s own refusals (not JSON-RPC, not acceptable) are the MCP SDK's, without a body schema.
            let daemon_errors = responses.iter().filter(|(s, r)| {
                (s.starts_with('4') || s.starts_with('5')) && !(path == "/mcp" && r.get("content").is_none())
            });
            for (status, response) in daemon_errors {
                let schema = &response["content"]["application/json"]["schema"];
                let text = schema.to_string();
                assert!(
                    text.contains("#/components/schemas/ErrorBody")
                        || text.contains("#/components/schemas/RefusalView"),
                    "{method} {path} {status}: the error body"
                );
            }
        }
    }
    let ids: Vec<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|item| errors::METHODS.into_iter().filter_map(|m| item.get(m)?["operationId"].as_str()))
        .collect();
    assert_eq!(ids.len(), ids.iter().collect::<BTreeSet<_>>().len(), "operation ids are unique: {ids:?}");
    // The table names exactly the documented operations (less the two that pass upstream answers on).
    let table: BTreeSet<(&str, String)> = errors::TABLE.iter().map(|(m, p, _)| (*m, p.to_string())).collect();
    let mut expected = operations.clone();
    expected.retain(|(_, path)| {
        !path.starts_with("/v1/x402/proxy/") && !path.starts_with("/v1/apis/") && !path.starts_with("/v1/mpp/proxy/")
    });
    let expected: BTreeSet<(&str, String)> = expected.into_iter().collect();
    assert_eq!(table, expected, "errors::TABLE has one entry per documented operation");

    // A few answers the daemon gives, with their codes.
    let codes = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]["allOf"][1]
            ["properties"]["code"]["enum"]
            .clone()
    };
    assert!(codes("/v1/agents", "post", "409").as_array().expect("409").contains(&"handle_taken".into()));
    assert!(codes("/v1/holds", "post", "402").as_array().expect("402").contains(&"cap_exceeded".into()));
    assert!(codes("/v1/agents/{agent}", "get", "403").as_array().expect("403").contains(&"admin_only".into()));
    assert!(codes("/v1/holds/{hold}/settle", "post", "409").as_array().expect("409").contains(&"hold_voided".into()));
    assert_eq!(doc["components"]["securitySchemes"]["admin"]["scheme"], "bearer");
    assert_eq!(doc["components"]["securitySchemes"]["agent"]["scheme"], "bearer");
}
