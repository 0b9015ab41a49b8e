//! The ACP configuration file (`SPENDCAP_ACP_CONFIG`): the PSP, the merchants, and the owner's
//! card and billing address. It holds secrets (API keys, the card), so every type here has a
//! `Debug` that redacts them, and a parse error never repeats a value from the file.

use std::collections::BTreeMap;

use adapters::acp::{Address, ApiKey, CardDetails};
use serde::{Deserialize, Deserializer};

/// The parsed configuration file:
///
/// ```json
/// { "psp": { "name": "stripe", "base_url": "https://psp.example", "api_key": "sk_..." },
///   "merchants": [ { "name": "acme", "base_url": "https://acme.example/acp", "api_key": "..." } ],
///   "card": { "number": "4242424242424242", "exp_month": "11", "exp_year": "2030", "cvc": "123",
///             "funding": "credit", "brand": "visa", "name": "Jane Doe" },
///   "billing_address": { "name": "Jane Doe", "line_one": "1 Main St", "city": "Springfield",
///                        "state": "IL", "country": "US", "postal_code": "62701" },
///   "currency_rates": { "eur": 10800 } }
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpFile {
    /// The PSP that vaults the card and issues delegated tokens. Its `name` is matched against
    /// a payment handler's `psp` (e.g. `stripe`).
    pub psp: ProviderEntry,
    /// The merchants agents may buy from; agents name them by `name`.
    pub merchants: Vec<ProviderEntry>,
    /// The owner's card (`CardDetails` redacts itself in `Debug`).
    pub card: CardDetails,
    #[serde(default)]
    pub billing_address: Option<Address>,
    /// Micro-USD per minor unit of each non-USD currency the operator accepts (a euro cent at
    /// 1.08 USD is 10800). Without a rate, only `usd` is paid.
    #[serde(default)]
    pub currency_rates: BTreeMap<String, u64>,
}

/// The owner's payment details stay out of `Debug`: the card shows its brand and last four
/// digits, the billing address only whether there is one.
impl std::fmt::Debug for AcpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpFile")
            .field("psp", &self.psp)
            .field("merchants", &self.merchants)
            .field("card", &self.card)
            .field("billing_address", &self.billing_address.as_ref().map(|_| format_args!("<redacted>")))
            .field("currency_rates", &self.currency_rates)
            .finish()
    }
}

/// A merchant or the PSP: where it is and the key spendcap authenticates with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderEntry {
    pub name: String,
    pub base_url: String,
    /// Redacted in `Debug`.
    #[serde(deserialize_with = "api_key")]
    pub api_key: ApiKey,
}

fn api_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ApiKey, D::Error> {
    let text = String::deserialize(deserializer)?;
    ApiKey::new(text).map_err(serde::de::Error::custom)
}

impl AcpFile {
    /// Parses the file's text. The error says where and what is wrong, but never quotes a value:
    /// serde's "invalid type: string \"4242…\"" would put the card number in a start-up error.
    pub fn parse(text: &str) -> Result<AcpFile, String> {
        let file: AcpFile = serde_json::from_str(text).map_err(|error| describe(&error))?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        check_name("psp", &self.psp.name)?;
        if self.merchants.is_empty() {
            return Err("merchants must name at least one merchant".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for merchant in &self.merchants {
            check_name("merchant", &merchant.name)?;
            if !seen.insert(merchant.name.as_str()) {
                return Err(format!("merchant {:?} is configured twice", merchant.name));
            }
        }
        Ok(())
    }
}

/// Provider names appear in the log as the service and in idempotency keys: short, lowercase,
/// no separators that could be confused with the key structure.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} must be 1 to 64 characters of a-z, 0-9, '.', '-', '_'"))
    }
}

/// A serde error as a message that cannot carry a configured value: messages about the file's
/// shape (missing, unknown or duplicate fields) and the card's own checks, which name no value,
/// are kept; anything else ("invalid type: …", "invalid value: …") is replaced.
fn describe(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let safe = ["missing field", "unknown field", "duplicate field", "invalid card", "invalid api key"];
    let what = if safe.iter().any(|prefix| text.starts_with(prefix)) {
        // serde_json appends " at line L column C"; it is added back below for every message.
        text.split(" at line ").next().unwrap_or_default().to_owned()
    } else if error.is_syntax() || error.is_eof() {
        "the file is not valid JSON".to_owned()
    } else {
        "a value has the wrong type or form".to_owned()
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str =
        r#"{"number":"4242424242424242","exp_month":"11","exp_year":"2030","cvc":"123","funding":"credit"}"#;

    fn file(card: &str, merchants: &str) -> String {
        format!(
            r#"{{"psp":{{"name":"stripe","base_url":"http://psp","api_key":"sk_psp_secret"}},
                "merchants":{merchants},"card":{card},
                "billing_address":{{"name":"Olive Owner","line_one":"1 Main Street","city":"Springfield",
                                    "state":"IL","country":"US","postal_code":"62701"}}}}"#
        )
    }

    #[test]
    fn a_valid_file_parses_and_its_debug_shows_no_secret() {
        let parsed = AcpFile::parse(&file(CARD, r#"[{"name":"acme","base_url":"http://m","api_key":"sk_m_secret"}]"#))
            .expect("valid");
        let debug = format!("{parsed:?}");
        for secret in ["sk_psp_secret", "sk_m_secret", "4242424242424242", "\"123\"", "1 Main Street"] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
        assert!(debug.contains("acme"));
    }

    #[test]
    fn parse_errors_never_quote_a_value() {
        let number_as_integer = CARD.replace("\"4242424242424242\"", "4242424242424242");
        let cases = [
            (file(&number_as_integer, "[]"), "wrong type"),
            (file(&CARD.replace("4242424242424242", "4242424242424241"), "[]"), "invalid card number"),
            (file(CARD, r#"[{"name":"acme","base_url":"http://m"}]"#), "missing field `api_key`"),
            (file(CARD, "[]"), "at least one merchant"),
            (file(CARD, r#"[{"name":"Acme!","base_url":"http://m","api_key":"k"}]"#), "must be 1 to 64"),
            ("{ not json".to_owned(), "not valid JSON"),
        ];
        for (text, expected) in cases {
            let error = AcpFile::parse(&text).expect_err("refused");
            assert!(error.contains(expected), "{error:?} should say {expected:?}");
            assert!(!error.contains("424242424242424"), "{error:?} quotes the card");
        }
    }
}
