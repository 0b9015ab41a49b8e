//! The checks the daemon runs on a checkout session before and after paying.

use std::collections::BTreeMap;

use crate::intent::{PaymentIntent, Protocol};
use crate::money::Micros;

use super::currency::{normalize_currency, CurrencyPolicy};
use super::error::AcpError;
use super::types::{CheckoutSession, PaymentHandler, SessionStatus};
use super::TOKENIZED_CARD_HANDLER;

/// A session's amount to pay, as read: in the merchant's minor units (for the allowance and the
/// later comparison) and in micro-USD (for the ledger).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTotal {
    pub checkout_session_id: String,
    pub minor_units: u64,
    /// Lowercase ISO 4217.
    pub currency: String,
    pub amount: Micros,
}

/// The amount to pay: the session's single `totals[]` entry of type `total`, a positive integer
/// number of minor units, in a currency the policy converts.
pub fn session_total(session: &CheckoutSession, policy: &CurrencyPolicy) -> Result<SessionTotal, AcpError> {
    let (minor_units, currency) = total_minor_units(session)?;
    let amount = policy.to_micros(minor_units, &currency)?;
    Ok(SessionTotal { checkout_session_id: session.id.clone(), minor_units, currency, amount })
}

/// The raw total, without conversion: what [`verify_unchanged`] compares.
fn total_minor_units(session: &CheckoutSession) -> Result<(u64, String), AcpError> {
    let currency = normalize_currency(&session.currency)
        .ok_or_else(|| AcpError::CurrencyNotSupported(session.currency.clone()))?;
    let mut totals = session.totals.iter().filter(|total| total.kind == "total");
    let total =
        totals.next().ok_or_else(|| AcpError::BadTotal("the session has no totals[] entry of type total".into()))?;
    if totals.next().is_some() {
        // Two "total" lines leave the amount to pay ambiguous; paying either could be wrong.
        return Err(AcpError::BadTotal("the session has more than one totals[] entry of type total".into()));
    }
    let minor_units = total.amount.as_u64().ok_or_else(|| {
        AcpError::BadTotal(format!("total amount {} is not a non-negative integer of minor units", total.amount))
    })?;
    if minor_units == 0 {
        return Err(AcpError::BadTotal("total amount is zero".into()));
    }
    Ok((minor_units, currency))
}

/// The session must be `ready_for_payment`. A not-ready session's first error message (what the
/// buyer would have to fix) goes into the error.
pub fn require_ready(session: &CheckoutSession) -> Result<(), AcpError> {
    if session.status == SessionStatus::ReadyForPayment {
        return Ok(());
    }
    let reason = session.messages.iter().find(|message| message.kind == "error").map(|message| {
        let code = message.code.as_deref().unwrap_or("error");
        match &message.content {
            Some(content) => format!("{code}: {content}"),
            None => code.to_owned(),
        }
    });
    Err(AcpError::SessionNotReady { status: session.status.to_string(), reason })
}

/// The handler to pay through: a `dev.acp.tokenized.card` handler that requires
/// `delegate_payment`, served by `psp` (the PSP spendcap delegates the card to; a token from one
/// PSP is useless to a merchant that processes with another), with a `config.merchant_id` to bind
/// the token to. Among several, the merchant's `display_order` decides, then their order.
pub fn pick_delegate_handler<'s>(session: &'s CheckoutSession, psp: &str) -> Result<&'s PaymentHandler, AcpError> {
    let handlers = session.capabilities.payment.as_ref().map(|payment| payment.handlers.as_slice()).unwrap_or(&[]);
    handlers
        .iter()
        .filter(|handler| {
            handler.requires_delegate_payment
                && handler.name == TOKENIZED_CARD_HANDLER
                && handler.psp.eq_ignore_ascii_case(psp)
                && handler.merchant_id().is_some()
        })
        .min_by_key(|handler| handler.display_order.unwrap_or(i64::MAX))
        .ok_or_else(|| AcpError::NoDelegateHandler { psp: psp.to_owned() })
}

/// After completing: the completed session must be the one read, at the same total in the same
/// currency. The daemon held (and the token allows) the total it read; a merchant that completes
/// at another total is refused rather than trusted.
pub fn verify_unchanged(read: &SessionTotal, completed: &CheckoutSession) -> Result<(), AcpError> {
    if completed.id != read.checkout_session_id {
        return Err(AcpError::SessionMismatch {
            expected: read.checkout_session_id.clone(),
            got: completed.id.clone(),
        });
    }
    let (completed_minor, completed_currency) = total_minor_units(completed)?;
    if completed_minor != read.minor_units || completed_currency != read.currency {
        return Err(AcpError::TotalChanged {
            read_minor: read.minor_units,
            read_currency: read.currency.clone(),
            completed_minor,
            completed_currency,
        });
    }
    Ok(())
}

/// The order a completed session created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletedOrder<'a> {
    pub order_id: &'a str,
    /// Required by the schema, but an order that lacks it is still an order: the payment happened.
    pub permalink_url: Option<&'a str>,
}

/// The order, when the session is `completed` and carries one. `None` means no order was
/// confirmed; note that a `completed` session without an order (a merchant bug) or a
/// `complete_in_progress` one may still have been charged, so `None` alone is no reason to void.
pub fn completed_order(session: &CheckoutSession) -> Option<CompletedOrder<'_>> {
    if session.status != SessionStatus::Completed {
        return None;
    }
    let order = session.order.as_ref().filter(|order| !order.id.is_empty())?;
    Some(CompletedOrder { order_id: &order.id, permalink_url: order.permalink_url.as_deref() })
}

/// What the ledger holds for this session: its total in micro-USD, paid to `merchant_name`.
pub fn intent(
    session: &CheckoutSession,
    merchant_name: &str,
    policy: &CurrencyPolicy,
) -> Result<PaymentIntent, AcpError> {
    let total = session_total(session, policy)?;
    let details = BTreeMap::from([
        ("checkout_session_id".to_owned(), total.checkout_session_id),
        ("currency".to_owned(), total.currency),
        ("total_minor_units".to_owned(), total.minor_units.to_string()),
    ]);
    Ok(PaymentIntent { amount: total.amount, service: merchant_name.to_owned(), protocol: Protocol::Acp, details })
}
