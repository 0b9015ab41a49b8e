//! Admin routes for the log (streamed JSONL/CSV export), spend summaries and receipts.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Principal, SharedState};
use crate::log::{csv_line, spend_summary, GroupBy, LogFilter, LogReader, SpendRow, CSV_HEADER};

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/v1/log", get(export_log))
        .route("/v1/spend", get(spend))
        .route("/v1/receipts", get(export_receipts))
        .route("/v1/receipt-key", get(receipt_key))
}

#[derive(Deserialize, Clone, Copy, Default, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Jsonl,
    Csv,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    #[serde(default)]
    pub format: Format,
    /// Only this agent (id or handle).
    pub agent: Option<String>,
    pub task: Option<String>,
    pub service: Option<String>,
    pub protocol: Option<String>,
    /// Entries at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Entries before this time.
    pub until_ms: Option<u64>,
}

/// The log filter fields every log query shares.
macro_rules! filter_of {
    ($q:expr) => {
        LogFilter {
            agent: $q.agent,
            task: $q.task,
            service: $q.service,
            protocol: $q.protocol,
            since_ms: $q.since_ms,
            until_ms: $q.until_ms,
            tree: None,
            operators: false,
        }
    };
}

fn bad_query(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_query", e.to_string())
}

/// Streams the log: the body is produced page by page, so exporting a million entries holds
/// one page per tree in memory, never the whole log.
#[utoipa::path(get, path = "/v1/log", params(ExportQuery), responses((status = 200, description = "JSONL or CSV, one entry per line", content((String = "application/x-ndjson"), (String = "text/csv")))), security(("admin" = [])))]
pub async fn export_log(
    who: Principal,
    State(state): State<SharedState>,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_query(e.body_text()))?;
    let format = query.format;
    let mut filter = filter_of!(query);
    if let Some(agent) = filter.agent.take() {
        filter.agent = Some(who.resolve(&state, &agent).await?.to_string());
    }
    filter.tree = who.tree.clone();
    // Operator tokens are created and revoked outside every tree: their audit entries are shown
    // to whoever sees every tree (as `GET /v1/operators` is), never to a token limited to one.
    filter.operators = who.tree.is_none();
    // Fail before the 200 if the ledger is down; later errors end the stream early.
    let reader = LogReader::new(&state.ledger, filter.clone()).await?;
    drop(reader);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let state_for_task = state.clone();
    tokio::spawn(async move {
        let mut reader = match LogReader::new(&state_for_task.ledger, filter).await {
            Ok(reader) => reader,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                return;
            }
        };
        let mut chunk = String::new();
        if matches!(format, Format::Csv) {
            chunk.push_str(CSV_HEADER);
        }
        loop {
            match reader.next().await {
                Ok(Some(entry)) => {
                    match format {
                        Format::Jsonl => {
                            chunk.push_str(&serde_json::to_string(&entry).unwrap_or_default());
                            chunk.push('\n');
                        }
                        Format::Csv => chunk.push_str(&csv_line(&entry)),
                    }
                    if chunk.len() >= 32 * 1024 && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "log export stopped");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
        if !chunk.is_empty() {
            let _ = tx.send(Ok(chunk)).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let content_type = match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], Body::from_stream(stream)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SpendQuery {
    pub group_by: GroupBy,
    /// Only this agent (id or handle).
    pub agent: Option<String>,
    pub task: Option<String>,
    pub service: Option<String>,
    pub protocol: Option<String>,
    /// Entries at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Entries before this time.
    pub until_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SpendSummary {
    pub group_by: GroupBy,
    pub rows: Vec<SpendRow>,
}

#[utoipa::path(get, path = "/v1/spend", params(SpendQuery), responses((status = 200, body = SpendSummary)), security(("admin" = [])))]
pub async fn spend(
    who: Principal,
    State(state): State<SharedState>,
    query: Result<Query<SpendQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SpendSummary>, ApiError> {
    let Query(query) = query.map_err(|e| bad_query(e.body_text()))?;
    let group_by = query.group_by;
    let mut filter = filter_of!(query);
    if let Some(agent) = filter.agent.take() {
        filter.agent = Some(who.resolve(&state, &agent).await?.to_string());
    }
    filter.tree = who.tree.clone();
    let rows = spend_summary(&state.ledger, filter, group_by).await?;
    Ok(Json(SpendSummary { group_by, rows }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReceiptsQuery {
    /// Any agent of the tree (id or handle); the whole tree's chain is exported.
    pub agent: String,
}

/// Exports a tree's receipt chain as JSONL, in sequence, for `spendcap receipt verify`.
#[utoipa::path(get, path = "/v1/receipts", params(ReceiptsQuery), responses((status = 200, description = "JSONL, one signed receipt per line", content_type = "application/x-ndjson", body = String)), security(("admin" = [])))]
pub async fn export_receipts(
    who: Principal,
    State(state): State<SharedState>,
    query: Result<Query<ReceiptsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad_query(e.body_text()))?;
    let agent = who.resolve(&state, &query.agent).await?;
    let tree = agent.tree();
    let head = state.ledger.chain_head(tree).await?;
    let mut body = String::new();
    for seq in 1..=head.seq {
        let facts = state.ledger.receipt(tree, seq).await?;
        match facts.and_then(|f| f.signed) {
            Some(signed) => {
                body.push_str(&signed);
                body.push('\n');
            }
            None => return Err(ApiError::internal(format!("receipt {seq} of tree {tree} is linked but missing"))),
        }
    }
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReceiptKey {
    pub alg: String,
    pub key_id: String,
    /// The Ed25519 public key, base64url without padding.
    pub public_key: String,
}

#[utoipa::path(get, path = "/v1/receipt-key", responses((status = 200, body = ReceiptKey)))]
pub async fn receipt_key(State(state): State<SharedState>) -> Json<ReceiptKey> {
    Json(ReceiptKey {
        alg: "Ed25519".into(),
        key_id: crate::receipt::key_id(&state.signer.verifying_key()),
        public_key: state.signer.public_key_b64(),
    })
}
