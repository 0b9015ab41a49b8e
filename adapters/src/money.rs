//! Money: integer micro-USD, parsed exactly from integers or decimal text. No floats, anywhere.

use std::fmt;

/// An amount of money in micro-USD (1 USD = 1,000,000 micros; USDC atomic units are micros 1:1).
///
/// Every `Micros` is at most [`Micros::MAX`], one billion USD. The bound keeps every sum the ledger
/// forms (spent + held + amount, over a whole budget tree) far below 2^53, so the ledger's Lua
/// scripts, whose numbers are IEEE doubles, compute with exact integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(u64);

/// Why a piece of outside input is not a valid amount. `code()` is stable and part of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must not be negative")]
    Negative,
    #[error("amount must be greater than zero")]
    Zero,
    #[error("amount has a fraction of a micro-dollar (or of the currency's smallest unit)")]
    Fractional,
    #[error("amount exceeds the largest supported amount of {} micros", Micros::MAX.0)]
    TooLarge,
    #[error("amount is not a decimal number: {0:?}")]
    Malformed(String),
}

impl AmountError {
    /// The stable, snake_case error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            AmountError::Negative => "amount_negative",
            AmountError::Zero => "amount_zero",
            AmountError::Fractional => "amount_fractional",
            AmountError::TooLarge => "amount_too_large",
            AmountError::Malformed(_) => "amount_malformed",
        }
    }
}

impl Micros {
    /// The largest amount spendcap represents: 10^15 micros, one billion USD.
    pub const MAX: Micros = Micros(1_000_000_000_000_000);
    pub const ZERO: Micros = Micros(0);

    /// Any amount from zero to [`Micros::MAX`] (a cap, a balance).
    pub fn new(micros: u64) -> Result<Micros, AmountError> {
        if micros > Self::MAX.0 {
            return Err(AmountError::TooLarge);
        }
        Ok(Micros(micros))
    }

    /// A payment amount: from one micro to [`Micros::MAX`].
    pub fn positive(micros: u64) -> Result<Micros, AmountError> {
        if micros == 0 {
            return Err(AmountError::Zero);
        }
        Self::new(micros)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).and_then(|sum| Micros::new(sum).ok())
    }

    pub fn saturating_sub(self, other: Micros) -> Micros {
        Micros(self.0.saturating_sub(other.0))
    }

    /// Parses a JSON number that must be a whole number of micros (zero allowed).
    ///
    /// `1.5` is fractional, `-1` negative, `1e30` too large; `1.0` is refused as fractional too,
    /// because a client that sends a float has a float somewhere, and that is the bug to surface.
    pub fn from_json_number(number: &serde_json::Number) -> Result<Micros, AmountError> {
        if let Some(value) = number.as_u64() {
            return Micros::new(value);
        }
        if number.as_i64().is_some() {
            return Err(AmountError::Negative);
        }
        match number.as_f64() {
            Some(value) if value < 0.0 => Err(AmountError::Negative),
            Some(value) if value.fract() == 0.0 && value >= u64::MAX as f64 => Err(AmountError::TooLarge),
            _ => Err(AmountError::Fractional),
        }
    }

    /// Parses a non-negative decimal text in a unit worth `10^unit_exponent` micros.
    ///
    /// `unit_exponent` is 6 for whole US dollars (`"0.10"` → 100,000), 4 for US cents (ACP minor
    /// units), 0 for USDC atomic units. Digits beyond the unit's precision must be zeros. Signs,
    /// exponents, spaces and empty parts (`".5"`, `"1."`) are refused: outside input gets one
    /// unambiguous spelling.
    pub fn from_decimal_str(text: &str, unit_exponent: u32) -> Result<Micros, AmountError> {
        if let Some(rest) = text.strip_prefix('-') {
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err(AmountError::Negative);
            }
            return Err(AmountError::Malformed(text.to_owned()));
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let digits_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits_only(whole) || fraction.is_some_and(|f| !digits_only(f)) {
            return Err(AmountError::Malformed(text.to_owned()));
        }
        let fraction = fraction.unwrap_or("");
        let exponent = unit_exponent as usize;
        let (kept, dropped) = fraction.split_at(fraction.len().min(exponent));
        if dropped.bytes().any(|b| b != b'0') {
            return Err(AmountError::Fractional);
        }
        // Whole part times 10^exponent plus the kept fraction digits, padded to the exponent.
        let whole = whole.trim_start_matches('0');
        if whole.len() > 20 {
            return Err(AmountError::TooLarge);
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| AmountError::TooLarge)? };
        let mut fraction_value: u128 =
            if kept.is_empty() { 0 } else { kept.parse().map_err(|_| AmountError::Malformed(text.to_owned()))? };
        for _ in kept.len()..exponent {
            fraction_value *= 10;
        }
        let scale = 10u128.pow(unit_exponent);
        let total =
            whole.checked_mul(scale).and_then(|w| w.checked_add(fraction_value)).ok_or(AmountError::TooLarge)?;
        if total > Self::MAX.0 as u128 {
            return Err(AmountError::TooLarge);
        }
        Ok(Micros(total as u64))
    }

    /// Formats as US dollars with six decimals, e.g. `0.250000`.
    pub fn to_usd_string(self) -> String {
        format!("{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_text_is_parsed_exactly() {
        let cases: &[(&str, u32, Result<u64, &str>)] = &[
            ("0.10", 6, Ok(100_000)),
            ("1", 6, Ok(1_000_000)),
            ("0.000001", 6, Ok(1)),
            ("0.0000010", 6, Ok(1)),
            ("0.0000001", 6, Err("amount_fractional")),
            ("12.34", 4, Ok(123_400)),
            ("1999", 4, Ok(19_990_000)),
            ("10000", 0, Ok(10_000)),
            ("1.5", 0, Err("amount_fractional")),
            ("1000000000", 6, Ok(1_000_000_000_000_000)),
            ("1000000000.000001", 6, Err("amount_too_large")),
            ("99999999999999999999999999", 0, Err("amount_too_large")),
            ("-1", 6, Err("amount_negative")),
            ("", 6, Err("amount_malformed")),
            (".5", 6, Err("amount_malformed")),
            ("1.", 6, Err("amount_malformed")),
            ("1e5", 6, Err("amount_malformed")),
            ("+1", 6, Err("amount_malformed")),
            (" 1", 6, Err("amount_malformed")),
            ("0x10", 0, Err("amount_malformed")),
        ];
        for (text, exponent, expected) in cases {
            let got = Micros::from_decimal_str(text, *exponent).map(Micros::get).map_err(|e| e.code());
            assert_eq!(&got, expected, "parsing {text:?} with exponent {exponent}");
        }
    }

    #[test]
    fn json_numbers_must_be_whole_micros() {
        let parse = |text: &str| {
            let number: serde_json::Number = serde_json::from_str(text).expect("test JSON");
            Micros::from_json_number(&number).map(Micros::get).map_err(|e| e.code())
        };
        assert_eq!(parse("250000"), Ok(250_000));
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("-5"), Err("amount_negative"));
        assert_eq!(parse("1.5"), Err("amount_fractional"));
        assert_eq!(parse("-0.5"), Err("amount_negative"));
        assert_eq!(parse("1e30"), Err("amount_too_large"));
        assert_eq!(parse("18446744073709551616"), Err("amount_too_large"));
        assert_eq!(parse("1000000000000001"), Err("amount_too_large"));
        assert_eq!(Micros::positive(0).map_err(|e| e.code()), Err("amount_zero"));
    }

    #[test]
    fn usd_formatting_keeps_every_micro() {
        assert_eq!(Micros(1).to_usd_string(), "0.000001");
        assert_eq!(Micros(12_500_000).to_usd_string(), "12.500000");
    }
}
