//! The web dashboard (`/dashboard`: one HTML page with inline CSS and JS, built into the binary,
//! no CDN) and the live event stream it reads (`/v1/events`, server-sent events).
//!
//! The page itself holds no data; it asks for the admin token, keeps it in sessionStorage and
//! calls the JSON API with it. `EventSource` cannot send headers, so `/v1/events` (and only it)
//! also accepts the admin token as the `token` query parameter.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, Query, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;

use super::{bearer, ApiError, SharedState};
use crate::identity::TreeId;
use crate::series::{spend_series, Bucket, SeriesBy, SpendSeries, MAX_BUCKETS};

const PAGE: &str = include_str!("dashboard.html");
/// How often the event stream looks for new log entries (every instance's, since it reads the log).
const POLL: Duration = Duration::from_millis(250);

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/dashboard") }))
        .route("/dashboard", get(page))
        .route("/v1/dashboard/login", axum::routing::post(login))
        .route("/v1/dashboard/session", get(session))
        .route("/v1/events", get(events))
        .route("/v1/events/recent", get(recent))
        .route("/v1/reports/series", get(series))
}

/// How long a one-time dashboard login code printed at start-up stays valid.
const LOGIN_CODE_TTL_MS: u64 = 10 * 60 * 1000;

/// One-time codes that open the dashboard without putting the admin token in a URL: `serve --dev`
/// prints `/dashboard#login=<code>` (a fragment, so the code reaches neither this daemon's request
/// log nor a Referer), and the page exchanges the code, once, for the session's token. Codes live
/// in this instance's memory only; at most a handful are outstanding.
#[derive(Default)]
pub struct LoginCodes {
    /// (SHA-256 of the code, expiry in ms).
    codes: std::sync::Mutex<Vec<(crate::identity::TokenHash, u64)>>,
}

impl LoginCodes {
    /// A new code, valid once for ten minutes from `now_ms`.
    pub fn issue(&self, now_ms: u64) -> String {
        let code = hex::encode(rand::random::<[u8; 24]>());
        let mut codes = self.codes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        codes.retain(|(_, expires)| *expires > now_ms);
        if codes.len() >= 8 {
            codes.remove(0);
        }
        codes.push((crate::identity::TokenHash::of(&code), now_ms + LOGIN_CODE_TTL_MS));
        code
    }

    /// Whether `code` is outstanding and unexpired; it is used up either way.
    fn redeem(&self, code: &str, now_ms: u64) -> bool {
        let hash = crate::identity::TokenHash::of(code);
        let mut codes = self.codes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = codes.iter().position(|(h, _)| h.matches(&hash));
        match found {
            Some(index) => codes.remove(index).1 > now_ms,
            None => false,
        }
    }
}

#[derive(Deserialize)]
struct LoginBody {
    code: String,
}

/// `POST /v1/dashboard/login {"code"}` → `{"admin_token"}` once per printed code; 401
/// `invalid_login_code` for an unknown, used or expired one.
async fn login(
    State(state): State<SharedState>,
    super::ApiJson(body): super::ApiJson<LoginBody>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !state.login_codes.redeem(&body.code, state.clock.now_ms()) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "invalid_login_code",
            "this login code is unknown, used or expired; restart with --dev for a new one, or enter the admin token",
        ));
    }
    let session = Session::admin();
    Ok(axum::Json(serde_json::json!({
        "admin_token": state.admin.reveal(),
        "role": session.role,
        "actions": session.actions,
    })))
}

/// What the dashboard may do with the token it holds: its role and the actions that role allows.
/// The page renders a control only for an action listed here (a viewer gets none), and says
/// which of them go one way only (an operator lowers a cap, it never raises one).
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema, Debug, PartialEq, Eq)]
pub struct Session {
    pub role: String,
    /// Of `create_agent`, `set_cap`, `set_controls`, `set_expiry`, `reinstate`, `revoke`,
    /// `decide_approval` (the approvals panel's buttons).
    pub actions: Vec<String>,
    /// Of `actions`, those this token may take only in the tightening direction (as
    /// `GET /v1/whoami`'s `tighten_only`): lower a cap, tighter controls, an earlier expiry.
    #[serde(default)]
    pub tighten_only: Vec<String>,
}

/// Every dashboard action the admin role may take, in the order the page offers them.
const ADMIN_ACTIONS: [&str; 7] =
    ["create_agent", "set_cap", "set_controls", "set_expiry", "reinstate", "revoke", "decide_approval"];

impl Session {
    fn admin() -> Session {
        Session {
            role: "admin".into(),
            actions: ADMIN_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            tighten_only: Vec::new(),
        }
    }
}

/// `GET /v1/dashboard/session`: the role and allowed actions of the bearer token (401 otherwise):
/// of the dashboard's actions, those the token's role allows (`operators::Principal::actions`).
async fn session(who: super::Principal) -> axum::Json<Session> {
    let (allowed, tighten) = who.actions();
    let of = |list: &[&str]| ADMIN_ACTIONS.iter().filter(|a| list.contains(a)).map(|a| (*a).to_owned()).collect();
    axum::Json(Session { role: who.role.as_str().to_owned(), actions: of(&allowed), tighten_only: of(&tighten) })
}

/// The most entries `GET /v1/events/recent` returns.
const RECENT_MAX: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecentQuery {
    limit: Option<usize>,
}

/// `GET /v1/events/recent?limit=N` (default 100, at most 500): the latest log entries of every
/// tree, oldest first, as `{"entries": [...]}` — what the dashboard shows before the live stream
/// (`/v1/events`) adds to it. Entries carry `tree` and `id`, so the page drops duplicates.
async fn recent(
    who: super::Principal,
    State(state): State<SharedState>,
    query: Result<Query<RecentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, RECENT_MAX);
    let mut entries = Vec::new();
    for tree in who.trees(&state).await? {
        entries.extend(state.ledger.recent_log(&tree, limit).await?);
    }
    entries.sort_by(|a, b| (a.ts_ms, &a.tree, &a.id).cmp(&(b.ts_ms, &b.tree, &b.id)));
    let entries = entries.split_off(entries.len().saturating_sub(limit));
    Ok(axum::Json(serde_json::json!({ "entries": entries })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesQuery {
    by: Option<SeriesBy>,
    bucket: Option<Bucket>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
}

/// `GET /v1/reports/series?by=agent|tree|protocol&bucket=hour|day&since_ms=&until_ms=`: settled
/// spend per bucket and key, from the log (`series::spend_series`). Defaults: by agent, hourly,
/// the last 24 hours (daily: the last 30 days) up to now. At most 1,000 buckets (422
/// `range_too_long`); `since_ms` after `until_ms` is 422 `invalid_range`.
async fn series(
    _: super::Principal,
    State(state): State<SharedState>,
    query: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<SpendSeries>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let (by, bucket) = (query.by.unwrap_or(SeriesBy::Agent), query.bucket.unwrap_or(Bucket::Hour));
    let until_ms = query.until_ms.unwrap_or_else(|| state.clock.now_ms() + 1);
    let default_buckets = match bucket {
        Bucket::Hour => 24,
        Bucket::Day => 30,
    };
    let since_ms = query.since_ms.unwrap_or_else(|| {
        bucket.start_of(until_ms.saturating_sub(1)).saturating_sub((default_buckets - 1) * bucket.ms())
    });
    let unprocessable = |code: &'static str, detail: &str| {
        ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, code, detail.to_owned())
    };
    if since_ms >= until_ms {
        return Err(unprocessable("invalid_range", "since_ms must be before until_ms"));
    }
    if (bucket.start_of(until_ms - 1) - bucket.start_of(since_ms)) / bucket.ms() >= MAX_BUCKETS {
        return Err(unprocessable("range_too_long", "at most 1000 buckets: narrow since_ms or use bucket=day"));
    }
    let mut labels = HashMap::new();
    for tree in state.ledger.trees().await? {
        for agent in state.ledger.tree_agents(&tree).await? {
            if agent.parent.is_none() {
                labels.insert(tree.to_string(), agent.handle.clone());
            }
            labels.insert(agent.id.to_string(), agent.handle);
        }
    }
    let filter = crate::log::LogFilter { since_ms: Some(since_ms), until_ms: Some(until_ms), ..Default::default() };
    let mut reader = crate::log::LogReader::new(&state.ledger, filter).await?;
    let mut entries = Vec::new();
    while let Some(entry) = reader.next().await? {
        if entry.event == "settle" {
            entries.push(entry);
        }
    }
    let label = |key: &str| match by {
        SeriesBy::Protocol => None,
        SeriesBy::Agent | SeriesBy::Tree => labels.get(key).cloned(),
    };
    Ok(axum::Json(spend_series(&entries, by, bucket, since_ms, until_ms, label)))
}

async fn page() -> impl IntoResponse {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| content_security_policy(PAGE));
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, POLICY.as_str()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
}

/// The page's Content-Security-Policy: nothing but this origin, its one inline script allowed by
/// its SHA-256 (so no injected script runs), inline styles, and no framing (clickjacking of the
/// revoke button).
fn content_security_policy(page: &str) -> String {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let scripts: Vec<String> = page
        .split("<script>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</script>"))
        .map(|(script, _)| {
            format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script)))
        })
        .collect();
    format!(
        "default-src 'none'; script-src {}; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        scripts.join(" ")
    )
}

/// An admin-side principal, by the bearer header or the `token` query parameter (for
/// `EventSource`).
struct StreamAdmin(super::Principal);

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<SharedState> for StreamAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<StreamAdmin, ApiError> {
        let query = Query::<TokenQuery>::try_from_uri(&parts.uri).ok().and_then(|q| q.0.token);
        let token = bearer(parts).map(str::to_owned).or(query).ok_or_else(ApiError::unauthorized)?;
        let path = parts.extensions.get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned());
        super::Principal::of_token(state, &token, parts.method.as_str(), path.as_deref().unwrap_or_default())
            .await
            .map(StreamAdmin)
    }
}

struct Tail {
    state: SharedState,
    who: super::Principal,
    /// The last entry seen per tree.
    cursors: HashMap<TreeId, String>,
    pending: std::collections::VecDeque<crate::ledger::LogEntry>,
}

impl Tail {
    /// Reads what was appended since the last look, in every tree (new trees from their start).
    async fn poll(&mut self) -> Result<(), crate::ledger::LedgerError> {
        for tree in self.who.trees(&self.state).await? {
            let after = self.cursors.entry(tree.clone()).or_insert_with(|| "0".into());
            let page = self.state.ledger.read_log(&tree, after, 256).await?;
            if let Some(last) = page.last() {
                *after = last.id.clone();
            }
            self.pending.extend(page);
        }
        Ok(())
    }
}

/// New log entries of every tree as they are appended, one `log` event each (JSON, as in the
/// export); a comment every 15 s keeps the connection open.
async fn events(
    StreamAdmin(who): StreamAdmin,
    State(state): State<SharedState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut cursors = HashMap::new();
    for tree in who.trees(&state).await? {
        let tail = state.ledger.log_tail(&tree).await?;
        cursors.insert(tree, tail);
    }
    let tail = Tail { state, who, cursors, pending: Default::default() };
    let stream = futures::stream::unfold(tail, |mut tail| async move {
        loop {
            if let Some(entry) = tail.pending.pop_front() {
                let data = serde_json::to_string(&entry).unwrap_or_default();
                return Some((Ok(Event::default().event("log").data(data)), tail));
            }
            tokio::time::sleep(POLL).await;
            if let Err(e) = tail.poll().await {
                tracing::warn!(error = %e, "event stream: reading the log failed; retrying");
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
