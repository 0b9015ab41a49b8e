//! AP2 v0.2 wire types, field for field from the JSON Schemas in `specs/ap2/v0.2/` (the `ap2/`
//! mandates and receipts, the `ap2/types/` and `ucp/types/` they reference).
//!
//! Closed and open mandates are different types told apart by their `vct`, which each type checks
//! exactly (version suffix included) when it is read. Optional fields are omitted when absent,
//! never written as `null`. Integers are integers: an amount written as `12.0` is refused.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::decimal::JsonDecimal;
use super::error::Ap2Error;

/// `vct` of a closed Checkout Mandate.
pub const VCT_CHECKOUT: &str = "mandate.checkout.1";
/// `vct` of an open Checkout Mandate.
pub const VCT_CHECKOUT_OPEN: &str = "mandate.checkout.open.1";
/// `vct` of a closed Payment Mandate.
pub const VCT_PAYMENT: &str = "mandate.payment.1";
/// `vct` of an open Payment Mandate.
pub const VCT_PAYMENT_OPEN: &str = "mandate.payment.open.1";

/// `types/jwk.json`: an EC P-256 public key. Unknown members are refused (the schema has
/// `additionalProperties: false`), so a private JWK (with `d`) is never accepted as a public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ops: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5u: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5t: Option<String>,
    #[serde(rename = "x5t#S256", default, skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

impl Jwk {
    /// Reads one public JWK from JSON text.
    pub fn from_json(text: &str) -> Result<Jwk, Ap2Error> {
        serde_json::from_str(text).map_err(|e| Ap2Error::InvalidKey(format!("not a public EC JWK: {e}")))
    }

    /// Whether two JWKs name the same P-256 public key (same curve point), whatever their other members.
    pub fn same_key(&self, other: &Jwk) -> bool {
        self.kty == other.kty && self.crv == other.crv && self.x == other.x && self.y == other.y
    }
}

/// RFC 7800 confirmation claim: the key a holder proves possession of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cnf {
    pub jwk: Jwk,
}

/// `types/merchant.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub website: Option<String>,
}

/// `types/amount.json`: integer minor units of an ISO 4217 currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    pub amount: i64,
    pub currency: String,
}

/// `types/payment_instrument.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentInstrument {
    pub id: String,
    #[serde(rename = "type")]
    pub instrument_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `types/pisp.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pisp {
    pub legal_name: String,
    pub brand_name: String,
    pub domain_name: String,
}

/// `types/receipt_status.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptStatus {
    Success,
    Error,
}

/// `checkout_mandate.json`: the closed Checkout Mandate content (`vct` = `mandate.checkout.1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutMandate {
    pub vct: String,
    pub checkout_jwt: String,
    pub checkout_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// `payment_mandate.json`: the closed Payment Mandate content (`vct` = `mandate.payment.1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMandate {
    pub vct: String,
    pub transaction_id: String,
    pub payee: Merchant,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pisp: Option<Pisp>,
    pub payment_amount: Amount,
    pub payment_instrument: PaymentInstrument,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// `open_checkout_mandate.json` `$defs/item`: an item acceptable for a line item requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptableItem {
    pub id: String,
    pub title: String,
}

/// `open_checkout_mandate.json` `$defs/line_item_requirements`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItemRequirement {
    pub id: String,
    pub acceptable_items: Vec<AcceptableItem>,
    pub quantity: u64,
}

/// A constraint of an open Checkout Mandate (`open_checkout_mandate.json` `constraints[]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum CheckoutConstraint {
    #[serde(rename = "checkout.allowed_merchants")]
    AllowedMerchants { allowed: Vec<Merchant> },
    #[serde(rename = "checkout.line_items")]
    LineItems { items: Vec<LineItemRequirement> },
}

/// `open_checkout_mandate.json` (`vct` = `mandate.checkout.open.1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpenCheckoutMandate {
    pub vct: String,
    pub constraints: Vec<CheckoutConstraint>,
    pub cnf: Cnf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// `payment.agent_recurrence` frequencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Frequency {
    OnDemand,
    Daily,
    Weekly,
    Biweekly,
    Monthly,
    Quarterly,
    Annually,
}

/// A constraint of an open Payment Mandate (`open_payment_mandate.json` `constraints[]`).
///
/// `payment.budget`'s `max` is a JSON number in major units; it is kept as its decimal text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum PaymentConstraint {
    #[serde(rename = "payment.agent_recurrence")]
    AgentRecurrence {
        frequency: Frequency,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_occurrences: Option<u64>,
    },
    #[serde(rename = "payment.allowed_payees")]
    AllowedPayees { allowed: Vec<Merchant> },
    #[serde(rename = "payment.allowed_payment_instruments")]
    AllowedPaymentInstruments { allowed: Vec<PaymentInstrument> },
    #[serde(rename = "payment.allowed_pisps")]
    AllowedPisps { allowed: Vec<Pisp> },
    #[serde(rename = "payment.amount_range")]
    AmountRange {
        currency: String,
        max: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
    },
    #[serde(rename = "payment.budget")]
    Budget { max: JsonDecimal, currency: String },
    #[serde(rename = "payment.execution_date")]
    ExecutionDate {
        #[serde(skip_serializing_if = "Option::is_none")]
        not_before: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        not_after: Option<String>,
    },
    #[serde(rename = "payment.reference")]
    Reference { conditional_transaction_id: String },
}

/// `open_payment_mandate.json` (`vct` = `mandate.payment.open.1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpenPaymentMandate {
    pub vct: String,
    pub constraints: Vec<PaymentConstraint>,
    pub cnf: Cnf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payee: Option<Merchant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_amount: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_instrument: Option<PaymentInstrument>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pisp: Option<Pisp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_data: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// The members every constraint has; used to dispatch on `type` before reading the rest.
#[derive(Deserialize)]
struct ConstraintHead {
    #[serde(rename = "type")]
    constraint_type: String,
}

#[derive(Deserialize)]
struct AllowedList<T> {
    allowed: Vec<T>,
}

#[derive(Deserialize)]
struct LineItemsBody {
    items: Vec<LineItemRequirement>,
}

#[derive(Deserialize)]
struct RecurrenceBody {
    frequency: Frequency,
    #[serde(default)]
    max_occurrences: Option<u64>,
}

#[derive(Deserialize)]
struct AmountRangeBody {
    currency: String,
    max: i64,
    #[serde(default)]
    min: Option<i64>,
}

#[derive(Deserialize)]
struct BudgetBody {
    max: JsonDecimal,
    currency: String,
}

#[derive(Deserialize)]
struct ExecutionDateBody {
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    not_after: Option<String>,
}

#[derive(Deserialize)]
struct ReferenceBody {
    conditional_transaction_id: String,
}

#[derive(Deserialize)]
struct RawOpenCheckout {
    vct: String,
    constraints: Vec<Box<RawValue>>,
    cnf: Cnf,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    exp: Option<i64>,
}

#[derive(Deserialize)]
struct RawOpenPayment {
    vct: String,
    constraints: Vec<Box<RawValue>>,
    cnf: Cnf,
    #[serde(default)]
    payee: Option<Merchant>,
    #[serde(default)]
    payment_amount: Option<Amount>,
    #[serde(default)]
    payment_instrument: Option<PaymentInstrument>,
    #[serde(default)]
    pisp: Option<Pisp>,
    #[serde(default)]
    execution_date: Option<String>,
    #[serde(default)]
    risk_data: Option<Map<String, Value>>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    exp: Option<i64>,
}

fn invalid(what: &str, error: serde_json::Error) -> Ap2Error {
    Ap2Error::InvalidMandate(format!("{what}: {error}"))
}

fn check_vct(expected: &'static str, found: &str) -> Result<(), Ap2Error> {
    if found != expected {
        return Err(Ap2Error::WrongMandateType { expected, found: found.to_owned() });
    }
    Ok(())
}

/// Reads the `vct` of a mandate content without reading the rest.
pub(crate) fn vct_of(json: &str) -> Result<String, Ap2Error> {
    #[derive(Deserialize)]
    struct Head {
        vct: String,
    }
    serde_json::from_str::<Head>(json).map(|h| h.vct).map_err(|e| invalid("mandate content", e))
}

fn parse_body<'a, T: Deserialize<'a>>(raw: &'a RawValue, what: &str) -> Result<T, Ap2Error> {
    serde_json::from_str(raw.get()).map_err(|e| invalid(what, e))
}

impl OpenCheckoutMandate {
    /// Reads an open Checkout Mandate from its (disclosure-resolved) JSON text.
    pub fn from_json(json: &str) -> Result<OpenCheckoutMandate, Ap2Error> {
        check_vct(VCT_CHECKOUT_OPEN, &vct_of(json)?)?;
        let raw: RawOpenCheckout = serde_json::from_str(json).map_err(|e| invalid("open checkout mandate", e))?;
        let mut constraints = Vec::with_capacity(raw.constraints.len());
        for constraint in &raw.constraints {
            let head: ConstraintHead = parse_body(constraint, "constraint")?;
            constraints.push(match head.constraint_type.as_str() {
                "checkout.allowed_merchants" => CheckoutConstraint::AllowedMerchants {
                    allowed: parse_body::<AllowedList<Merchant>>(constraint, "checkout.allowed_merchants")?.allowed,
                },
                "checkout.line_items" => {
                    let body: LineItemsBody = parse_body(constraint, "checkout.line_items")?;
                    if body.items.is_empty() || body.items.iter().any(|item| item.quantity == 0) {
                        return Err(Ap2Error::InvalidMandate(
                            "checkout.line_items needs at least one item, each with a quantity above zero".into(),
                        ));
                    }
                    CheckoutConstraint::LineItems { items: body.items }
                }
                other => return Err(Ap2Error::UnknownConstraint(other.to_owned())),
            });
        }
        if !constraints.iter().any(|c| matches!(c, CheckoutConstraint::LineItems { .. })) {
            return Err(Ap2Error::InvalidMandate("an open checkout mandate must contain checkout.line_items".into()));
        }
        Ok(OpenCheckoutMandate { vct: raw.vct, constraints, cnf: raw.cnf, iat: raw.iat, exp: raw.exp })
    }
}

impl OpenPaymentMandate {
    /// Reads an open Payment Mandate from its (disclosure-resolved) JSON text. `payment.budget`'s
    /// `max` keeps its decimal text, so this must be given the text, not a parsed `Value`.
    pub fn from_json(json: &str) -> Result<OpenPaymentMandate, Ap2Error> {
        check_vct(VCT_PAYMENT_OPEN, &vct_of(json)?)?;
        let raw: RawOpenPayment = serde_json::from_str(json).map_err(|e| invalid("open payment mandate", e))?;
        let mut constraints = Vec::with_capacity(raw.constraints.len());
        for constraint in &raw.constraints {
            let head: ConstraintHead = parse_body(constraint, "constraint")?;
            constraints.push(match head.constraint_type.as_str() {
                "payment.agent_recurrence" => {
                    let body: RecurrenceBody = parse_body(constraint, "payment.agent_recurrence")?;
                    PaymentConstraint::AgentRecurrence {
                        frequency: body.frequency,
                        max_occurrences: body.max_occurrences,
                    }
                }
                "payment.allowed_payees" => PaymentConstraint::AllowedPayees {
                    allowed: parse_body::<AllowedList<Merchant>>(constraint, "payment.allowed_payees")?.allowed,
                },
                "payment.allowed_payment_instruments" => PaymentConstraint::AllowedPaymentInstruments {
                    allowed: parse_body::<AllowedList<PaymentInstrument>>(
                        constraint,
                        "payment.allowed_payment_instruments",
                    )?
                    .allowed,
                },
                "payment.allowed_pisps" => PaymentConstraint::AllowedPisps {
                    allowed: parse_body::<AllowedList<Pisp>>(constraint, "payment.allowed_pisps")?.allowed,
                },
                "payment.amount_range" => {
                    let body: AmountRangeBody = parse_body(constraint, "payment.amount_range")?;
                    PaymentConstraint::AmountRange { currency: body.currency, max: body.max, min: body.min }
                }
                "payment.budget" => {
                    let body: BudgetBody = parse_body(constraint, "payment.budget")?;
                    PaymentConstraint::Budget { max: body.max, currency: body.currency }
                }
                "payment.execution_date" => {
                    let body: ExecutionDateBody = parse_body(constraint, "payment.execution_date")?;
                    PaymentConstraint::ExecutionDate { not_before: body.not_before, not_after: body.not_after }
                }
                "payment.reference" => PaymentConstraint::Reference {
                    conditional_transaction_id: parse_body::<ReferenceBody>(constraint, "payment.reference")?
                        .conditional_transaction_id,
                },
                other => return Err(Ap2Error::UnknownConstraint(other.to_owned())),
            });
        }
        if !constraints.iter().any(|c| matches!(c, PaymentConstraint::Reference { .. })) {
            return Err(Ap2Error::InvalidMandate("an open payment mandate must contain payment.reference".into()));
        }
        Ok(OpenPaymentMandate {
            vct: raw.vct,
            constraints,
            cnf: raw.cnf,
            payee: raw.payee,
            payment_amount: raw.payment_amount,
            payment_instrument: raw.payment_instrument,
            pisp: raw.pisp,
            execution_date: raw.execution_date,
            risk_data: raw.risk_data,
            iat: raw.iat,
            exp: raw.exp,
        })
    }
}

impl CheckoutMandate {
    /// Reads a closed Checkout Mandate content, checking its `vct`.
    pub fn from_json(json: &str) -> Result<CheckoutMandate, Ap2Error> {
        check_vct(VCT_CHECKOUT, &vct_of(json)?)?;
        serde_json::from_str(json).map_err(|e| invalid("checkout mandate", e))
    }
}

impl PaymentMandate {
    /// Reads a closed Payment Mandate content, checking its `vct`.
    pub fn from_json(json: &str) -> Result<PaymentMandate, Ap2Error> {
        check_vct(VCT_PAYMENT, &vct_of(json)?)?;
        serde_json::from_str(json).map_err(|e| invalid("payment mandate", e))
    }
}

/// `checkout_receipt.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutReceipt {
    pub status: ReceiptStatus,
    pub iss: String,
    pub iat: i64,
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// `payment_receipt.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentReceipt {
    pub status: ReceiptStatus,
    pub iss: String,
    pub iat: i64,
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    pub payment_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psp_confirmation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_confirmation_id: Option<String>,
}

// ---- UCP Checkout (ucp/types/*.json) ----

/// `ucp/types/checkout.json` `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckoutStatus {
    Incomplete,
    RequiresEscalation,
    ReadyForComplete,
    CompleteInProgress,
    Completed,
    Canceled,
}

impl CheckoutStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutStatus::Incomplete => "incomplete",
            CheckoutStatus::RequiresEscalation => "requires_escalation",
            CheckoutStatus::ReadyForComplete => "ready_for_complete",
            CheckoutStatus::CompleteInProgress => "complete_in_progress",
            CheckoutStatus::Completed => "completed",
            CheckoutStatus::Canceled => "canceled",
        }
    }
}

/// `ucp/types/total.json`: a signed amount in minor units with a category.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    #[serde(rename = "type")]
    pub total_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_text: Option<String>,
    pub amount: i64,
}

/// `ap2/types/item.json` (UCP item): product details of a line item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub title: String,
    pub price: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

/// `ucp/types/line_item.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub id: String,
    pub item: Item,
    pub quantity: u64,
    pub totals: Vec<Total>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// `ucp/types/link.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    #[serde(rename = "type")]
    pub link_type: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// `ucp/types/buyer.json` (additional members allowed and kept).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buyer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `content_type` of UCP messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    Plain,
    Markdown,
}

/// `severity` of a UCP error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Recoverable,
    RequiresBuyerInput,
    RequiresBuyerReview,
    Unrecoverable,
}

/// `ucp/types/message.json`: one of error, warning, info, told apart by `type`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Error {
        code: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<ContentType>,
        content: String,
        severity: Severity,
    },
    Warning {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        code: String,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<ContentType>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        presentation: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    Info {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<ContentType>,
        content: String,
    },
}

/// `ucp/types/checkout.json`: the payload of the merchant-signed `checkout_jwt`.
///
/// Additional members (UCP extensions, JWT claims such as `iat`/`exp`/`iss`) are kept in `other`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant: Option<Merchant>,
    pub line_items: Vec<LineItem>,
    pub status: CheckoutStatus,
    pub currency: String,
    pub totals: Vec<Total>,
    pub links: Vec<Link>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buyer: Option<Buyer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_url: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap2_open_payment_mandate_refuses_unknown_constraints_and_wrong_vct() {
        let cnf = r#"{"jwk":{"kty":"EC","crv":"P-256","x":"QpSyxPQHy38xckypDr54gZ3T42zj9iLtV4koyb5U27c","y":"37HLd7JJinxjJIn8J7HijssoeclbfhdW-gUL7feI9lw"}}"#;
        let unknown = format!(
            r#"{{"vct":"mandate.payment.open.1","cnf":{cnf},"constraints":[{{"type":"payment.reference","conditional_transaction_id":"x"}},{{"type":"payment.teleport"}}]}}"#
        );
        assert_eq!(OpenPaymentMandate::from_json(&unknown).map_err(|e| e.code()).err(), Some("ap2_unknown_constraint"));

        let wrong_version = format!(r#"{{"vct":"mandate.payment.open.2","cnf":{cnf},"constraints":[]}}"#);
        assert_eq!(
            OpenPaymentMandate::from_json(&wrong_version).map_err(|e| e.code()).err(),
            Some("ap2_wrong_mandate_type")
        );

        let no_reference = format!(r#"{{"vct":"mandate.payment.open.1","cnf":{cnf},"constraints":[]}}"#);
        assert_eq!(
            OpenPaymentMandate::from_json(&no_reference).map_err(|e| e.code()).err(),
            Some("ap2_invalid_mandate")
        );
    }

    #[test]
    fn ap2_budget_keeps_its_decimal_text() {
        let cnf = r#"{"jwk":{"kty":"EC","crv":"P-256","x":"QpSyxPQHy38xckypDr54gZ3T42zj9iLtV4koyb5U27c","y":"37HLd7JJinxjJIn8J7HijssoeclbfhdW-gUL7feI9lw"}}"#;
        let json = format!(
            r#"{{"vct":"mandate.payment.open.1","cnf":{cnf},"constraints":[{{"type":"payment.reference","conditional_transaction_id":"x"}},{{"type":"payment.budget","max":1000.10,"currency":"USD"}}]}}"#
        );
        let mandate = OpenPaymentMandate::from_json(&json).expect("valid mandate");
        let budget = mandate.constraints.iter().find_map(|c| match c {
            PaymentConstraint::Budget { max, .. } => Some(max.as_str().to_owned()),
            _ => None,
        });
        assert_eq!(budget.as_deref(), Some("1000.10"));
        // Serialized back, the number is written as it was read.
        let text = serde_json::to_string(&mandate).expect("serializes");
        assert!(text.contains(r#""max":1000.10"#), "{text}");
    }

    #[test]
    fn ap2_integer_fields_refuse_floats() {
        let json = r#"{"amount":12.0,"currency":"USD"}"#;
        assert!(serde_json::from_str::<Amount>(json).is_err());
        let json = r#"{"id":"i","title":"t","price":-1}"#;
        assert!(serde_json::from_str::<Item>(json).is_err());
    }

    #[test]
    fn ap2_jwk_refuses_private_members() {
        let private = r#"{"kty":"EC","crv":"P-256","x":"QpSyxPQHy38xckypDr54gZ3T42zj9iLtV4koyb5U27c","y":"37HLd7JJinxjJIn8J7HijssoeclbfhdW-gUL7feI9lw","d":"AAAA"}"#;
        assert_eq!(Jwk::from_json(private).map_err(|e| e.code()).err(), Some("ap2_invalid_key"));
    }
}
