//! Reading the date-times AP2 and UCP carry as text (`expires_at`, `cart_expiry`,
//! `payment.execution_date`) into seconds since the Unix epoch. Small and strict on purpose.

/// Parses an RFC 3339 / ISO 8601 date-time (`2026-05-28T12:00:00Z`, `...T12:00:00.123+02:00`)
/// or a full date (`2026-05-28`, meaning its first second, UTC) into Unix seconds.
///
/// A date-time without an offset is read as UTC (Python's `datetime.isoformat()` of a naive
/// timestamp, which AP2 v0.1 samples produce). Fractions of a second are dropped.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = bytes.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter().try_fold(0i64, |acc, b| Some(acc * 10 + i64::from(b - b'0')))
    };
    let year = digits(0, 4)?;
    if bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') {
        return None;
    }
    let (month, day) = (digits(5, 2)?, digits(8, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if bytes.len() == 10 {
        return Some(days * 86_400);
    }
    if !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        || bytes.get(13) != Some(&b':')
        || bytes.get(16) != Some(&b':')
    {
        return None;
    }
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    // 60 is a leap second; it is read as the next second's start.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match bytes.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == bytes.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == bytes.len() && bytes.get(i + 3) == Some(&b':') => {
            let (hours, minutes) = (digits(i + 1, 2)?, digits(i + 4, 2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'+' {
                offset
            } else {
                -offset
            }
        }
        _ => return None,
    };
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Parses the end of a period given as a date or date-time: a bare date means its last second.
pub fn parse_period_end(text: &str) -> Option<i64> {
    let start = parse_datetime(text)?;
    Some(if text.len() == 10 { start + 86_399 } else { start })
}

/// Formats Unix seconds as an RFC 3339 UTC date-time, `2026-05-28T20:26:40Z`.
pub fn format_datetime(seconds: i64) -> String {
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap2_datetimes_parse_to_unix_seconds() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_datetime("2026-05-28T20:26:40Z"), Some(1_780_000_000));
        assert_eq!(parse_datetime("2026-05-28T22:26:40.5+02:00"), Some(1_780_000_000));
        assert_eq!(parse_datetime("2026-05-28T20:26:40"), Some(1_780_000_000));
        assert_eq!(parse_datetime("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_period_end("2000-02-29"), Some(951_868_799));
        assert_eq!(format_datetime(1_780_000_000), "2026-05-28T20:26:40Z");
        assert_eq!(format_datetime(951_868_799), "2000-02-29T23:59:59Z");
        for seconds in [0, 86_399, 951_782_400, 4_102_444_800, -1] {
            assert_eq!(parse_datetime(&format_datetime(seconds)), Some(seconds));
        }
        for bad in [
            "",
            "2026-02-30",
            "2026-13-01",
            "2026-05-28T25:00:00Z",
            "2026-05-28T10:00Z",
            "tomorrow",
            "2026-05-28T10:00:00+0200",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad:?}");
        }
    }
}
