//! ACP 2026-04-17 wire types for the merchant's checkout API.
//!
//! Requests are what spendcap sends, so they are exact: only fields the schema allows, closed
//! enums where the schema has one. Responses are what merchants send, so they are lenient: fields
//! spendcap does not use are ignored, extensible enums keep unknown values, and only what the
//! payment depends on (id, status, currency, totals) is required. Amounts stay JSON numbers here;
//! [`super::session_total`] decides whether they are usable integer minor units.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Checkout session (response)
// ---------------------------------------------------------------------------------------------

/// A merchant's checkout session: the authoritative cart, as returned by every checkout endpoint.
#[derive(Clone, Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub status: SessionStatus,
    /// ISO 4217 settlement currency, lowercase by convention (`usd`).
    pub currency: String,
    pub totals: Vec<Total>,
    #[serde(default)]
    pub line_items: Vec<LineItem>,
    #[serde(default)]
    pub capabilities: SessionCapabilities,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub links: Vec<Link>,
    /// Present once the session is completed.
    #[serde(default)]
    pub order: Option<Order>,
    #[serde(default)]
    pub protocol: Option<ProtocolVersion>,
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// A checkout session's status. The schema's set is closed today, but a merchant on a newer
/// version may send another value; it is kept as [`SessionStatus::Other`] and is simply not ready.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum SessionStatus {
    Incomplete,
    NotReadyForPayment,
    RequiresEscalation,
    AuthenticationRequired,
    ReadyForPayment,
    PendingApproval,
    CompleteInProgress,
    Completed,
    Canceled,
    InProgress,
    Expired,
    Other(String),
}

impl SessionStatus {
    pub fn as_str(&self) -> &str {
        match self {
            SessionStatus::Incomplete => "incomplete",
            SessionStatus::NotReadyForPayment => "not_ready_for_payment",
            SessionStatus::RequiresEscalation => "requires_escalation",
            SessionStatus::AuthenticationRequired => "authentication_required",
            SessionStatus::ReadyForPayment => "ready_for_payment",
            SessionStatus::PendingApproval => "pending_approval",
            SessionStatus::CompleteInProgress => "complete_in_progress",
            SessionStatus::Completed => "completed",
            SessionStatus::Canceled => "canceled",
            SessionStatus::InProgress => "in_progress",
            SessionStatus::Expired => "expired",
            SessionStatus::Other(text) => text,
        }
    }
}

impl From<String> for SessionStatus {
    fn from(text: String) -> SessionStatus {
        match text.as_str() {
            "incomplete" => SessionStatus::Incomplete,
            "not_ready_for_payment" => SessionStatus::NotReadyForPayment,
            "requires_escalation" => SessionStatus::RequiresEscalation,
            "authentication_required" => SessionStatus::AuthenticationRequired,
            "ready_for_payment" => SessionStatus::ReadyForPayment,
            "pending_approval" => SessionStatus::PendingApproval,
            "complete_in_progress" => SessionStatus::CompleteInProgress,
            "completed" => SessionStatus::Completed,
            "canceled" => SessionStatus::Canceled,
            "in_progress" => SessionStatus::InProgress,
            "expired" => SessionStatus::Expired,
            _ => SessionStatus::Other(text),
        }
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a totals breakdown. `kind` is `total` for the amount to pay.
#[derive(Clone, Debug, Deserialize)]
pub struct Total {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub display_text: Option<String>,
    /// Integer minor units per the schema; kept as a number so a fractional or negative amount is
    /// reported as a bad total instead of an unreadable session.
    pub amount: serde_json::Number,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LineItem {
    pub id: String,
    #[serde(default)]
    pub item: Option<LineItemRef>,
    #[serde(default)]
    pub quantity: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub totals: Vec<Total>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LineItemRef {
    pub id: String,
}

/// The capabilities a merchant negotiated; spendcap reads only the payment handlers.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SessionCapabilities {
    #[serde(default)]
    pub payment: Option<PaymentCapability>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PaymentCapability {
    #[serde(default)]
    pub handlers: Vec<PaymentHandler>,
}

/// A merchant's payment handler instance (`capabilities.payment.handlers[]`).
#[derive(Clone, Debug, Deserialize)]
pub struct PaymentHandler {
    pub id: String,
    /// Handler specification in reverse-DNS form, e.g. `dev.acp.tokenized.card`.
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    /// The merchant's PSP, e.g. `stripe`.
    #[serde(default)]
    pub psp: String,
    #[serde(default)]
    pub requires_delegate_payment: bool,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub display_order: Option<i64>,
}

impl PaymentHandler {
    /// The merchant id at the PSP, from the handler's `config.merchant_id`: the delegated token's
    /// allowance names it, so the token is usable by this merchant only.
    pub fn merchant_id(&self) -> Option<&str> {
        self.config.get("merchant_id").and_then(serde_json::Value::as_str).filter(|id| !id.is_empty())
    }
}

/// An info, warning or error message for the buyer. `kind` is `info`, `warning` or `error`.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Link {
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
}

/// The order a completed checkout created.
#[derive(Clone, Debug, Deserialize)]
pub struct Order {
    pub id: String,
    #[serde(default)]
    pub checkout_session_id: Option<String>,
    #[serde(default)]
    pub permalink_url: Option<String>,
    #[serde(default)]
    pub order_number: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ProtocolVersion {
    pub version: String,
}

/// The flat error object ACP providers answer 4xx/5xx with.
#[derive(Clone, Debug, Deserialize)]
pub struct ErrorObject {
    #[serde(rename = "type")]
    pub error_type: String,
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Shared request parts
// ---------------------------------------------------------------------------------------------

/// A postal address (billing or fulfillment). The same shape in both ACP schemas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line_one: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_two: Option<String>,
    pub city: String,
    pub state: String,
    /// ISO 3166-1 alpha-2, e.g. `US`.
    pub country: String,
    pub postal_code: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buyer {
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfillmentDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
}

// ---------------------------------------------------------------------------------------------
// POST /checkout_sessions
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckoutSessionCreateRequest {
    /// At least one item.
    pub line_items: Vec<Item>,
    pub currency: String,
    pub capabilities: AgentCapabilities,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buyer: Option<Buyer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fulfillment_details: Option<FulfillmentDetails>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl CheckoutSessionCreateRequest {
    /// A request for `items` in `currency`, declaring that spendcap handles no interventions.
    pub fn new(items: Vec<Item>, currency: &str) -> CheckoutSessionCreateRequest {
        CheckoutSessionCreateRequest {
            line_items: items,
            currency: currency.to_ascii_lowercase(),
            capabilities: AgentCapabilities::default(),
            buyer: None,
            fulfillment_details: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// An item to buy, by the merchant's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Item {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Item {
    pub fn new(id: impl Into<String>) -> Item {
        Item { id: id.into(), name: None }
    }
}

/// What the agent side can do. spendcap is a daemon: it cannot present 3DS challenges or other
/// interventions, and says so, so a merchant that requires one answers with a message up front
/// instead of failing at completion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentCapabilities {
    pub interventions: InterventionSupport,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterventionSupport {
    pub supported: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// POST /checkout_sessions/{id}/complete
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckoutSessionCompleteRequest {
    pub payment_data: PaymentData,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buyer: Option<Buyer>,
}

impl CheckoutSessionCompleteRequest {
    /// Pays with a delegated payment token through the handler it was issued for.
    pub fn with_delegated_token(
        handler_id: &str,
        token: DelegatedToken,
        billing_address: Option<Address>,
    ) -> CheckoutSessionCompleteRequest {
        CheckoutSessionCompleteRequest {
            payment_data: PaymentData {
                handler_id: handler_id.to_owned(),
                instrument: Instrument {
                    kind: InstrumentType::Card,
                    credential: Credential { kind: CredentialType::Spt, token },
                },
                billing_address,
            },
            buyer: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PaymentData {
    pub handler_id: String,
    pub instrument: Instrument,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billing_address: Option<Address>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instrument {
    #[serde(rename = "type")]
    pub kind: InstrumentType,
    pub credential: Credential,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstrumentType {
    Card,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Credential {
    #[serde(rename = "type")]
    pub kind: CredentialType,
    pub token: DelegatedToken,
}

/// The credential kinds spendcap sends: a shared payment token from `delegate_payment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialType {
    Spt,
}

/// A delegated payment token (`vt_...`). It is a credential: whoever holds it can charge the card
/// up to its allowance, so its `Debug` shows only that it exists.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DelegatedToken(String);

impl DelegatedToken {
    pub fn new(token: impl Into<String>) -> DelegatedToken {
        DelegatedToken(token.into())
    }

    /// The token itself, for the one place it belongs: the complete request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DelegatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DelegatedToken(<redacted>)")
    }
}

// ---------------------------------------------------------------------------------------------
// POST /checkout_sessions/{id}/cancel
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CancelSessionRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_trace: Option<IntentTrace>,
}

impl CancelSessionRequest {
    /// A cancellation that says why. The summary is cut to the schema's 500 characters.
    pub fn with_reason(reason_code: CancelReason, summary: Option<&str>) -> CancelSessionRequest {
        let trace_summary = summary.map(|text| text.chars().take(IntentTrace::MAX_SUMMARY_CHARS).collect());
        CancelSessionRequest { intent_trace: Some(IntentTrace { reason_code, trace_summary }) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IntentTrace {
    pub reason_code: CancelReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_summary: Option<String>,
}

impl IntentTrace {
    pub const MAX_SUMMARY_CHARS: usize = 500;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    PriceSensitivity,
    ShippingCost,
    ShippingSpeed,
    ProductFit,
    TrustSecurity,
    ReturnsPolicy,
    PaymentOptions,
    Comparison,
    TimingDeferred,
    /// What spendcap sends when it refuses a payment (cap, revocation, a changed total).
    Other,
}
