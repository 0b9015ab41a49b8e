//! `POST /agentic_commerce/delegate_payment`: the owner's card vaulted at the PSP, usable once, by
//! one merchant, for one checkout session, up to the amount spendcap held.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::card::CardDetails;
use super::checks::SessionTotal;
use super::error::AcpError;
use super::types::{Address, DelegatedToken, PaymentHandler};

#[derive(Clone, Debug, Serialize)]
pub struct DelegatePaymentRequest {
    /// Serialized as ACP `PaymentMethodCard`; redacted in `Debug`.
    pub payment_method: CardDetails,
    pub allowance: Allowance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<Address>,
    pub risk_signals: Vec<RiskSignal>,
    pub metadata: BTreeMap<String, String>,
}

/// What the delegated token may be used for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Allowance {
    pub reason: AllowanceReason,
    /// Minor units of `currency`: the session total spendcap read and held, never more.
    pub max_amount: u64,
    pub currency: String,
    pub checkout_session_id: String,
    pub merchant_id: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowanceReason {
    OneTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskSignal {
    #[serde(rename = "type")]
    pub kind: RiskSignalType,
    pub score: i64,
    pub action: RiskAction,
}

impl RiskSignal {
    /// The signal spendcap reports for a payment it let through: it ran its own checks (agent
    /// authenticated and not revoked, amount held within every cap) and authorized the payment.
    /// spendcap does no card-testing scoring of its own, hence the score of zero.
    pub fn cap_authorized() -> RiskSignal {
        RiskSignal { kind: RiskSignalType::CardTesting, score: 0, action: RiskAction::Authorized }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskSignalType {
    CardTesting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskAction {
    Blocked,
    ManualReview,
    Authorized,
}

/// Everything a delegation is built from. `expires_at_ms` is milliseconds since the Unix epoch
/// (the daemon clock's unit); it should not outlive the hold, so that the token dies with it.
#[derive(Clone, Debug)]
pub struct Delegation<'a> {
    pub card: &'a CardDetails,
    pub billing_address: Option<&'a Address>,
    /// The total read (and held) before paying; its session is the one the token is bound to.
    pub total: &'a SessionTotal,
    /// The handler from [`super::pick_delegate_handler`]; its `config.merchant_id` is the only
    /// merchant allowed to use the token.
    pub handler: &'a PaymentHandler,
    pub expires_at_ms: u64,
    /// At least one signal; [`RiskSignal::cap_authorized`] is what spendcap knows.
    pub risk_signals: Vec<RiskSignal>,
    /// Correlation pairs (agent, hold, ...). `checkout_session_id` and `handler_id` are added.
    pub metadata: BTreeMap<String, String>,
}

/// The longest `merchant_id` the allowance schema accepts.
const MAX_MERCHANT_ID_LEN: usize = 256;

impl DelegatePaymentRequest {
    /// The request whose allowance is exactly the held total, for this session and merchant only.
    pub fn for_session(delegation: Delegation<'_>) -> Result<DelegatePaymentRequest, AcpError> {
        let Delegation { card, billing_address, total, handler, expires_at_ms, risk_signals, mut metadata } =
            delegation;
        let merchant_id = handler.merchant_id().ok_or_else(|| AcpError::InvalidInput {
            field: "payment handler",
            reason: format!("handler {:?} has no config.merchant_id to bind the token to", handler.id),
        })?;
        if merchant_id.len() > MAX_MERCHANT_ID_LEN {
            return Err(AcpError::InvalidInput {
                field: "payment handler",
                reason: format!("handler {:?} has a merchant_id longer than {MAX_MERCHANT_ID_LEN} bytes", handler.id),
            });
        }
        if risk_signals.is_empty() {
            return Err(AcpError::InvalidInput {
                field: "risk_signals",
                reason: "delegate_payment needs at least one risk signal".into(),
            });
        }
        if let Some(address) = billing_address {
            check_billing_address(address)?;
        }
        metadata.insert("checkout_session_id".into(), total.checkout_session_id.clone());
        metadata.insert("handler_id".into(), handler.id.clone());
        Ok(DelegatePaymentRequest {
            payment_method: card.clone(),
            allowance: Allowance {
                reason: AllowanceReason::OneTime,
                max_amount: total.minor_units,
                currency: total.currency.clone(),
                checkout_session_id: total.checkout_session_id.clone(),
                merchant_id: merchant_id.to_owned(),
                expires_at: rfc3339_utc(expires_at_ms)?,
            },
            billing_address: billing_address.cloned(),
            risk_signals,
            metadata,
        })
    }
}

/// The delegate-payment schema's limits on a billing address, checked here so a misconfigured
/// address is a clear error before the card is sent anywhere.
fn check_billing_address(address: &Address) -> Result<(), AcpError> {
    let limits: [(&str, &str, usize); 5] = [
        ("name", &address.name, 256),
        ("line_one", &address.line_one, 60),
        ("line_two", address.line_two.as_deref().unwrap_or(""), 60),
        ("city", &address.city, 60),
        ("postal_code", &address.postal_code, 20),
    ];
    for (field, value, max) in limits {
        if value.chars().count() > max {
            return Err(AcpError::InvalidInput {
                field: "billing address",
                reason: format!("{field} is longer than {max} characters"),
            });
        }
    }
    if address.country.len() != 2 || !address.country.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(AcpError::InvalidInput {
            field: "billing address",
            reason: "country must be an ISO 3166-1 alpha-2 code".into(),
        });
    }
    Ok(())
}

/// The PSP's answer: the delegated token.
#[derive(Clone, Debug, Deserialize)]
pub struct DelegatePaymentResponse {
    pub id: DelegatedToken,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Formats milliseconds since the Unix epoch as an RFC 3339 UTC timestamp with whole seconds.
/// Truncating the milliseconds makes an allowance end a little early, never late.
pub fn rfc3339_utc(unix_ms: u64) -> Result<String, AcpError> {
    let seconds = unix_ms / 1000;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    if year > 9999 {
        return Err(AcpError::InvalidInput { field: "expires_at", reason: "is after the year 9999".into() });
    }
    let of_day = seconds % 86_400;
    Ok(format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", of_day / 3600, of_day % 3600 / 60, of_day % 60))
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// restricted to dates from 1970 on, so all arithmetic is unsigned).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, so that leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
