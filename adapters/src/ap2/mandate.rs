//! Open mandates: the user-signed (or agent-provider-signed) open Checkout and Payment Mandates
//! of the human-not-present flow, verified and reduced to the plain constraints the daemon checks.

use serde_json::Value;

use super::error::Ap2Error;
use super::jose::{content_hash, TimeClaims};
use super::sd_jwt::{delegate_content, split_chain, verify_kb_sd_jwt, verify_sd_jwt, SdJwt};
use super::time::{parse_datetime, parse_period_end};
use super::types::{
    CheckoutConstraint, Frequency, Jwk, LineItemRequirement, Merchant, OpenCheckoutMandate, OpenPaymentMandate,
    PaymentConstraint, PaymentInstrument, Pisp,
};
use crate::money::Micros;

/// The only currency spendcap pays in.
pub const USD: &str = "USD";

/// A limit on one payment's amount, from `payment.amount_range` (both ends inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmountLimits {
    pub min: Micros,
    pub max: Micros,
}

/// A limit on the total paid under one open Payment Mandate, from `payment.budget`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub max: Micros,
    pub currency: String,
}

/// `payment.agent_recurrence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recurrence {
    pub frequency: Frequency,
    pub max_occurrences: Option<u64>,
}

/// `payment.execution_date`, as Unix seconds (a bare `not_after` date includes that whole day).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutionWindow {
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

/// Everything the open mandates allow, in spendcap's terms. `None` means "not constrained".
///
/// Several constraints of one type all apply: amount ranges and budgets keep their strictest
/// bound, allow-lists keep the entries every list allows, line-item constraints are each checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MandateConstraints {
    /// Stable id of the open Payment Mandate: base64url(SHA-256(the signed content of its issuer
    /// JWT, `header.payload`)), the same whichever disclosures are presented and whatever its
    /// signature bytes. Key the budget's running total by it.
    pub payment_mandate_id: String,
    /// Stable id of the open Checkout Mandate, made the same way.
    pub checkout_mandate_id: String,
    /// The earliest `exp` among both mandates and their issuer JWTs.
    pub expires_at: Option<i64>,
    /// The currency of every amount below (always [`USD`]: other currencies are refused).
    pub currency: &'static str,
    pub amount_range: Option<AmountLimits>,
    pub budget: Option<Budget>,
    pub allowed_payees: Option<Vec<Merchant>>,
    pub allowed_merchants: Option<Vec<Merchant>>,
    pub line_items: Vec<Vec<LineItemRequirement>>,
    pub allowed_payment_instruments: Option<Vec<PaymentInstrument>>,
    pub allowed_pisps: Option<Vec<Pisp>>,
    pub recurrence: Option<Recurrence>,
    pub execution_window: Option<ExecutionWindow>,
    /// Claims the open Payment Mandate pre-sets; the closed one must repeat them unchanged.
    pub preset_payee: Option<Merchant>,
    pub preset_amount: Option<Micros>,
    pub preset_payment_instrument: Option<PaymentInstrument>,
    pub preset_pisp: Option<Pisp>,
    pub preset_execution_date: Option<String>,
}

/// One verified open mandate: the SD-JWT as it will be presented and its resolved content.
#[derive(Clone, Debug)]
pub(crate) struct VerifiedOpen<T> {
    pub sd_jwt: SdJwt,
    pub mandate: T,
    /// The resolved content, for conformance records.
    pub content: Value,
    pub expires_at: Option<i64>,
}

/// The open Checkout and Payment Mandates, verified together, with the agent key they delegate to.
#[derive(Clone, Debug)]
pub struct OpenMandates {
    pub(crate) checkout: VerifiedOpen<OpenCheckoutMandate>,
    pub(crate) payment: VerifiedOpen<OpenPaymentMandate>,
    pub(crate) agent: Jwk,
    pub constraints: MandateConstraints,
}

impl OpenMandates {
    pub fn open_checkout_mandate(&self) -> &OpenCheckoutMandate {
        &self.checkout.mandate
    }

    pub fn open_payment_mandate(&self) -> &OpenPaymentMandate {
        &self.payment.mandate
    }

    /// `sd_hash` of the open Checkout Mandate as presented: what `payment.reference` names.
    pub fn open_checkout_hash(&self) -> String {
        self.checkout.sd_jwt.sd_hash()
    }

    /// Refuses when either mandate has expired at `now`.
    pub fn check_not_expired(&self, now: i64) -> Result<(), Ap2Error> {
        match self.constraints.expires_at {
            Some(expired_at) if now >= expired_at => Err(Ap2Error::Expired { expired_at, now }),
            _ => Ok(()),
        }
    }
}

/// Verifies a user-signed open Checkout Mandate and open Payment Mandate (each an SD-JWT
/// `<issuer JWT>~<disclosures>~`) and reduces them to [`MandateConstraints`].
///
/// Checks, in order, for each mandate: ES256 signature by one of `trusted_issuers` (the user's
/// credential issuer or the agent provider), issuer `exp`/`nbf`, disclosures, exactly one
/// disclosed `delegate_payload` element, the exact `vct`, the content's `exp`/`nbf`, every
/// constraint known (unknown ones fail), and `cnf.jwk` equal to `agent`. Then that the payment
/// mandate's `payment.reference` is the `sd_hash` of the checkout mandate as given, and that every
/// amount is in USD and convertible to micro-USD exactly.
///
/// The open mandates are later presented exactly as given here: `payment.reference` is a hash
/// over the open Checkout Mandate with the disclosures the user issued, so withholding any would
/// break it.
pub fn verify_open_mandates(
    open_checkout_mandate: &str,
    open_payment_mandate: &str,
    trusted_issuers: &[Jwk],
    agent: &Jwk,
    now: i64,
) -> Result<OpenMandates, Ap2Error> {
    let checkout = verify_open(open_checkout_mandate, trusted_issuers, now, OpenCheckoutMandate::from_json)?;
    if !checkout.mandate.cnf.jwk.same_key(agent) {
        return Err(Ap2Error::CnfMismatch);
    }
    let payment = verify_open(open_payment_mandate, trusted_issuers, now, OpenPaymentMandate::from_json)?;
    if !payment.mandate.cnf.jwk.same_key(agent) {
        return Err(Ap2Error::CnfMismatch);
    }
    let open_checkout_hash = checkout.sd_jwt.sd_hash();
    for constraint in &payment.mandate.constraints {
        if let PaymentConstraint::Reference { conditional_transaction_id } = constraint {
            if *conditional_transaction_id != open_checkout_hash {
                return Err(Ap2Error::ReferenceMismatch);
            }
        }
    }
    let constraints = constraints(&checkout, &payment)?;
    Ok(OpenMandates { checkout, payment, agent: agent.clone(), constraints })
}

fn verify_open<T>(
    text: &str,
    trusted: &[Jwk],
    now: i64,
    parse: fn(&str) -> Result<T, Ap2Error>,
) -> Result<VerifiedOpen<T>, Ap2Error> {
    let sd_jwt = SdJwt::parse(text.trim())?;
    let verified = verify_sd_jwt(&sd_jwt, trusted, now)?;
    let issuer_exp = TimeClaims::read(&verified.claims_json)?.exp;
    let content_json = delegate_content(&verified.claims_json)?;
    let mandate = parse(&content_json)?;
    let content_times = TimeClaims::read(&content_json)
        .map_err(|_| Ap2Error::InvalidMandate("iat and exp must be integer seconds".into()))?;
    content_times.check(now)?;
    let content: Value =
        serde_json::from_str(&content_json).map_err(|_| Ap2Error::InvalidMandate("content is not JSON".into()))?;
    let expires_at = earliest(issuer_exp, content_times.exp);
    Ok(VerifiedOpen { sd_jwt, mandate, content, expires_at })
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// USD minor units (cents) to micros, refusing negatives and other currencies.
pub(crate) fn usd_minor_to_micros(currency: &str, minor: i64) -> Result<Micros, Ap2Error> {
    if currency != USD {
        return Err(Ap2Error::CurrencyMismatch { expected: USD.into(), found: currency.to_owned() });
    }
    if minor < 0 {
        return Err(crate::money::AmountError::Negative.into());
    }
    let micros = (minor as u64).checked_mul(10_000).ok_or(crate::money::AmountError::TooLarge)?;
    Ok(Micros::new(micros)?)
}

/// Keeps the entries of `list` whose `key` every later list also has.
fn intersect<T: Clone, K: PartialEq>(current: Option<Vec<T>>, next: &[T], key: impl Fn(&T) -> K) -> Option<Vec<T>> {
    Some(match current {
        None => next.to_vec(),
        Some(list) => list.into_iter().filter(|item| next.iter().any(|other| key(other) == key(item))).collect(),
    })
}

fn constraints(
    checkout: &VerifiedOpen<OpenCheckoutMandate>,
    payment: &VerifiedOpen<OpenPaymentMandate>,
) -> Result<MandateConstraints, Ap2Error> {
    let mut out = MandateConstraints {
        payment_mandate_id: content_hash(payment.sd_jwt.jwt()),
        checkout_mandate_id: content_hash(checkout.sd_jwt.jwt()),
        expires_at: earliest(checkout.expires_at, payment.expires_at),
        currency: USD,
        amount_range: None,
        budget: None,
        allowed_payees: None,
        allowed_merchants: None,
        line_items: Vec::new(),
        allowed_payment_instruments: None,
        allowed_pisps: None,
        recurrence: None,
        execution_window: None,
        preset_payee: payment.mandate.payee.clone(),
        preset_amount: None,
        preset_payment_instrument: payment.mandate.payment_instrument.clone(),
        preset_pisp: payment.mandate.pisp.clone(),
        preset_execution_date: payment.mandate.execution_date.clone(),
    };
    if let Some(amount) = &payment.mandate.payment_amount {
        out.preset_amount = Some(usd_minor_to_micros(&amount.currency, amount.amount)?);
    }
    for constraint in &checkout.mandate.constraints {
        match constraint {
            CheckoutConstraint::AllowedMerchants { allowed } => {
                out.allowed_merchants = intersect(out.allowed_merchants.take(), allowed, |m| m.id.clone());
            }
            CheckoutConstraint::LineItems { items } => out.line_items.push(items.clone()),
        }
    }
    for constraint in &payment.mandate.constraints {
        match constraint {
            PaymentConstraint::AmountRange { currency, max, min } => {
                let max = usd_minor_to_micros(currency, *max)?;
                let min = usd_minor_to_micros(currency, min.unwrap_or(0))?;
                out.amount_range = Some(match out.amount_range {
                    None => AmountLimits { min, max },
                    Some(limits) => AmountLimits { min: limits.min.max(min), max: limits.max.min(max) },
                });
            }
            PaymentConstraint::Budget { max, currency } => {
                if currency != USD {
                    return Err(Ap2Error::CurrencyMismatch { expected: USD.into(), found: currency.clone() });
                }
                let max = max.to_usd_micros()?;
                if out.budget.as_ref().is_none_or(|budget| max < budget.max) {
                    out.budget = Some(Budget { max, currency: currency.clone() });
                }
            }
            PaymentConstraint::AllowedPayees { allowed } => {
                out.allowed_payees = intersect(out.allowed_payees.take(), allowed, |m| m.id.clone());
            }
            PaymentConstraint::AllowedPaymentInstruments { allowed } => {
                out.allowed_payment_instruments =
                    intersect(out.allowed_payment_instruments.take(), allowed, |i| i.id.clone());
            }
            PaymentConstraint::AllowedPisps { allowed } => {
                out.allowed_pisps = intersect(out.allowed_pisps.take(), allowed, Clone::clone);
            }
            PaymentConstraint::AgentRecurrence { frequency, max_occurrences } => {
                let stricter = match (out.recurrence.and_then(|r| r.max_occurrences), max_occurrences) {
                    (Some(a), Some(b)) => Some(a.min(*b)),
                    (a, b) => a.or(*b),
                };
                out.recurrence = Some(Recurrence { frequency: *frequency, max_occurrences: stricter });
            }
            PaymentConstraint::ExecutionDate { not_before, not_after } => {
                let parse = |text: &Option<String>, end: bool| -> Result<Option<i64>, Ap2Error> {
                    match text {
                        None => Ok(None),
                        Some(text) => {
                            let parsed = if end { parse_period_end(text) } else { parse_datetime(text) };
                            parsed.map(Some).ok_or_else(|| {
                                Ap2Error::InvalidMandate("payment.execution_date is not an ISO 8601 date".into())
                            })
                        }
                    }
                };
                let window =
                    ExecutionWindow { not_before: parse(not_before, false)?, not_after: parse(not_after, true)? };
                let previous = out.execution_window.unwrap_or_default();
                out.execution_window = Some(ExecutionWindow {
                    not_before: previous.not_before.max(window.not_before),
                    not_after: earliest(previous.not_after, window.not_after),
                });
            }
            // Checked against the open Checkout Mandate in `verify_open_mandates`.
            PaymentConstraint::Reference { .. } => {}
        }
    }
    Ok(out)
}

/// A presented mandate chain (`<open SD-JWT>~~<closed KB-SD-JWT>~...~`) after verification, as a
/// Merchant or Credential Provider would see it.
#[derive(Clone, Debug)]
pub struct VerifiedChain {
    /// The open mandate's resolved content.
    pub open_content_json: String,
    /// The closed mandate's resolved content.
    pub closed_content_json: String,
    pub open: SdJwt,
    pub closed: SdJwt,
}

/// Verifies a two-link mandate chain the way a verifier does: the open SD-JWT against
/// `trusted_issuers`, then the closed KB-SD-JWT against the open mandate's `cnf` key, its
/// `sd_hash`, `aud`, `nonce` and times. Constraint evaluation is the caller's.
pub fn verify_mandate_chain(
    chain: &str,
    trusted_issuers: &[Jwk],
    expected_aud: Option<&str>,
    expected_nonce: Option<&str>,
    now: i64,
) -> Result<VerifiedChain, Ap2Error> {
    let mut links = split_chain(chain)?.into_iter();
    let (Some(open), Some(closed), None) = (links.next(), links.next(), links.next()) else {
        return Err(Ap2Error::MalformedSdJwt("expected an open mandate and one closed mandate".into()));
    };
    let verified_open = verify_sd_jwt(&open, trusted_issuers, now)?;
    let open_content_json = delegate_content(&verified_open.claims_json)?;
    TimeClaims::read(&open_content_json)?.check(now)?;
    #[derive(serde::Deserialize)]
    struct WithCnf {
        cnf: super::types::Cnf,
    }
    let holder: WithCnf = serde_json::from_str(&open_content_json)
        .map_err(|_| Ap2Error::InvalidMandate("the open mandate has no cnf.jwk".into()))?;
    let binding = verify_kb_sd_jwt(&closed, &open, &holder.cnf.jwk, expected_aud, expected_nonce, now)?;
    Ok(VerifiedChain { open_content_json, closed_content_json: binding.content_json, open, closed })
}
