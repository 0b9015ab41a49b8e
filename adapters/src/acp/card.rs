//! The owner's card, from the daemon's configuration: the credential `delegate_payment` vaults.
//!
//! Architecture invariant: the card number and CVC leave this type only through `Serialize`, into
//! the body of the request to the PSP. `Debug` shows the brand and last four digits, and no error
//! message repeats what was configured.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::error::AcpError;

/// Whether the number is the card's own (`fpan`) or a network token standing in for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardNumberType {
    #[default]
    Fpan,
    NetworkToken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardFunding {
    Credit,
    Debit,
    Prepaid,
}

/// A validated card. Build it with [`CardDetails::new`] or deserialize it from configuration:
///
/// ```json
/// { "number": "4242424242424242", "exp_month": "11", "exp_year": "2026", "cvc": "223",
///   "funding": "credit", "name": "Jane Doe", "brand": "visa" }
/// ```
#[derive(Clone, Deserialize)]
#[serde(try_from = "CardConfig")]
pub struct CardDetails {
    number: String,
    number_type: CardNumberType,
    exp_month: String,
    exp_year: String,
    cvc: Option<String>,
    name: Option<String>,
    funding: CardFunding,
    brand: Option<String>,
    virtual_card: bool,
    metadata: BTreeMap<String, String>,
}

/// The configuration form of a card. Deliberately without `Debug`: it holds the raw number.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardConfig {
    number: String,
    #[serde(default)]
    number_type: CardNumberType,
    exp_month: String,
    exp_year: String,
    #[serde(default)]
    cvc: Option<String>,
    #[serde(default)]
    name: Option<String>,
    funding: CardFunding,
    #[serde(default)]
    brand: Option<String>,
    #[serde(default)]
    r#virtual: bool,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl TryFrom<CardConfig> for CardDetails {
    type Error = AcpError;

    fn try_from(config: CardConfig) -> Result<CardDetails, AcpError> {
        let mut card = CardDetails::new(&config.number, &config.exp_month, &config.exp_year, config.funding)?
            .with_number_type(config.number_type);
        if let Some(cvc) = config.cvc {
            card = card.with_cvc(&cvc)?;
        }
        card.name = config.name;
        card.brand = config.brand.map(|brand| brand.to_ascii_lowercase());
        card.virtual_card = config.r#virtual;
        card.metadata = config.metadata;
        Ok(card)
    }
}

fn invalid(field: &'static str, reason: &str) -> AcpError {
    AcpError::InvalidInput { field, reason: reason.to_owned() }
}

impl CardDetails {
    /// A card from its number (12 to 19 digits, passing the Luhn check), expiry month (`"01"` to
    /// `"12"`), four-digit expiry year and funding type.
    pub fn new(number: &str, exp_month: &str, exp_year: &str, funding: CardFunding) -> Result<CardDetails, AcpError> {
        if !(12..=19).contains(&number.len()) || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("card number", "must be 12 to 19 digits"));
        }
        let month_ok = exp_month.len() == 2 && matches!(exp_month.parse::<u8>(), Ok(1..=12));
        if !month_ok || !exp_month.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("card exp_month", "must be two digits from 01 to 12"));
        }
        if exp_year.len() != 4 || !exp_year.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("card exp_year", "must be four digits"));
        }
        if !luhn_valid(number) {
            return Err(invalid("card number", "fails the Luhn check"));
        }
        Ok(CardDetails {
            number: number.to_owned(),
            number_type: CardNumberType::Fpan,
            exp_month: exp_month.to_owned(),
            exp_year: exp_year.to_owned(),
            cvc: None,
            name: None,
            funding,
            brand: None,
            virtual_card: false,
            metadata: BTreeMap::new(),
        })
    }

    pub fn with_number_type(mut self, number_type: CardNumberType) -> CardDetails {
        self.number_type = number_type;
        self
    }

    pub fn with_cvc(mut self, cvc: &str) -> Result<CardDetails, AcpError> {
        if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("card cvc", "must be 3 or 4 digits"));
        }
        self.cvc = Some(cvc.to_owned());
        Ok(self)
    }

    pub fn with_name(mut self, name: &str) -> CardDetails {
        self.name = Some(name.to_owned());
        self
    }

    pub fn with_brand(mut self, brand: &str) -> CardDetails {
        self.brand = Some(brand.to_ascii_lowercase());
        self
    }

    pub fn last4(&self) -> &str {
        &self.number[self.number.len() - 4..]
    }

    pub fn brand(&self) -> Option<&str> {
        self.brand.as_deref()
    }
}

/// The Luhn checksum every card number (and network token) satisfies; it catches a mistyped
/// number in the configuration before the PSP does.
fn luhn_valid(number: &str) -> bool {
    let sum: u32 = number
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let digit = u32::from(b - b'0');
            if i % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardDetails")
            .field("number", &format_args!("<redacted, last4 {}>", self.last4()))
            .field("cvc", &self.cvc.as_ref().map(|_| format_args!("<redacted>")))
            .field("brand", &self.brand)
            .field("funding", &self.funding)
            .field("number_type", &self.number_type)
            .finish_non_exhaustive()
    }
}

/// The wire form, ACP `PaymentMethodCard`.
#[derive(Serialize)]
struct PaymentMethodCard<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    card_number_type: CardNumberType,
    number: &'a str,
    exp_month: &'a str,
    exp_year: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cvc: Option<&'a str>,
    /// The issuer identification number is the first six digits of a real card number; a network
    /// token's leading digits identify no issuer, so it is sent only for `fpan`.
    #[serde(skip_serializing_if = "Option::is_none")]
    iin: Option<&'a str>,
    display_card_funding_type: CardFunding,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_brand: Option<&'a str>,
    display_last4: &'a str,
    metadata: &'a BTreeMap<String, String>,
    #[serde(rename = "virtual")]
    virtual_card: bool,
}

impl Serialize for CardDetails {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PaymentMethodCard {
            kind: "card",
            card_number_type: self.number_type,
            number: &self.number,
            exp_month: &self.exp_month,
            exp_year: &self.exp_year,
            name: self.name.as_deref(),
            cvc: self.cvc.as_deref(),
            iin: (self.number_type == CardNumberType::Fpan).then(|| &self.number[..6]),
            display_card_funding_type: self.funding,
            display_brand: self.brand.as_deref(),
            display_last4: self.last4(),
            metadata: &self.metadata,
            virtual_card: self.virtual_card,
        }
        .serialize(serializer)
    }
}
