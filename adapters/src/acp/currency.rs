//! Which currencies spendcap pays ACP merchants in, and how their minor units become micro-USD.

use std::collections::BTreeMap;

use crate::money::{AmountError, Micros};

use super::error::AcpError;

/// One US cent in micro-USD.
const MICROS_PER_USD_CENT: u64 = 10_000;

/// The currencies spendcap accepts, each with its value in micro-USD per minor unit.
///
/// `usd` is always known. Any other currency is refused unless the operator configured a rate:
/// the cap is in micro-USD, and a payment whose micro-USD value is a guess cannot be held against
/// it. A configured rate is an integer number of micros per minor unit (a euro cent at 1.08 USD is
/// 10,800), so conversion stays exact; choose one that errs high, because the cap is a constraint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrencyPolicy {
    micros_per_minor_unit: BTreeMap<String, u64>,
}

impl Default for CurrencyPolicy {
    fn default() -> CurrencyPolicy {
        CurrencyPolicy::usd_only()
    }
}

impl CurrencyPolicy {
    pub fn usd_only() -> CurrencyPolicy {
        CurrencyPolicy { micros_per_minor_unit: BTreeMap::from([("usd".to_owned(), MICROS_PER_USD_CENT)]) }
    }

    /// Adds (or replaces) the rate for `currency`, a three-letter ISO 4217 code.
    pub fn with_rate(mut self, currency: &str, micros_per_minor_unit: u64) -> Result<CurrencyPolicy, AcpError> {
        let currency = normalize_currency(currency).ok_or_else(|| AcpError::InvalidInput {
            field: "currency",
            reason: format!("{currency:?} is not a three-letter ISO 4217 code"),
        })?;
        if micros_per_minor_unit == 0 {
            return Err(AcpError::InvalidInput { field: "rate", reason: "a rate must be greater than zero".into() });
        }
        self.micros_per_minor_unit.insert(currency, micros_per_minor_unit);
        Ok(self)
    }

    /// Converts a positive amount of `currency` minor units to micro-USD, exactly.
    pub fn to_micros(&self, minor_units: u64, currency: &str) -> Result<Micros, AcpError> {
        let rate = normalize_currency(currency)
            .and_then(|code| self.micros_per_minor_unit.get(&code).copied())
            .ok_or_else(|| AcpError::CurrencyNotSupported(currency.to_owned()))?;
        let micros = minor_units.checked_mul(rate).ok_or(AmountError::TooLarge);
        micros.and_then(Micros::positive).map_err(|error| {
            AcpError::BadTotal(format!("{minor_units} {currency} minor units: {error} ({})", error.code()))
        })
    }
}

/// The lowercase form of a three-letter currency code. ACP recommends lowercase; an uppercase
/// code names the same currency, so it is accepted and normalized rather than refused.
pub(crate) fn normalize_currency(currency: &str) -> Option<String> {
    (currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_alphabetic())).then(|| currency.to_ascii_lowercase())
}
