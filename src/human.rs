//! Times and amounts for people, in one place for the CLI, the reports and the CSV export:
//! ISO-8601 UTC times, dollars with 2 to 6 decimals formatted from integer micros (never a
//! float), and the `--since` / `--until` forms (`24h`, `7d`, `2026-12-01`, an RFC 3339 time).

use jiff::{SignedDuration, Span, SpanRelativeTo, Timestamp};

/// `ms` since the epoch as `2026-12-01T10:00:00Z` (seconds precision, for tables).
pub fn time(ms: u64) -> String {
    match Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

/// `ms` since the epoch as `2026-12-01T10:00:00.123Z` (milliseconds precision, for exports).
pub fn time_ms(ms: u64) -> String {
    match Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => String::new(),
    }
}

/// Micro-USD as dollars: at least 2 decimals, more only when the amount has them
/// (`$1.50`, `$0.0125`, `$0.000001`).
pub fn usd(micros: u64) -> String {
    let fraction = format!("{:06}", micros % 1_000_000);
    let kept = fraction.trim_end_matches('0');
    let decimals = if kept.len() < 2 { &fraction[..2] } else { kept };
    format!("${}.{decimals}", micros / 1_000_000)
}

/// A point in time given on the command line, as ms since the epoch: a duration back from
/// `now_ms` (`90m`, `24h`, `7d`, `2w`; days are 24 hours), a UTC date (`2026-12-01`, its
/// midnight), an RFC 3339 time (`2026-12-01T10:00:00Z`, `…+02:00`) or plain ms since the epoch.
pub fn parse_time(text: &str, now_ms: u64) -> Result<u64, String> {
    let text = text.trim();
    let explain = || {
        format!(
            "{text:?}: give a duration back from now (24h, 7d), a UTC date (2026-12-01), an RFC 3339 time \
             (2026-12-01T10:00:00Z) or ms since the epoch"
        )
    };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| explain());
    }
    if let Ok(ts) = text.parse::<Timestamp>() {
        return u64::try_from(ts.as_millisecond()).map_err(|_| explain());
    }
    if let Ok(date) = text.parse::<jiff::civil::Date>() {
        let ts = jiff::tz::TimeZone::UTC.to_timestamp(date.to_datetime(jiff::civil::Time::midnight()));
        return ts.ok().and_then(|ts| u64::try_from(ts.as_millisecond()).ok()).ok_or_else(explain);
    }
    if let Ok(span) = text.parse::<Span>() {
        let back: SignedDuration = span.to_duration(SpanRelativeTo::days_are_24_hours()).map_err(|_| explain())?;
        let back_ms = u64::try_from(back.as_millis()).map_err(|_| explain())?;
        return Ok(now_ms.saturating_sub(back_ms));
    }
    Err(explain())
}

/// A point in time that must be absolute (an expiry): a UTC date (`2027-01-01`, its midnight),
/// an RFC 3339 time or ms since the epoch; no duration.
pub fn parse_instant(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.parse::<Span>().is_ok() && trimmed.parse::<jiff::civil::Date>().is_err() {
        return Err(format!("{trimmed:?}: give a UTC date (2027-01-01) or an RFC 3339 time, not a duration"));
    }
    parse_time(trimmed, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_have_two_decimals_and_more_only_when_needed() {
        let cases = [
            (0, "$0.00"),
            (1_500_000, "$1.50"),
            (5_000_000, "$5.00"),
            (12_500, "$0.0125"),
            (10_000, "$0.01"),
            (100, "$0.0001"),
            (1, "$0.000001"),
            (1_234_567, "$1.234567"),
            (10_050_000, "$10.05"),
        ];
        for (micros, text) in cases {
            assert_eq!(usd(micros), text, "{micros}");
        }
    }

    #[test]
    fn times_are_iso_8601_utc() {
        assert_eq!(time(1_796_083_200_000), "2026-12-01T00:00:00Z");
        assert_eq!(time(1_796_083_200_123), "2026-12-01T00:00:00Z");
        assert_eq!(time_ms(1_796_083_200_123), "2026-12-01T00:00:00.123Z");
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn since_and_until_take_durations_dates_and_times() {
        let now = 1_796_083_200_000 + 3_600_000;
        assert_eq!(parse_time("24h", now), Ok(now - 86_400_000));
        assert_eq!(parse_time("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(parse_time("90m", now), Ok(now - 5_400_000));
        assert_eq!(parse_time("1w", now), Ok(now - 7 * 86_400_000));
        assert_eq!(parse_time("2026-12-01", now), Ok(1_796_083_200_000));
        assert_eq!(parse_time("2026-12-01T10:00:00Z", now), Ok(1_796_083_200_000 + 36_000_000));
        assert_eq!(parse_time("2026-12-01T12:00:00+02:00", now), Ok(1_796_083_200_000 + 36_000_000));
        assert_eq!(parse_time("1796083200000", now), Ok(1_796_083_200_000));
        for bad in ["", "yesterday", "2026-13-01", "3 months", "-5"] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
        assert_eq!(parse_instant("2026-12-01"), Ok(1_796_083_200_000));
        assert!(parse_instant("24h").is_err());
    }
}
