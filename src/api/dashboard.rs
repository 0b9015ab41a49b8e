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

const PAGE: &str = include_str!("dashboard.html");
/// How often the event stream looks for new log entries (every instance's, since it reads the log).
const POLL: Duration = Duration::from_millis(250);

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/dashboard") }))
        .route("/dashboard", get(page))
        .route("/v1/dashboard/login", axum::routing::post(login))
        .route("/v1/events", get(events))
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
    Ok(axum::Json(serde_json::json!({ "admin_token": state.admin.reveal() })))
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

/// The admin, by the bearer header or the `token` query parameter (for `EventSource`).
struct StreamAdmin;

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<SharedState> for StreamAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<StreamAdmin, ApiError> {
        let query = Query::<TokenQuery>::try_from_uri(&parts.uri).ok().and_then(|q| q.0.token);
        let token = bearer(parts).map(str::to_owned).or(query).ok_or_else(ApiError::unauthorized)?;
        if state.admin.verify(&token) {
            Ok(StreamAdmin)
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

struct Tail {
    state: SharedState,
    /// The last entry seen per tree.
    cursors: HashMap<TreeId, String>,
    pending: std::collections::VecDeque<crate::ledger::LogEntry>,
}

impl Tail {
    /// Reads what was appended since the last look, in every tree (new trees from their start).
    async fn poll(&mut self) -> Result<(), crate::ledger::LedgerError> {
        for tree in self.state.ledger.trees().await? {
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
    _: StreamAdmin,
    State(state): State<SharedState>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut cursors = HashMap::new();
    for tree in state.ledger.trees().await? {
        let tail = state.ledger.log_tail(&tree).await?;
        cursors.insert(tree, tail);
    }
    let tail = Tail { state, cursors, pending: Default::default() };
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
