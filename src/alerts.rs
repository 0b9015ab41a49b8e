//! Alerts: webhooks on threshold crossings, refusals, suspensions, reinstatements and
//! revocations, read from the log.
//!
//! A consumer task reads every tree's log through the `alerts` consumer group (so each entry goes
//! to one daemon instance, and entries survive a restart until acknowledged) and hands the
//! entries that mean an alert to delivery tasks. A delivery signs its JSON payload with
//! HMAC-SHA256 (`Spendcap-Signature: t=<unix seconds>,v1=<hex>` over `"<t>.<body>"`, as Stripe
//! does), retries with exponential backoff until the receiver answers 2xx, and only then
//! acknowledges the entry: at-least-once delivery. Payments never wait for any of this: the hold
//! only wrote the log entry, in its own atomic step.
//!
//! Threshold crossings are decided inside the hold (the ledger records them on the hold's log
//! entry, once per crossing, whatever the concurrency), so this module only formats them.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::app::Core;
use crate::identity::TreeId;
use crate::ledger::{AlertRead, Crossing, LogEntry};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Spendcap-Signature";

/// The shared secret webhooks are signed with. Its `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// At least 16 characters.
    pub fn new(secret: String) -> Result<WebhookSecret, AlertConfigError> {
        if secret.len() < 16 {
            return Err(AlertConfigError("the webhook secret must be at least 16 characters".into()));
        }
        Ok(WebhookSecret(secret))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("webhook configuration: {0}")]
pub struct AlertConfigError(pub String);

/// Where and how alerts are delivered.
#[derive(Clone, Debug)]
pub struct AlertConfig {
    pub url: reqwest::Url,
    pub secret: WebhookSecret,
    /// How often every tree's log is polled for new entries.
    pub poll_interval: Duration,
    /// The first retry's delay; each retry doubles it, up to `retry_max`, and a random part of up
    /// to as much again is added to every delay (see [`retry_delays`]).
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// One delivery attempt's timeout.
    pub request_timeout: Duration,
    /// Entries another consumer read but has not acknowledged for this long are taken over
    /// (their instance died, or has been retrying a dead receiver that long).
    pub claim_idle: Duration,
    /// Most log entries being delivered at once; the consumer reads no more until one is done.
    pub max_in_flight: usize,
    /// This instance's consumer name in the group; a fixed one lets a restarted instance
    /// resume its own unacknowledged entries at once (default: random per start).
    pub consumer: Option<String>,
}

impl AlertConfig {
    pub fn new(url: &str, secret: WebhookSecret) -> Result<AlertConfig, AlertConfigError> {
        let url = reqwest::Url::parse(url).map_err(|e| AlertConfigError(format!("SPENDCAP_WEBHOOK_URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AlertConfigError("SPENDCAP_WEBHOOK_URL must be http or https".into()));
        }
        Ok(AlertConfig {
            url,
            secret,
            poll_interval: Duration::from_millis(500),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            claim_idle: Duration::from_secs(300),
            max_in_flight: 64,
            consumer: None,
        })
    }
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 over `"<t>.<body>"`. (HMAC takes keys of any length, so this is always `Some`.)
fn mac(secret: &WebhookSecret, t: u64, body: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret.0.as_bytes()).ok()?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The `Spendcap-Signature` header value for `body` sent at `t` (unix seconds).
pub fn sign(secret: &WebhookSecret, t: u64, body: &[u8]) -> String {
    let v1 = mac(secret, t, body).map(|m| hex::encode(m.finalize().into_bytes())).unwrap_or_default();
    format!("t={t},v1={v1}")
}

/// Checks a `Spendcap-Signature` header: a valid `v1` for `body`, with `t` within `tolerance`
/// seconds of `now_secs` (replay protection). Compares in constant time.
pub fn verify(secret: &WebhookSecret, header: &str, body: &[u8], now_secs: u64, tolerance_secs: u64) -> bool {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => signatures.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if t.abs_diff(now_secs) > tolerance_secs {
        return false;
    }
    signatures.iter().any(|sig| mac(secret, t, body).is_some_and(|m| m.verify_slice(sig).is_ok()))
}

/// One webhook payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Unique and stable across redeliveries: `evt_<tree>_<log entry id>_<n>`; receivers
    /// deduplicate on it.
    pub id: String,
    /// `threshold.crossed`, `payment.refused`, `payment.note` (a provider's failure report on a
    /// held payment), `payment.incident` (a note whose reason starts with `incident_`),
    /// `payment.outcome_unknown`, `agent.suspended`, `agent.reinstated`, `agent.revoked`,
    /// `approval.requested`, `approval.decided` (approved, denied or expired).
    #[serde(rename = "type")]
    pub kind: String,
    pub created_ms: u64,
    pub tree: String,
    pub agent: String,
    pub data: Value,
}

/// The alerts a log entry means (none for most entries).
pub fn alerts_of(entry: &LogEntry) -> Vec<Alert> {
    let alert = |n: usize, kind: &str, agent: &str, data: Value| Alert {
        id: format!("evt_{}_{}_{n}", entry.tree, entry.id),
        kind: kind.to_owned(),
        created_ms: entry.ts_ms,
        tree: entry.tree.clone(),
        agent: agent.to_owned(),
        data,
    };
    match entry.event.as_str() {
        // A payment waits for a person's approval: `approval.requested` (after its crossings).
        "hold" if !entry.approval.is_empty() => {
            let mut alerts = alerts_of(&LogEntry { approval: String::new(), ..entry.clone() });
            let data = json!({
                "approval_id": entry.hold,
                "reason": entry.approval,
                "amount_micros": entry.amount,
                "expires_at_ms": entry.approval_expires_ms,
                "task": entry.task,
                "service": entry.service,
                "protocol": entry.protocol,
            });
            alerts.push(alert(alerts.len(), "approval.requested", &entry.agent, data));
            alerts
        }
        // Its decision: approved (`approve`), denied (a void, reason approval_denied) or lapsed
        // (an expiry, reason approval_expired).
        "approve" | "void" | "expire"
            if entry.event == "approve" || entry.reason == "approval_denied" || entry.reason == "approval_expired" =>
        {
            let decision = match entry.event.as_str() {
                "approve" => "approved",
                "void" => "denied",
                _ => "expired",
            };
            let detail = serde_json::from_str::<Value>(&entry.detail).unwrap_or(Value::Null);
            vec![alert(
                0,
                "approval.decided",
                &entry.agent,
                json!({
                    "approval_id": entry.hold,
                    "decision": decision,
                    "by": detail.get("by").cloned().unwrap_or(Value::Null),
                    "note": detail.get("note").cloned().unwrap_or(Value::Null),
                    "amount_micros": entry.amount,
                    "service": entry.service,
                    "protocol": entry.protocol,
                }),
            )]
        }
        "hold" if !entry.crossings.is_empty() => {
            let crossings: Vec<Crossing> = serde_json::from_str(&entry.crossings).unwrap_or_default();
            crossings
                .into_iter()
                .enumerate()
                .map(|(n, c)| {
                    let agent = c.agent.clone();
                    let mut data = json!(c);
                    data["hold"] = json!(entry.hold);
                    data["holder"] = json!(entry.agent);
                    data["service"] = json!(entry.service);
                    alert(n, "threshold.crossed", &agent, data)
                })
                .collect()
        }
        "refuse" => vec![alert(
            0,
            "payment.refused",
            &entry.agent,
            json!({
                "reason": entry.reason,
                "requested_micros": entry.amount,
                "remaining_micros": entry.remaining,
                "limited_by": entry.limited_by,
                "task": entry.task,
                "service": entry.service,
                "protocol": entry.protocol,
            }),
        )],
        "suspend" => vec![alert(
            0,
            "agent.suspended",
            &entry.agent,
            json!({
                "reason": entry.reason,
                "rule": serde_json::from_str::<Value>(&entry.detail).unwrap_or(Value::Null),
                "service": entry.service,
                "amount_micros": entry.amount,
            }),
        )],
        // A note whose reason starts with `incident_` is something an operator must look at (a
        // merchant completed an order above the hold, say); any other note is a provider's report.
        "note" => vec![alert(
            0,
            if entry.reason.starts_with("incident_") { "payment.incident" } else { "payment.note" },
            &entry.agent,
            json!({
                "reason": entry.reason,
                "hold": entry.hold,
                "amount_micros": entry.amount,
                "task": entry.task,
                "service": entry.service,
                "protocol": entry.protocol,
                "detail": serde_json::from_str::<Value>(&entry.detail).unwrap_or(Value::Null),
            }),
        )],
        "unknown" => vec![alert(
            0,
            "payment.outcome_unknown",
            &entry.agent,
            json!({
                "reason": entry.reason,
                "hold": entry.hold,
                "amount_micros": entry.amount,
                "task": entry.task,
                "service": entry.service,
                "protocol": entry.protocol,
            }),
        )],
        "reinstate" => vec![alert(0, "agent.reinstated", &entry.agent, json!({ "was": entry.reason }))],
        "revoke" => vec![alert(0, "agent.revoked", &entry.agent, json!({ "reason": entry.reason }))],
        _ => Vec::new(),
    }
}

/// Starts the consumer; it runs until the returned handle is aborted (which also stops every
/// delivery in progress: their entries stay unacknowledged, for the next consumer).
pub fn spawn(state: std::sync::Arc<Core>, config: AlertConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(consume(state, config))
}

const READ_BATCH: usize = 128;

async fn consume(state: std::sync::Arc<Core>, config: AlertConfig) {
    let consumer = config.consumer.clone().unwrap_or_else(|| format!("spendcap-{:016x}", rand::random::<u64>()));
    let http = match reqwest::Client::builder().timeout(config.request_timeout).build() {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; alerts are off");
            return;
        }
    };
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let in_flight: Arc<Mutex<HashSet<(TreeId, String)>>> = Arc::default();
    let mut deliveries = JoinSet::new();
    let mut known: HashSet<TreeId> = HashSet::new();
    let mut polls: u64 = 0;
    tracing::info!(%consumer, url = %config.url.origin().ascii_serialization(), "alert webhooks on");
    loop {
        while deliveries.try_join_next().is_some() {}
        let trees = match state.ledger.trees().await {
            Ok(trees) => trees,
            Err(e) => {
                tracing::warn!(error = %e, "alerts: cannot list trees");
                Vec::new()
            }
        };
        for tree in trees {
            let mut reads = Vec::new();
            if !known.contains(&tree) {
                if let Err(e) = state.ledger.ensure_alert_group(&tree).await {
                    tracing::warn!(%tree, error = %e, "alerts: cannot create the consumer group");
                    continue;
                }
                known.insert(tree.clone());
                reads.push(AlertRead::Pending);
            }
            if polls.is_multiple_of(10) {
                reads.push(AlertRead::Stale { min_idle_ms: config.claim_idle.as_millis() as u64 });
            }
            reads.push(AlertRead::New);
            for read in reads {
                let entries = match state.ledger.read_alerts(&tree, &consumer, read, READ_BATCH).await {
                    Ok(entries) => entries,
                    Err(e) => {
                        tracing::warn!(%tree, error = %e, "alerts: cannot read the log");
                        continue;
                    }
                };
                let mut quiet = Vec::new();
                for entry in entries {
                    let key = (tree.clone(), entry.id.clone());
                    if in_flight.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
                        continue;
                    }
                    let alerts = alerts_of(&entry);
                    if alerts.is_empty() {
                        quiet.push(entry.id);
                        continue;
                    }
                    // Waits (this task only, never a payment) while too many are in flight.
                    let Ok(permit) = permits.clone().acquire_owned().await else { return };
                    in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
                    let (state, http, config, in_flight) =
                        (state.clone(), http.clone(), config.clone(), in_flight.clone());
                    deliveries.spawn(async move {
                        for alert in &alerts {
                            deliver(&http, &config, &state.clock, alert).await;
                        }
                        if let Err(e) = state.ledger.ack_alerts(&key.0, std::slice::from_ref(&key.1)).await {
                            tracing::warn!(tree = %key.0, error = %e, "alerts: delivered but not acknowledged; it may be sent again");
                        }
                        in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                        drop(permit);
                    });
                }
                if let Err(e) = state.ledger.ack_alerts(&tree, &quiet).await {
                    tracing::warn!(%tree, error = %e, "alerts: cannot acknowledge entries");
                }
            }
        }
        polls += 1;
        tokio::time::sleep(config.poll_interval).await;
    }
}

/// The waits between one alert's delivery attempts: `retry_base` doubling up to `retry_max`, each
/// with random jitter of up to as much again (backon's), so that the instances retrying a
/// receiver that was down do not all come back to it in the same instant. Never ends.
fn retry_delays(config: &AlertConfig) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(config.retry_base)
        .with_max_delay(config.retry_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sends one alert until the receiver answers 2xx, backing off exponentially with jitter.
async fn deliver(http: &reqwest::Client, config: &AlertConfig, clock: &crate::clock::Clock, alert: &Alert) {
    let body = match serde_json::to_vec(alert) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, id = %alert.id, "alerts: cannot encode an alert; skipped");
            return;
        }
    };
    let mut delays = retry_delays(config);
    for attempt in 1u32.. {
        let signature = sign(&config.secret, clock.now_ms() / 1000, &body);
        let sent = http
            .post(config.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header("Spendcap-Event-Id", &alert.id)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                tracing::info!(id = %alert.id, kind = %alert.kind, attempt, "alert delivered");
                return;
            }
            Ok(response) => {
                tracing::warn!(id = %alert.id, status = response.status().as_u16(), attempt, "alert not accepted; retrying")
            }
            Err(e) => {
                tracing::warn!(id = %alert.id, error = %e.without_url(), attempt, "alert not delivered; retrying")
            }
        }
        tokio::time::sleep(delays.next().unwrap_or(config.retry_max)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        let secret = WebhookSecret::new("whsec_0123456789abcdef".into()).expect("long enough");
        let mut config = AlertConfig::new("http://127.0.0.1:9/hook", secret).expect("config");
        config.retry_base = Duration::from_millis(100);
        config.retry_max = Duration::from_millis(1_000);
        let first: Vec<Duration> = retry_delays(&config).take(12).collect();
        for (n, delay) in first.iter().enumerate() {
            let plain = (config.retry_base * 2u32.pow(n as u32)).min(config.retry_max);
            assert!(*delay >= plain && *delay < plain * 2, "retry {n}: {delay:?} outside [{plain:?}, 2×)");
        }
        // Two deliveries that fail together do not retry in step.
        let second: Vec<Duration> = retry_delays(&config).take(12).collect();
        assert_ne!(first, second, "the delays are jittered");
        assert!(first.windows(2).skip(5).any(|pair| pair[0] != pair[1]), "jitter at the cap too: {first:?}");
    }

    #[test]
    fn signatures_verify_and_expire_and_secrets_stay_hidden() {
        let secret = WebhookSecret::new("whsec_0123456789abcdef".into()).expect("long enough");
        let header = sign(&secret, 1_700_000_000, b"{\"a\":1}");
        assert!(verify(&secret, &header, b"{\"a\":1}", 1_700_000_100, 300));
        assert!(!verify(&secret, &header, b"{\"a\":2}", 1_700_000_100, 300), "another body");
        assert!(!verify(&secret, &header, b"{\"a\":1}", 1_700_001_000, 300), "too old");
        let other = WebhookSecret::new("whsec_another_secret_value".into()).expect("long enough");
        assert!(!verify(&other, &header, b"{\"a\":1}", 1_700_000_100, 300));
        assert!(!format!("{secret:?}").contains("0123456789"));
        assert!(WebhookSecret::new("short".into()).is_err());
    }
}
