//! Paying a merchant's checkout under open mandates: verify the merchant-signed `checkout_jwt`,
//! check it against the mandates' constraints ([`authorize_payment`], which yields the
//! [`PaymentIntent`] to hold), and — only after the ledger holds the amount — sign the closed
//! Checkout and Payment Mandates with the agent's key ([`close_mandates`]).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::error::Ap2Error;
use super::jose::{checkout_hash, verify_jws, TimeClaims};
use super::key::AgentKey;
use super::mandate::{usd_minor_to_micros, OpenMandates, USD};
use super::sd_jwt::{issue_kb_sd_jwt, join_chain, KeyBinding, SdJwt};
use super::time::parse_datetime;
use super::types::{
    Amount, Checkout, CheckoutMandate, CheckoutStatus, Frequency, Jwk, LineItemRequirement, Merchant,
    PaymentInstrument, PaymentMandate, Pisp, VCT_CHECKOUT, VCT_PAYMENT,
};
use crate::intent::{PaymentIntent, Protocol};
use crate::money::Micros;

/// A merchant checkout whose signature, expiry, currency and total were checked.
#[derive(Clone, Debug)]
pub struct VerifiedCheckout {
    /// The merchant-signed JWT, exactly as received (its hash binds the mandates).
    pub checkout_jwt: String,
    /// base64url(SHA-256(`checkout_jwt`)).
    pub checkout_hash: String,
    pub checkout: Checkout,
    pub merchant: Merchant,
    /// The checkout's `total`, in micro-USD.
    pub total: Micros,
    /// The same total in the checkout's minor units (US cents), as the Payment Mandate states it.
    pub total_minor: i64,
    /// The earliest of the JWT's `exp` and the checkout's `expires_at`.
    pub expires_at: Option<i64>,
}

impl VerifiedCheckout {
    fn check_not_expired(&self, now: i64) -> Result<(), Ap2Error> {
        match self.expires_at {
            Some(expired_at) if now >= expired_at => Err(Ap2Error::Expired { expired_at, now }),
            _ => Ok(()),
        }
    }
}

/// Verifies a merchant-signed `checkout_jwt` (payload: a UCP Checkout) at `now`.
///
/// Refuses: a signature no merchant key verifies, `alg` other than ES256, a JWT `exp` or checkout
/// `expires_at` at or before `now`, a payload that is not a UCP Checkout, a completed or canceled
/// checkout, a currency other than USD, a checkout without `merchant` (AP2 binds the payee to it),
/// and anything but exactly one `total` entry with a positive amount.
///
/// Every configured merchant key is trusted for every merchant id; configure per-merchant key
/// sets if merchants must not vouch for each other.
pub fn verify_checkout_jwt(checkout_jwt: &str, merchant_keys: &[Jwk], now: i64) -> Result<VerifiedCheckout, Ap2Error> {
    let checkout_jwt = checkout_jwt.trim();
    let jws = verify_jws(checkout_jwt, merchant_keys)?;
    let times = TimeClaims::read(&jws.payload_json)?;
    times.check(now)?;
    let checkout: Checkout = serde_json::from_str(&jws.payload_json)
        .map_err(|e| Ap2Error::InvalidCheckout(format!("not a UCP checkout: {e}")))?;
    let expires_at = match &checkout.expires_at {
        Some(text) => Some(
            parse_datetime(text)
                .ok_or_else(|| Ap2Error::InvalidCheckout("expires_at is not an RFC 3339 date-time".into()))?,
        ),
        None => None,
    };
    if let Some(expired_at) = expires_at {
        if now >= expired_at {
            return Err(Ap2Error::Expired { expired_at, now });
        }
    }
    if matches!(checkout.status, CheckoutStatus::Completed | CheckoutStatus::Canceled) {
        return Err(Ap2Error::CheckoutNotPayable(checkout.status.as_str().to_owned()));
    }
    if checkout.currency != USD {
        return Err(Ap2Error::CurrencyMismatch { expected: USD.into(), found: checkout.currency.clone() });
    }
    let merchant = checkout
        .merchant
        .clone()
        .filter(|m| !m.id.is_empty())
        .ok_or_else(|| Ap2Error::InvalidCheckout("the checkout names no merchant id".into()))?;
    let mut totals = checkout.totals.iter().filter(|t| t.total_type == "total");
    let (Some(total), None) = (totals.next(), totals.next()) else {
        return Err(Ap2Error::InvalidCheckout("the checkout must have exactly one total".into()));
    };
    if checkout.line_items.iter().any(|line| line.quantity == 0) {
        return Err(Ap2Error::InvalidCheckout("a line item has quantity zero".into()));
    }
    let total_micros = Micros::positive(usd_minor_to_micros(&checkout.currency, total.amount)?.get())?;
    Ok(VerifiedCheckout {
        checkout_hash: checkout_hash(checkout_jwt),
        checkout_jwt: checkout_jwt.to_owned(),
        total_minor: total.amount,
        checkout,
        merchant,
        total: total_micros,
        expires_at: match (times.exp, expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    })
}

/// What was already paid under an open Payment Mandate, from the daemon's records: budgets and
/// recurrence limits span payments, so the adapter needs them to check one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MandateUsage {
    /// Total settled (or held) under this mandate so far.
    pub spent: Micros,
    /// Closed mandates issued under it so far.
    pub uses: u64,
    /// When the last one was issued (Unix seconds).
    pub last_used_at: Option<i64>,
}

/// The daemon's choices for the closed Payment Mandate where the open one leaves room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PaymentChoice {
    /// The owner's payment instrument at the Credential Provider. May be omitted when the open
    /// mandate pre-sets one or allows exactly one.
    pub payment_instrument: Option<PaymentInstrument>,
    pub pisp: Option<Pisp>,
}

/// A checkout found to satisfy every constraint of the open mandates. Only [`authorize_payment`]
/// makes one, so [`close_mandates`] cannot sign anything unchecked.
#[derive(Clone, Debug)]
pub struct AuthorizedPayment {
    open: OpenMandates,
    checkout: VerifiedCheckout,
    payment_instrument: PaymentInstrument,
    pisp: Option<Pisp>,
    intent: PaymentIntent,
}

impl AuthorizedPayment {
    /// What to ask the ledger to hold before calling [`close_mandates`].
    pub fn intent(&self) -> &PaymentIntent {
        &self.intent
    }

    pub fn checkout(&self) -> &VerifiedCheckout {
        &self.checkout
    }

    pub fn open_mandates(&self) -> &OpenMandates {
        &self.open
    }
}

/// Checks a verified checkout against the open mandates at `now`; on success returns the
/// authorization, whose [`PaymentIntent`] the daemon holds before closing the mandates.
///
/// Checks: neither mandate nor the checkout expired; payee in `payment.allowed_payees` and equal
/// to a pre-set `payee` (by non-empty merchant id); merchant in `checkout.allowed_merchants`;
/// total within `payment.amount_range`, equal to a pre-set `payment_amount`, and within
/// `payment.budget` together with `usage.spent`; line items satisfying every
/// `checkout.line_items` (the spec's max-flow rule); the payment instrument and PISP allowed;
/// `payment.agent_recurrence` and `payment.execution_date` at `now`.
pub fn authorize_payment(
    open: &OpenMandates,
    checkout: &VerifiedCheckout,
    choice: &PaymentChoice,
    usage: &MandateUsage,
    now: i64,
) -> Result<AuthorizedPayment, Ap2Error> {
    open.check_not_expired(now)?;
    checkout.check_not_expired(now)?;
    let rules = &open.constraints;
    let merchant = &checkout.merchant;

    if let Some(allowed) = &rules.allowed_payees {
        if !allowed.iter().any(|m| merchant_matches(m, merchant)) {
            return Err(Ap2Error::PayeeNotAllowed(merchant.id.clone()));
        }
    }
    if rules.preset_payee.as_ref().is_some_and(|preset| !merchant_matches(preset, merchant)) {
        return Err(Ap2Error::PayeeNotAllowed(merchant.id.clone()));
    }
    if let Some(allowed) = &rules.allowed_merchants {
        if !allowed.iter().any(|m| merchant_matches(m, merchant)) {
            return Err(Ap2Error::MerchantNotAllowed(merchant.id.clone()));
        }
    }

    let amount = checkout.total;
    if let Some(limits) = rules.amount_range {
        if amount < limits.min || amount > limits.max {
            return Err(Ap2Error::AmountOutOfRange {
                amount: amount.get(),
                min: limits.min.get(),
                max: limits.max.get(),
            });
        }
    }
    if let Some(preset) = rules.preset_amount {
        if preset != amount {
            return Err(Ap2Error::AmountMismatch { amount: amount.get(), preset: preset.get() });
        }
    }
    if let Some(budget) = &rules.budget {
        if usage.spent.checked_add(amount).is_none_or(|total| total > budget.max) {
            return Err(Ap2Error::BudgetExceeded {
                amount: amount.get(),
                spent: usage.spent.get(),
                max: budget.max.get(),
            });
        }
    }

    for requirements in &rules.line_items {
        check_line_items(requirements, &checkout.checkout)?;
    }

    let payment_instrument = choose_instrument(open, choice)?;
    let pisp = choose_pisp(open, choice)?;

    if let Some(recurrence) = rules.recurrence {
        if recurrence.max_occurrences.is_some_and(|max| usage.uses >= max) {
            return Err(Ap2Error::RecurrenceExceeded(format!("{} payments already made", usage.uses)));
        }
        if let (Some(last), Some(gap)) = (usage.last_used_at, min_separation(recurrence.frequency)) {
            if now.saturating_sub(last) < gap {
                return Err(Ap2Error::RecurrenceExceeded("too soon after the previous payment".into()));
            }
        }
    }
    if let Some(window) = rules.execution_window {
        if window.not_before.is_some_and(|t| now < t) || window.not_after.is_some_and(|t| now > t) {
            return Err(Ap2Error::OutsideExecutionWindow { now });
        }
    }

    let mut details = BTreeMap::new();
    details.insert("ap2_version".to_owned(), "0.2".to_owned());
    details.insert("merchant_id".to_owned(), merchant.id.clone());
    details.insert("checkout_id".to_owned(), checkout.checkout.id.clone());
    details.insert("checkout_hash".to_owned(), checkout.checkout_hash.clone());
    details.insert("payment_mandate_id".to_owned(), rules.payment_mandate_id.clone());
    details.insert("checkout_mandate_id".to_owned(), rules.checkout_mandate_id.clone());
    details.insert("payment_instrument_id".to_owned(), payment_instrument.id.clone());
    let intent = PaymentIntent { amount, service: service_name(merchant), protocol: Protocol::Ap2, details };
    Ok(AuthorizedPayment { open: open.clone(), checkout: checkout.clone(), payment_instrument, pisp, intent })
}

/// Merchants and payees are the same actor only by a non-empty, equal `id`; names and websites
/// are display text anyone can copy.
fn merchant_matches(allowed: &Merchant, candidate: &Merchant) -> bool {
    !allowed.id.is_empty() && allowed.id == candidate.id
}

/// The payee as people name it: the merchant website's host, else its id.
fn service_name(merchant: &Merchant) -> String {
    merchant
        .website
        .as_deref()
        .and_then(|site| reqwest::Url::parse(site).ok())
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_else(|| merchant.id.clone())
}

fn choose_instrument(open: &OpenMandates, choice: &PaymentChoice) -> Result<PaymentInstrument, Ap2Error> {
    let rules = &open.constraints;
    let chosen = match (&rules.preset_payment_instrument, &choice.payment_instrument) {
        (Some(preset), Some(chosen)) if preset != chosen => {
            return Err(Ap2Error::InstrumentNotAllowed("the mandate pre-sets another instrument".into()))
        }
        (Some(preset), _) => preset.clone(),
        (None, Some(chosen)) => chosen.clone(),
        (None, None) => match rules.allowed_payment_instruments.as_deref() {
            Some([only]) => only.clone(),
            _ => return Err(Ap2Error::InstrumentNotAllowed("no payment instrument was chosen".into())),
        },
    };
    if let Some(allowed) = &rules.allowed_payment_instruments {
        if !allowed.iter().any(|a| !a.id.is_empty() && a.id == chosen.id) {
            return Err(Ap2Error::InstrumentNotAllowed(format!("instrument {:?} is not allowed", chosen.id)));
        }
    }
    Ok(chosen)
}

fn choose_pisp(open: &OpenMandates, choice: &PaymentChoice) -> Result<Option<Pisp>, Ap2Error> {
    let rules = &open.constraints;
    if let (Some(preset), Some(chosen)) = (&rules.preset_pisp, &choice.pisp) {
        if preset != chosen {
            return Err(Ap2Error::PispNotAllowed("the mandate pre-sets another PISP".into()));
        }
    }
    let pisp = choice.pisp.clone().or_else(|| rules.preset_pisp.clone());
    if let Some(allowed) = &rules.allowed_pisps {
        match &pisp {
            Some(pisp) if allowed.contains(pisp) => {}
            Some(_) => return Err(Ap2Error::PispNotAllowed("the PISP is not in payment.allowed_pisps".into())),
            None => return Err(Ap2Error::PispNotAllowed("payment.allowed_pisps needs a PISP".into())),
        }
    }
    Ok(pisp)
}

/// The least time between two payments under `payment.agent_recurrence`. Calendar periods are
/// taken at their shortest (a month as 28 days), so a payment is never refused for being early
/// when the calendar would allow it, and never allowed twice within one true period of that length.
fn min_separation(frequency: Frequency) -> Option<i64> {
    const DAY: i64 = 86_400;
    match frequency {
        Frequency::OnDemand => None,
        Frequency::Daily => Some(DAY),
        Frequency::Weekly => Some(7 * DAY),
        Frequency::Biweekly => Some(14 * DAY),
        Frequency::Monthly => Some(28 * DAY),
        Frequency::Quarterly => Some(89 * DAY),
        Frequency::Annually => Some(365 * DAY),
    }
}

/// Largest line-item matching problem accepted (requirements plus distinct checkout item ids).
/// Real mandates list a handful; the bound keeps the max-flow search cheap on hostile input.
const MAX_LINE_ITEM_NODES: usize = 64;

/// `checkout.line_items` evaluation (checkout_mandate.md): each requirement takes `quantity`
/// items among its acceptable ids, no checkout item counts twice, and every checkout item is
/// taken. Decided by maximum flow: source → requirement (capacity `quantity`) → acceptable item
/// id (unbounded) → sink (capacity: that id's total quantity in the checkout); satisfied when the
/// flow equals both the requirements' and the checkout's total quantity.
fn check_line_items(requirements: &[LineItemRequirement], checkout: &Checkout) -> Result<(), Ap2Error> {
    let mut item_quantities: Vec<(String, u128)> = Vec::new();
    let mut item_index: HashMap<&str, usize> = HashMap::new();
    for line in &checkout.line_items {
        let index = *item_index.entry(line.item.id.as_str()).or_insert_with(|| {
            item_quantities.push((line.item.id.clone(), 0));
            item_quantities.len() - 1
        });
        item_quantities[index].1 += u128::from(line.quantity);
    }
    if requirements.len() + item_quantities.len() > MAX_LINE_ITEM_NODES {
        return Err(Ap2Error::LineItemsNotAllowed("too many line items to evaluate".into()));
    }
    let required: u128 = requirements.iter().map(|r| u128::from(r.quantity)).sum();
    let present: u128 = item_quantities.iter().map(|(_, q)| q).sum();
    if required != present {
        return Err(Ap2Error::LineItemsNotAllowed(format!(
            "the mandate asks for {required} items, the checkout has {present}"
        )));
    }
    // Nodes: 0 source, 1 sink, 2.. requirements, then checkout item ids.
    let (source, sink, first_item) = (0, 1, 2 + requirements.len());
    let nodes = first_item + item_quantities.len();
    let mut capacity = vec![vec![0u128; nodes]; nodes];
    for (r, requirement) in requirements.iter().enumerate() {
        capacity[source][2 + r] = u128::from(requirement.quantity);
        for acceptable in &requirement.acceptable_items {
            if let Some(&i) = item_index.get(acceptable.id.as_str()) {
                capacity[2 + r][first_item + i] = u128::MAX;
            }
        }
    }
    for (i, (_, quantity)) in item_quantities.iter().enumerate() {
        capacity[first_item + i][sink] = *quantity;
    }
    if max_flow(&mut capacity, source, sink) != required {
        return Err(Ap2Error::LineItemsNotAllowed(
            "the checkout's items do not match the mandate's requirements".into(),
        ));
    }
    Ok(())
}

/// Edmonds–Karp maximum flow on a residual capacity matrix (consumed).
fn max_flow(capacity: &mut [Vec<u128>], source: usize, sink: usize) -> u128 {
    let nodes = capacity.len();
    let mut flow: u128 = 0;
    loop {
        let mut parent = vec![usize::MAX; nodes];
        parent[source] = source;
        let mut queue = std::collections::VecDeque::from([source]);
        while let Some(node) = queue.pop_front() {
            for next in 0..nodes {
                if parent[next] == usize::MAX && capacity[node][next] > 0 {
                    parent[next] = node;
                    queue.push_back(next);
                }
            }
        }
        if parent[sink] == usize::MAX {
            return flow;
        }
        let mut bottleneck = u128::MAX;
        let mut node = sink;
        while node != source {
            bottleneck = bottleneck.min(capacity[parent[node]][node]);
            node = parent[node];
        }
        let mut node = sink;
        while node != source {
            let previous = parent[node];
            capacity[previous][node] -= bottleneck;
            capacity[node][previous] = capacity[node][previous].saturating_add(bottleneck);
            node = previous;
        }
        flow = flow.saturating_add(bottleneck);
    }
}

/// How a verifier's receipt may name a closed mandate: the AP2 reference SDK hashes the closed
/// mandate's JWT alone; the agent-authorization text says "calculated in the same manner as
/// sd_hash" (JWT, disclosures and `~`). Both are accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MandateReference {
    /// base64url(SHA-256(closed KB-SD-JWT's JWT)).
    pub jwt_hash: String,
    /// base64url(SHA-256(closed KB-SD-JWT with its disclosures)).
    pub sd_jwt_hash: String,
}

impl MandateReference {
    pub(crate) fn of(closed: &SdJwt) -> MandateReference {
        MandateReference { jwt_hash: closed.jwt_hash(), sd_jwt_hash: closed.sd_hash() }
    }

    pub fn matches(&self, reference: &str) -> bool {
        reference == self.jwt_hash || reference == self.sd_jwt_hash
    }
}

/// Audiences, nonces and lifetime of the closed mandates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseParams {
    /// `aud` of the closed Checkout Mandate: the merchant.
    pub checkout_audience: String,
    /// `nonce` of the closed Checkout Mandate: the merchant's challenge, or a fresh random value.
    pub checkout_nonce: String,
    /// `aud` of the closed Payment Mandate: the Credential Provider.
    pub payment_audience: String,
    pub payment_nonce: String,
    /// Lifetime of the closed mandates, capped by the open mandates' and the checkout's expiry.
    pub ttl_secs: i64,
}

/// The signed closed mandates, ready to present, and what they say.
#[derive(Clone, Debug)]
pub struct ClosedMandates {
    /// The Checkout Mandate chain as presented to the merchant:
    /// `<open checkout SD-JWT>~~<closed checkout KB-SD-JWT>~<disclosures>~`.
    pub checkout_mandate_jwt: String,
    /// The Payment Mandate chain as presented to the Credential Provider.
    pub payment_mandate_jwt: String,
    /// The closed Checkout Mandate content (disclosures resolved).
    pub checkout_mandate: CheckoutMandate,
    /// The closed Payment Mandate content.
    pub payment_mandate: PaymentMandate,
    /// Resolved contents of the open mandates, as presented (for conformance records).
    pub open_checkout_mandate: Value,
    pub open_payment_mandate: Value,
    /// What a Checkout Receipt's `reference` must name.
    pub checkout_reference: MandateReference,
    /// What a Payment Receipt's `reference` must name.
    pub payment_reference: MandateReference,
    /// base64url(SHA-256(checkout_jwt)) = `checkout_hash` = `transaction_id`.
    pub checkout_hash: String,
    /// `sd_hash` of the open Checkout Mandate (the `payment.reference` value).
    pub open_checkout_hash: String,
    pub checkout_id: String,
    pub amount: Micros,
    /// Stable id of the open Payment Mandate (for budget bookkeeping).
    pub payment_mandate_id: String,
}

/// Signs the closed Checkout and Payment Mandates with the agent's key. Call it only after the
/// ledger has held [`AuthorizedPayment::intent`].
///
/// Each closed mandate is a KB-SD-JWT (`typ: kb+sd-jwt`, ES256, signed by the key the open
/// mandates name in `cnf`) whose `sd_hash` is the hash of the open mandate as presented, with
/// `aud`, `nonce` and `iat` = `now`; its delegate content is the closed mandate
/// (`checkout_jwt` as a disclosed claim, `checkout_hash` = `transaction_id` =
/// base64url(SHA-256(checkout_jwt))). Expiry is re-checked at `now`.
pub fn close_mandates(
    agent_key: &AgentKey,
    authorized: &AuthorizedPayment,
    params: &CloseParams,
    now: i64,
) -> Result<ClosedMandates, Ap2Error> {
    let open = &authorized.open;
    let checkout = &authorized.checkout;
    if !agent_key.public_jwk().same_key(&open.agent) {
        return Err(Ap2Error::CnfMismatch);
    }
    open.check_not_expired(now)?;
    checkout.check_not_expired(now)?;
    if [&params.checkout_audience, &params.checkout_nonce, &params.payment_audience, &params.payment_nonce]
        .iter()
        .any(|value| value.is_empty())
        || params.ttl_secs <= 0
    {
        return Err(Ap2Error::InvalidConfig("closed mandates need audiences, nonces and a positive ttl".into()));
    }
    let exp = [Some(now.saturating_add(params.ttl_secs)), open.constraints.expires_at, checkout.expires_at]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);

    let checkout_mandate = CheckoutMandate {
        vct: VCT_CHECKOUT.to_owned(),
        checkout_jwt: checkout.checkout_jwt.clone(),
        checkout_hash: checkout.checkout_hash.clone(),
        iat: Some(now),
        exp: Some(exp),
    };
    let payment_mandate = PaymentMandate {
        vct: VCT_PAYMENT.to_owned(),
        transaction_id: checkout.checkout_hash.clone(),
        payee: checkout.merchant.clone(),
        pisp: authorized.pisp.clone(),
        payment_amount: Amount { amount: checkout.total_minor, currency: USD.to_owned() },
        payment_instrument: authorized.payment_instrument.clone(),
        execution_date: open.constraints.preset_execution_date.clone(),
        risk_data: None,
        iat: Some(now),
        exp: Some(exp),
    };
    let as_object = |value: Value| match value {
        Value::Object(map) => Ok(map),
        _ => Err(Ap2Error::SigningFailed),
    };
    let checkout_content = as_object(serde_json::to_value(&checkout_mandate).map_err(|_| Ap2Error::SigningFailed)?)?;
    let payment_content = as_object(serde_json::to_value(&payment_mandate).map_err(|_| Ap2Error::SigningFailed)?)?;

    let closed_checkout = issue_kb_sd_jwt(
        agent_key.signing_key(),
        &open.checkout.sd_jwt,
        &checkout_content,
        &["checkout_jwt"],
        &KeyBinding { aud: &params.checkout_audience, nonce: &params.checkout_nonce, iat: now },
    )?;
    let closed_payment = issue_kb_sd_jwt(
        agent_key.signing_key(),
        &open.payment.sd_jwt,
        &payment_content,
        &[],
        &KeyBinding { aud: &params.payment_audience, nonce: &params.payment_nonce, iat: now },
    )?;
    Ok(ClosedMandates {
        checkout_mandate_jwt: join_chain(&[&open.checkout.sd_jwt, &closed_checkout]),
        payment_mandate_jwt: join_chain(&[&open.payment.sd_jwt, &closed_payment]),
        checkout_mandate,
        payment_mandate,
        open_checkout_mandate: open.checkout.content.clone(),
        open_payment_mandate: open.payment.content.clone(),
        checkout_reference: MandateReference::of(&closed_checkout),
        payment_reference: MandateReference::of(&closed_payment),
        checkout_hash: checkout.checkout_hash.clone(),
        open_checkout_hash: open.open_checkout_hash(),
        checkout_id: checkout.checkout.id.clone(),
        amount: checkout.total,
        payment_mandate_id: open.constraints.payment_mandate_id.clone(),
    })
}

/// A fresh random nonce (128 bits, base64url) for a closed mandate when the verifier gave none.
pub fn random_nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    super::jose::b64url(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ap2::types::{AcceptableItem, Item, LineItem};

    fn checkout_with(lines: &[(&str, u64)]) -> Checkout {
        Checkout {
            id: "c".into(),
            merchant: None,
            line_items: lines
                .iter()
                .enumerate()
                .map(|(n, (id, quantity))| LineItem {
                    id: format!("line_{n}"),
                    item: Item { id: (*id).into(), title: (*id).into(), price: 100, image_url: None },
                    quantity: *quantity,
                    totals: vec![],
                    parent_id: None,
                })
                .collect(),
            status: CheckoutStatus::ReadyForComplete,
            currency: "USD".into(),
            totals: vec![],
            links: vec![],
            buyer: None,
            messages: None,
            expires_at: None,
            continue_url: None,
            other: serde_json::Map::new(),
        }
    }

    fn requirement(id: &str, acceptable: &[&str], quantity: u64) -> LineItemRequirement {
        LineItemRequirement {
            id: id.into(),
            acceptable_items: acceptable
                .iter()
                .map(|a| AcceptableItem { id: (*a).into(), title: (*a).into() })
                .collect(),
            quantity,
        }
    }

    #[test]
    fn ap2_line_items_follow_the_max_flow_rule_of_the_spec() {
        // The spec's example: one of two shoe styles, and the socks.
        let rules = [requirement("shoes", &["red", "blue"], 1), requirement("socks", &["socks"], 1)];
        let ok = |lines: &[(&str, u64)]| check_line_items(&rules, &checkout_with(lines)).is_ok();
        assert!(ok(&[("red", 1), ("socks", 1)]));
        assert!(ok(&[("blue", 1), ("socks", 1)]));
        assert!(!ok(&[("red", 1), ("blue", 1)]));
        assert!(!ok(&[("red", 1)]));
        assert!(!ok(&[("blue", 1)]));
        assert!(!ok(&[("socks", 1)]));
        assert!(!ok(&[("red", 1), ("socks", 1), ("hat", 1)]));
        // An item acceptable for two requirements may only serve one of them.
        let shared = [requirement("a", &["x", "y"], 1), requirement("b", &["x"], 1)];
        assert!(check_line_items(&shared, &checkout_with(&[("y", 1), ("x", 1)])).is_ok());
        assert!(check_line_items(&shared, &checkout_with(&[("x", 1), ("x", 1)])).is_ok());
        assert_eq!(
            check_line_items(&shared, &checkout_with(&[("y", 2)])).map_err(|e| e.code()),
            Err("ap2_line_items_not_allowed")
        );
        // Too many distinct items to evaluate is refused, not searched.
        let many: Vec<(String, u64)> = (0..70).map(|n| (format!("sku_{n}"), 1)).collect();
        let many: Vec<(&str, u64)> = many.iter().map(|(id, q)| (id.as_str(), *q)).collect();
        assert_eq!(
            check_line_items(&rules, &checkout_with(&many)).map_err(|e| e.code()),
            Err("ap2_line_items_not_allowed")
        );
        // Huge quantities do not make the search slow or overflow.
        let big = [requirement("a", &["x"], u64::MAX)];
        assert!(check_line_items(&big, &checkout_with(&[("x", u64::MAX)])).is_ok());
    }

    #[test]
    fn ap2_mandate_reference_accepts_both_hash_forms() {
        let reference = MandateReference { jwt_hash: "a".into(), sd_jwt_hash: "b".into() };
        assert!(reference.matches("a") && reference.matches("b") && !reference.matches("c"));
    }
}
