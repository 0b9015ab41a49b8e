//! Spending controls on an agent, enforced inside the same atomic step as the hold: per-task
//! caps, budget periods, allow/deny lists, the runaway-loop breaker, and the alert thresholds
//! the daemon's webhooks use.
//!
//! [`Controls`] serializes to the `ctl` field of the agent's Redis hash (a flat JSON object the
//! Lua library reads); the memory ledger keeps the same type. The rules here (validation, UTC
//! calendar periods, list matching, threshold arithmetic) are the Lua library's, in Rust.

use serde::{Deserialize, Serialize};

use adapters::Micros;

/// The budget periods of card spending controls. `PerPayment` limits one hold's amount; the
/// others limit what is spent + held within a UTC calendar period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    PerPayment,
    Daily,
    Weekly,
    Monthly,
    AllTime,
}

impl Period {
    pub const ALL: [Period; 5] = [Period::PerPayment, Period::Daily, Period::Weekly, Period::Monthly, Period::AllTime];
    /// The periods with a running counter (every one but `PerPayment`).
    pub const COUNTED: [Period; 4] = [Period::Daily, Period::Weekly, Period::Monthly, Period::AllTime];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::PerPayment => "per_payment",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::AllTime => "all_time",
        }
    }

    pub fn parse(text: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// The stable refusal code of a hold that would pass this period's limit.
    pub fn refusal_code(self) -> &'static str {
        match self {
            Period::PerPayment => "per_payment_limit_exceeded",
            Period::Daily => "daily_limit_exceeded",
            Period::Weekly => "weekly_limit_exceeded",
            Period::Monthly => "monthly_limit_exceeded",
            Period::AllTime => "all_time_limit_exceeded",
        }
    }

    /// The start of the UTC calendar period that contains `now_ms`: days start at midnight,
    /// weeks on Monday (ISO 8601), months on the 1st; `AllTime` (and `PerPayment`) at 0.
    pub fn start_ms(self, now_ms: u64) -> u64 {
        let day = (now_ms / DAY_MS) as i64;
        let start_day = match self {
            Period::PerPayment | Period::AllTime => return 0,
            Period::Daily => day,
            // 1970-01-01 was a Thursday: (day + 3) % 7 is 0 on Mondays.
            Period::Weekly => day - (day + 3).rem_euclid(7),
            Period::Monthly => {
                let (y, m) = civil_from_days(day);
                days_from_civil(y, m)
            }
        };
        start_day as u64 * DAY_MS
    }

    /// The end (exclusive) of the period that starts at `start_ms`; `None` for `AllTime`.
    pub fn end_ms(self, start_ms: u64) -> Option<u64> {
        let day = (start_ms / DAY_MS) as i64;
        let end_day = match self {
            Period::PerPayment | Period::AllTime => return None,
            Period::Daily => day + 1,
            Period::Weekly => day + 7,
            Period::Monthly => {
                let (y, m) = civil_from_days(day);
                if m == 12 {
                    days_from_civil(y + 1, 1)
                } else {
                    days_from_civil(y, m + 1)
                }
            }
        };
        Some(end_day as u64 * DAY_MS)
    }
}

const DAY_MS: u64 = 86_400_000;

/// (year, month) of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// Days from 1970-01-01 to the first of month `m` of year `y`.
fn days_from_civil(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Most holds the breaker may count in its window (its memory per agent is bounded by this).
pub const MAX_BREAKER_HOLDS: u32 = 10_000;
pub const MAX_REPEATS: u32 = 1_000_000;
/// Longest breaker window: 31 days.
pub const MAX_WINDOW_MS: u64 = 31 * DAY_MS;
/// Longest allow or deny list.
pub const MAX_LIST: usize = 256;
pub const MAX_THRESHOLDS: usize = 10;

/// The runaway-loop breaker that agents created through the API get unless told otherwise:
/// more than 600 holds in a minute, or more than 100 identical payments (same service, same
/// amount) in a row, suspends the agent. No spend-rate rule by default: what is fast depends
/// on the budget.
pub const DEFAULT_MAX_HOLDS: u32 = 600;
pub const DEFAULT_WINDOW_MS: u64 = 60_000;
pub const DEFAULT_MAX_REPEATS: u32 = 100;
/// Default alert thresholds, in percent of a limit.
pub const DEFAULT_ALERTS: [u8; 3] = [50, 80, 100];

/// The detail keys whose values are payee names that allow and deny lists match, besides the
/// hold's `service`: an x402 `payTo` address, an AP2 merchant id, a payee id.
pub const PAYEE_DETAILS: [&str; 4] = ["pay_to", "merchant_id", "payee", "payee_id"];

/// An agent's spending controls, as stored (`ctl`). Every field is optional; absent is off.
/// Money is micro-USD. Ancestors' controls apply to their whole subtree, except the breaker,
/// which watches the agent's own holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controls {
    /// Most spent + held per task label.
    #[serde(rename = "task", default, skip_serializing_if = "Option::is_none")]
    pub task_cap: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_payment: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_time: Option<u64>,
    /// Lowercase service names (`*.example.com` for subdomains); empty: every service.
    #[serde(rename = "svc_allow", default, skip_serializing_if = "Vec::is_empty")]
    pub services_allow: Vec<String>,
    #[serde(rename = "svc_deny", default, skip_serializing_if = "Vec::is_empty")]
    pub services_deny: Vec<String>,
    #[serde(rename = "proto_allow", default, skip_serializing_if = "Vec::is_empty")]
    pub protocols_allow: Vec<String>,
    #[serde(rename = "proto_deny", default, skip_serializing_if = "Vec::is_empty")]
    pub protocols_deny: Vec<String>,
    /// Breaker: one hold more than this within `window_ms` suspends the agent (`velocity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_holds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// Breaker: holding more than this within `spend_window_ms` suspends the agent (`velocity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_spend: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_window_ms: Option<u64>,
    /// Breaker: more identical (service + amount) holds in a row than this suspends (`repeat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_repeats: Option<u32>,
    /// Payments a person approves before they go out (see [`ApprovalRule`]).
    #[serde(rename = "appr", default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRule>,
}

/// Longest time a payment may wait for approval: 7 days.
pub const MAX_APPROVAL_TTL_MS: u64 = 7 * DAY_MS;
/// How long a payment waits for approval when the rule names no `ttl_secs`: 15 minutes.
pub const DEFAULT_APPROVAL_TTL_MS: u64 = 15 * 60 * 1000;

/// An approval rule (`ctl.appr`): a payment of the agent (or of its subtree, for an ancestor's
/// rule) that matches any of its parts is held as usual but waits, `pending_approval`, until a
/// person approves (it goes on) or denies (released), or `ttl_ms` passes (released).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// Payments above this amount (micros).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<u64>,
    /// Payments to a service this agent never settled a payment with.
    #[serde(rename = "new", default, skip_serializing_if = "std::ops::Not::not")]
    pub new_service: bool,
    /// Payments to these services (lowercase; `*.example.com` for subdomains).
    #[serde(rename = "svc", default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Payments over these protocols.
    #[serde(rename = "proto", default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    /// How long a payment waits for a decision.
    pub ttl_ms: u64,
}

impl ApprovalRule {
    /// Why a payment needs approval under this rule (`None`: it does not). `seen`: whether the
    /// agent settled a payment with the service before. The order is the Lua library's.
    pub fn reason(&self, amount: u64, protocol: &str, names: &[String], seen: bool) -> Option<&'static str> {
        if self.above.is_some_and(|above| amount > above) {
            return Some("above_amount");
        }
        if listed(&self.protocols, &[protocol.to_owned()]) {
            return Some("listed_protocol");
        }
        if listed(&self.services, names) {
            return Some("listed_service");
        }
        if self.new_service && !seen {
            return Some("new_service");
        }
        None
    }

    pub fn validate(&self) -> Result<(), ControlsError> {
        if self.above.is_some_and(|a| a > Micros::MAX.get()) {
            return Err(ControlsError::InvalidApproval(format!(
                "approval.above_micros must be at most {} micros",
                Micros::MAX.get()
            )));
        }
        if self.ttl_ms < 1_000 || self.ttl_ms > MAX_APPROVAL_TTL_MS {
            return Err(ControlsError::InvalidApproval(format!(
                "approval.ttl_secs must be from 1 second to {} days",
                MAX_APPROVAL_TTL_MS / DAY_MS
            )));
        }
        if self.services.len() > MAX_LIST
            || self.services.iter().any(|s| {
                s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) || s.to_ascii_lowercase() != **s
            })
        {
            return Err(ControlsError::InvalidApproval(format!(
                "approval.services takes at most {MAX_LIST} lowercase names of 1 to 256 bytes"
            )));
        }
        if let Some(bad) = self.protocols.iter().find(|p| p.parse::<adapters::Protocol>().is_err()) {
            return Err(ControlsError::UnknownProtocol(bad.clone()));
        }
        if self.above.is_none() && !self.new_service && self.services.is_empty() && self.protocols.is_empty() {
            return Err(ControlsError::InvalidApproval(
                "an approval rule needs above_micros, new_service, services or protocols".into(),
            ));
        }
        Ok(())
    }
}

/// Why a set of controls is refused. Each variant has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlsError {
    #[error("{0}")]
    InvalidLimit(String),
    #[error("unknown period {0:?}; expected per_payment, daily, weekly, monthly or all_time")]
    UnknownPeriod(String),
    #[error("{0}")]
    InvertedLimits(String),
    #[error("{0}")]
    InvalidWindow(String),
    #[error("{0}")]
    InvalidBreaker(String),
    #[error("{0}")]
    InvalidList(String),
    #[error("unknown protocol {0:?}; expected x402, acp, ap2, generic, api or mpp")]
    UnknownProtocol(String),
    #[error("{0}")]
    InvalidThreshold(String),
    #[error("{0}")]
    InvalidTask(String),
    #[error("{0}")]
    InvalidApproval(String),
}

impl ControlsError {
    pub fn code(&self) -> &'static str {
        match self {
            ControlsError::InvalidLimit(_) => "invalid_limit",
            ControlsError::UnknownPeriod(_) => "unknown_period",
            ControlsError::InvertedLimits(_) => "inverted_limits",
            ControlsError::InvalidWindow(_) => "invalid_window",
            ControlsError::InvalidBreaker(_) => "invalid_breaker",
            ControlsError::InvalidList(_) => "invalid_list",
            ControlsError::UnknownProtocol(_) => "unknown_protocol",
            ControlsError::InvalidThreshold(_) => "invalid_threshold",
            ControlsError::InvalidTask(_) => "invalid_task",
            ControlsError::InvalidApproval(_) => "invalid_approval",
        }
    }
}

impl Controls {
    /// The breaker every agent created through the API starts with.
    pub fn default_breaker() -> Controls {
        Controls {
            max_holds: Some(DEFAULT_MAX_HOLDS),
            window_ms: Some(DEFAULT_WINDOW_MS),
            max_repeats: Some(DEFAULT_MAX_REPEATS),
            ..Controls::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self == &Controls::default()
    }

    pub fn limit(&self, period: Period) -> Option<u64> {
        match period {
            Period::PerPayment => self.per_payment,
            Period::Daily => self.daily,
            Period::Weekly => self.weekly,
            Period::Monthly => self.monthly,
            Period::AllTime => self.all_time,
        }
    }

    pub fn set_limit(&mut self, period: Period, limit: Option<u64>) {
        let slot = match period {
            Period::PerPayment => &mut self.per_payment,
            Period::Daily => &mut self.daily,
            Period::Weekly => &mut self.weekly,
            Period::Monthly => &mut self.monthly,
            Period::AllTime => &mut self.all_time,
        };
        *slot = limit;
    }

    /// The `ctl` field value: '' for no controls.
    pub fn to_wire(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_wire(text: &str) -> Option<Controls> {
        if text.is_empty() {
            return Some(Controls::default());
        }
        serde_json::from_str(text).ok()
    }

    /// Checks the rules the Lua library checks too (`parse_ctl`), with a stable code each.
    pub fn validate(&self) -> Result<(), ControlsError> {
        let money = |name: &str, v: Option<u64>| match v {
            Some(v) if v > Micros::MAX.get() => {
                Err(ControlsError::InvalidLimit(format!("{name} must be at most {} micros", Micros::MAX.get())))
            }
            _ => Ok(()),
        };
        money("task_cap_micros", self.task_cap)?;
        for period in Period::ALL {
            money(period.as_str(), self.limit(period))?;
        }
        money("max_spend_micros", self.max_spend)?;
        let mut last: Option<(Period, u64)> = None;
        for period in Period::ALL {
            if let Some(limit) = self.limit(period) {
                if let Some((shorter, bigger)) = last.filter(|(_, l)| *l > limit) {
                    return Err(ControlsError::InvertedLimits(format!(
                        "the {} limit ({bigger}) is above the {} limit ({limit}), so it could never apply",
                        shorter.as_str(),
                        period.as_str()
                    )));
                }
                last = Some((period, limit));
            }
        }
        for (name, list) in [("services.allow", &self.services_allow), ("services.deny", &self.services_deny)] {
            if list.len() > MAX_LIST {
                return Err(ControlsError::InvalidList(format!("{name} has more than {MAX_LIST} entries")));
            }
            if let Some(bad) = list.iter().find(|s| s.is_empty() || s.len() > 256 || s.chars().any(char::is_control)) {
                return Err(ControlsError::InvalidList(format!(
                    "{name} entry {bad:?} must be 1 to 256 bytes without control characters"
                )));
            }
            if let Some(bad) = list.iter().find(|s| s.to_ascii_lowercase() != **s) {
                return Err(ControlsError::InvalidList(format!("{name} entry {bad:?} must be lowercase")));
            }
        }
        for list in [&self.protocols_allow, &self.protocols_deny] {
            if let Some(bad) = list.iter().find(|p| p.parse::<adapters::Protocol>().is_err()) {
                return Err(ControlsError::UnknownProtocol(bad.clone()));
            }
        }
        let window = |name: &str, w: Option<u64>| match w {
            Some(w) if w == 0 || w > MAX_WINDOW_MS => Err(ControlsError::InvalidWindow(format!(
                "{name} must be from 1 second to {} days",
                MAX_WINDOW_MS / DAY_MS
            ))),
            _ => Ok(()),
        };
        window("window_secs", self.window_ms)?;
        window("spend_window_secs", self.spend_window_ms)?;
        match (self.max_holds, self.window_ms) {
            (Some(n), Some(_)) if n == 0 || n > MAX_BREAKER_HOLDS => {
                return Err(ControlsError::InvalidBreaker(format!("max_holds must be from 1 to {MAX_BREAKER_HOLDS}")))
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(ControlsError::InvalidBreaker("max_holds and window_secs go together".into()))
            }
            _ => {}
        }
        match (self.max_spend, self.spend_window_ms) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ControlsError::InvalidBreaker("max_spend_micros and spend_window_secs go together".into()))
            }
            (Some(_), Some(spend_window)) => match self.window_ms {
                None => {
                    return Err(ControlsError::InvalidBreaker(
                        "the spend rule needs the hold rule (max_holds, window_secs): it bounds what the spend window remembers"
                            .into(),
                    ))
                }
                Some(window) if spend_window > window => {
                    return Err(ControlsError::InvalidWindow(format!(
                        "inverted windows: spend_window_secs ({}) is longer than window_secs ({})",
                        spend_window / 1000,
                        window / 1000
                    )))
                }
                _ => {}
            },
            (None, None) => {}
        }
        if let Some(m) = self.max_repeats {
            if m == 0 || m > MAX_REPEATS {
                return Err(ControlsError::InvalidBreaker(format!("max_repeats must be from 1 to {MAX_REPEATS}")));
            }
        }
        if let Some(rule) = &self.approval {
            rule.validate()?;
        }
        Ok(())
    }

    /// Whether the protocol and service lists let a payment through (`None`), or which
    /// refusal code they give.
    pub fn list_refusal(&self, protocol: &str, names: &[String]) -> Option<&'static str> {
        let protocol = [protocol.to_owned()];
        if listed(&self.protocols_deny, &protocol)
            || (!self.protocols_allow.is_empty() && !listed(&self.protocols_allow, &protocol))
        {
            return Some("protocol_denied");
        }
        if listed(&self.services_deny, names)
            || (!self.services_allow.is_empty() && !listed(&self.services_allow, names))
        {
            return Some("service_denied");
        }
        None
    }
}

/// Checks alert thresholds: at most [`MAX_THRESHOLDS`] ascending percents from 1 to 100.
pub fn validate_alerts(percents: &[u8]) -> Result<(), ControlsError> {
    if percents.len() > MAX_THRESHOLDS
        || percents.iter().any(|p| !(1..=100).contains(p))
        || percents.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(ControlsError::InvalidThreshold(format!(
            "alert thresholds are up to {MAX_THRESHOLDS} ascending percents from 1 to 100"
        )));
    }
    Ok(())
}

/// The `alerts` field value: `50,80,100`.
pub fn alerts_to_wire(percents: &[u8]) -> String {
    percents.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

pub fn alerts_from_wire(text: &str) -> Vec<u8> {
    text.split(',').filter_map(|p| p.parse().ok()).collect()
}

/// Whether any of `names` is on `list`; `*.example.com` matches every subdomain of example.com.
pub fn listed(list: &[String], names: &[String]) -> bool {
    list.iter().any(|entry| {
        let suffix = entry.strip_prefix('*').filter(|s| s.starts_with('.'));
        names.iter().any(|name| {
            name == entry || suffix.is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
        })
    })
}

/// The names a payment goes by, lowercased: its service and the payee fields of its details.
pub fn payment_names(service: &str, details: &str) -> Vec<String> {
    let mut names = vec![service.to_ascii_lowercase()];
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(details) {
        for key in PAYEE_DETAILS {
            if let Some(value) = map.get(key).and_then(|v| v.as_str()).filter(|v| !v.is_empty()) {
                names.push(value.to_ascii_lowercase());
            }
        }
    }
    names
}

/// The smallest amount that is at least `percent`% of `limit`.
pub fn threshold(limit: u64, percent: u8) -> u64 {
    (limit as u128 * percent as u128).div_ceil(100) as u64
}

/// One alert threshold a hold crossed, as the ledger records it on the hold's log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Crossing {
    /// The agent whose limit it is (the holder or an ancestor).
    pub agent: String,
    /// `cap`, `daily`, `weekly`, `monthly`, `all_time` or `task`.
    pub limit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub percent: u8,
    pub limit_micros: u64,
    /// Spent + held against the limit right after the hold.
    pub used_micros: u64,
}

/// The thresholds that usage going from `before` to `after` crosses, skipping those already
/// alerted for this very limit (`alerted` = (highest percent alerted, the limit then)). Returns
/// the crossed percents (ascending) and the new high-water mark.
pub fn crossed(percents: &[u8], limit: u64, before: u64, after: u64, alerted: Option<(u8, u64)>) -> Vec<u8> {
    let done = alerted.filter(|(_, l)| *l == limit).map(|(p, _)| p).unwrap_or(0);
    percents
        .iter()
        .copied()
        .filter(|p| *p > done)
        .filter(|p| {
            let t = threshold(limit, *p);
            before < t && t <= after
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: i64, d: i64) -> u64 {
        ((days_from_civil(y, m) + d - 1) as u64) * DAY_MS
    }

    #[test]
    fn calendar_periods_start_on_utc_boundaries() {
        // 2026-03-04 is a Wednesday.
        let t = ms(2026, 3, 4) + 13 * 3_600_000;
        assert_eq!(Period::Daily.start_ms(t), ms(2026, 3, 4));
        assert_eq!(Period::Weekly.start_ms(t), ms(2026, 3, 2));
        assert_eq!(Period::Monthly.start_ms(t), ms(2026, 3, 1));
        assert_eq!(Period::Monthly.end_ms(ms(2026, 3, 1)), Some(ms(2026, 4, 1)));
        assert_eq!(Period::Monthly.end_ms(ms(2026, 12, 1)), Some(ms(2027, 1, 1)));
        assert_eq!(Period::Weekly.end_ms(ms(2026, 3, 2)), Some(ms(2026, 3, 9)));
        // Leap years: 2028-02-29 is in February; 2100 is not a leap year.
        assert_eq!(Period::Monthly.start_ms(ms(2028, 2, 29)), ms(2028, 2, 1));
        assert_eq!(ms(2100, 3, 1) - ms(2100, 2, 1), 28 * DAY_MS);
        assert_eq!(Period::Daily.start_ms(ms(2026, 1, 1) - 1), ms(2025, 12, 31));
        assert_eq!(ms(1970, 1, 1), 0);
        // 1970-01-05 was the first Monday.
        assert_eq!(Period::Weekly.start_ms(ms(1970, 1, 11)), ms(1970, 1, 5));
    }

    #[test]
    fn thresholds_are_exact_and_cross_once() {
        assert_eq!(threshold(1_000_000_000_000_000, 80), 800_000_000_000_000);
        assert_eq!(threshold(3, 50), 2);
        assert_eq!(crossed(&[50, 80, 100], 100, 49, 100, None), vec![50, 80, 100]);
        assert_eq!(crossed(&[50, 80, 100], 100, 50, 79, None), Vec::<u8>::new());
        assert_eq!(crossed(&[50, 80, 100], 100, 10, 90, Some((50, 100))), vec![80]);
        assert_eq!(crossed(&[50, 80, 100], 200, 10, 100, Some((80, 100))), vec![50]);
    }

    #[test]
    fn lists_match_names_and_subdomains() {
        let list = vec!["api.example.com".to_owned(), "*.openai.com".to_owned()];
        assert!(listed(&list, &["api.example.com".into()]));
        assert!(listed(&list, &["x.api.openai.com".into()]));
        assert!(!listed(&list, &["openai.com".into()]));
        assert!(!listed(&list, &["example.com".into()]));
        let names = payment_names("API.Example.com", r#"{"pay_to":"0xABC","network":"base"}"#);
        assert_eq!(names, vec!["api.example.com".to_owned(), "0xabc".to_owned()]);
    }

    #[test]
    fn bad_controls_are_refused_with_their_code() {
        let mut c = Controls { daily: Some(10), weekly: Some(5), ..Controls::default() };
        assert_eq!(c.validate().map_err(|e| e.code()), Err("inverted_limits"));
        c.weekly = Some(10);
        assert_eq!(c.validate(), Ok(()));
        let c = Controls {
            max_holds: Some(10),
            window_ms: Some(1_000),
            max_spend: Some(5),
            spend_window_ms: Some(2_000),
            ..Controls::default()
        };
        assert_eq!(c.validate().map_err(|e| e.code()), Err("invalid_window"));
        let c = Controls { protocols_deny: vec!["paypal".into()], ..Controls::default() };
        assert_eq!(c.validate().map_err(|e| e.code()), Err("unknown_protocol"));
        assert_eq!(validate_alerts(&[80, 50]).map_err(|e| e.code()), Err("invalid_threshold"));
        assert!(Controls::default_breaker().validate().is_ok());
    }
}
