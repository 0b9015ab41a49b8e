//! JSON numbers kept as their exact decimal text.
//!
//! AP2 v0.1 amounts (W3C `PaymentCurrencyAmount.value`) and v0.2's `payment.budget` `max` are JSON
//! numbers in major units. `serde_json` would read `12.345678` into an `f64`; this type reads the
//! number's raw text instead (through [`RawValue`]) and converts it to [`Micros`] with
//! [`Micros::from_decimal_str`], so no float ever touches money.
//!
//! Because it needs the raw text, a type containing a `JsonDecimal` must be read with
//! `serde_json::from_str`/`from_slice`, not `from_value`.

use std::fmt;

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::money::{AmountError, Micros};

/// A JSON number, exactly as written (`0.10`, `12.345678`, `1e2`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonDecimal(String);

impl JsonDecimal {
    /// Wraps JSON number text; refuses anything that is not a JSON number.
    pub fn parse(text: &str) -> Result<JsonDecimal, AmountError> {
        let text = text.trim();
        if !is_json_number(text) {
            return Err(AmountError::Malformed(text.to_owned()));
        }
        Ok(JsonDecimal(text.to_owned()))
    }

    /// The number's text as it was written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Converts a number in US dollars (major units) to micro-USD, exactly.
    ///
    /// Exponent notation (`1e2`) is refused as malformed rather than interpreted: a W3C
    /// PaymentCurrencyAmount is a plain decimal, and an exponent means a float serializer was
    /// involved somewhere upstream.
    pub fn to_usd_micros(&self) -> Result<Micros, AmountError> {
        Micros::from_decimal_str(&self.0, 6)
    }
}

impl fmt::Debug for JsonDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonDecimal({})", self.0)
    }
}

impl fmt::Display for JsonDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 8259 `number`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    if bytes.get(i) == Some(&b'-') {
        i += 1;
    }
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == bytes.len()
}

impl<'de> Deserialize<'de> for JsonDecimal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<JsonDecimal, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        JsonDecimal::parse(raw.get()).map_err(|_| D::Error::custom("expected a JSON number"))
    }
}

impl Serialize for JsonDecimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(self.0.clone()).map_err(S::Error::custom)?;
        raw.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(json: &str) -> Result<u64, String> {
        #[derive(Deserialize)]
        struct Holder {
            value: JsonDecimal,
        }
        let holder: Holder = serde_json::from_str(&format!(r#"{{"value":{json}}}"#)).map_err(|e| e.to_string())?;
        holder.value.to_usd_micros().map(Micros::get).map_err(|e| e.code().to_owned())
    }

    #[test]
    fn ap2_decimal_amounts_convert_exactly_from_their_text() {
        assert_eq!(micros("0.1"), Ok(100_000));
        assert_eq!(micros("0.10"), Ok(100_000));
        assert_eq!(micros("12.345678"), Ok(12_345_678));
        assert_eq!(micros("120"), Ok(120_000_000));
        // A value whose f64 is not the decimal: the text wins.
        assert_eq!(micros("0.000003"), Ok(3));
        assert_eq!(micros("999999999.999999"), Ok(999_999_999_999_999));
        // Below a micro-dollar, negative, exponent: refused with their own codes.
        assert_eq!(micros("12.3456789"), Err("amount_fractional".into()));
        assert_eq!(micros("-1.50"), Err("amount_negative".into()));
        assert_eq!(micros("1e2"), Err("amount_malformed".into()));
        assert_eq!(micros("1E-2"), Err("amount_malformed".into()));
        // Not a number at all is a deserialization error.
        assert!(micros(r#""12.00""#).is_err());
    }

    #[test]
    fn ap2_decimal_serializes_verbatim() {
        let decimal = JsonDecimal::parse("120.50").expect("number");
        assert_eq!(serde_json::to_string(&decimal).expect("serializes"), "120.50");
        assert!(JsonDecimal::parse("01").is_err());
        assert!(JsonDecimal::parse("1.").is_err());
        assert!(JsonDecimal::parse("NaN").is_err());
    }
}
