//! MPP — the Machine Payments Protocol (`draft-ryan-httpauth-payment`): an HTTP authentication
//! scheme. A server asks for payment with `402` and one or more
//! `WWW-Authenticate: Payment id=…, realm=…, method=…, intent=…, request=…` challenges; the client
//! answers one of them with `Authorization: Payment <base64url credential>`; the server confirms
//! with a `Payment-Receipt` header.
//!
//! The wire types and header codecs are the official crate's (`mpp`, re-exported here); this
//! module adds what the daemon needs around them: reading every challenge of an answer
//! ([`parse_challenges`]), choosing one the operator's [`Policy`] and the agent's maximum allow
//! ([`choose`] → [`Choice`], with the amount in micro-USD and the challenge's expiry), the
//! credential of the `stripe` method (a Shared Payment Token minted by the PSP, bounded to the
//! held amount: [`SptIssuer`], [`stripe_credential`]) and the receipt ([`parse_receipt`]).
//!
//! Methods and intents: `charge` with the `stripe` method ([`choose`]), and `session` with the
//! `tempo` method ([`session`]: a payment channel whose deposit the ledger holds and whose
//! cumulative vouchers it settles one increment at a time). `charge` with `tempo` (a signed
//! Tempo chain transaction) is not spoken: [`choose`] refuses it with `mpp_no_acceptable_challenge`.

pub mod session;
mod spt;

use std::collections::BTreeMap;

use http::HeaderMap;

pub use ::mpp::protocol::intents::ChargeRequest;
pub use ::mpp::{
    format_authorization, format_receipt, format_www_authenticate, parse_authorization, parse_www_authenticate,
    Base64UrlJson, ChallengeEcho, PaymentChallenge, PaymentCredential, Receipt, ReceiptStatus,
};

pub use self::spt::{SptError, SptIssuer, SptRequest, SPT_PATH};
use crate::conformance::ConformanceSink;
use crate::intent::{PaymentIntent, Protocol};
use crate::money::Micros;

/// The folder of MPP messages in conformance captures.
pub const CONFORMANCE_PROTOCOL: &str = "mpp";
/// The methods this adapter can pay with.
pub const SUPPORTED_METHODS: [&str; 1] = ["stripe"];
/// The response header that carries the server's receipt.
pub const RECEIPT_HEADER: &str = "payment-receipt";

/// Why a 402 is not paid (nothing was held or sent), or a receipt is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MppError {
    #[error("the 402 carries no WWW-Authenticate: Payment challenge")]
    NoChallenge,
    #[error("no usable Payment challenge: {0}")]
    Malformed(String),
    #[error("no challenge this daemon may pay: {0}")]
    NoAcceptable(String),
    #[error("the price {amount} micro-USD is above the maximum of {maximum} micro-USD")]
    OverMaximum { amount: u64, maximum: u64 },
    #[error("the challenge expires too soon to be paid ({0})")]
    Expired(String),
    #[error("no usable Payment-Receipt: {0}")]
    Receipt(String),
}

impl MppError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            MppError::NoChallenge => "mpp_no_challenge",
            MppError::Malformed(_) => "mpp_malformed_challenge",
            MppError::NoAcceptable(_) => "mpp_no_acceptable_challenge",
            MppError::OverMaximum { .. } => "mpp_over_payment_maximum",
            MppError::Expired(_) => "mpp_challenge_expired",
            MppError::Receipt(_) => "mpp_receipt_invalid",
        }
    }

    /// Whether it is a refusal by policy (the agent's or the operator's), rather than the server's fault.
    pub fn is_policy(&self) -> bool {
        matches!(self, MppError::NoAcceptable(_) | MppError::OverMaximum { .. })
    }
}

/// Every `Payment` challenge of an answer's `WWW-Authenticate` headers (a header may carry several).
/// Unreadable challenges are skipped when at least one is readable.
pub fn parse_challenges(headers: &HeaderMap) -> Result<Vec<PaymentChallenge>, MppError> {
    let values = headers.get_all(http::header::WWW_AUTHENTICATE).iter().map(|value| value.as_bytes());
    let parsed = ::mpp::parse_www_authenticate_all_bytes(values);
    if parsed.is_empty() {
        return Err(MppError::NoChallenge);
    }
    let mut errors = Vec::new();
    let mut challenges = Vec::new();
    for result in parsed {
        match result {
            Ok(challenge) => challenges.push(challenge),
            Err(err) => errors.push(err.to_string()),
        }
    }
    if challenges.is_empty() {
        return Err(MppError::Malformed(errors.join("; ")));
    }
    Ok(challenges)
}

/// What the operator allows, and the largest price of this request.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Payment methods the daemon may use (a subset of [`SUPPORTED_METHODS`]).
    pub methods: Vec<String>,
    /// Currencies that may be paid (lowercase ISO 4217; only `usd` maps onto the ledger's micro-USD).
    pub currencies: Vec<String>,
    /// The largest single payment (the operator's, lowered by the agent's own maximum).
    pub max_payment: Micros,
    /// A challenge is paid only with at least this long left before its `expires`.
    pub min_validity_secs: u64,
    /// How long a credential is taken to stay usable when the challenge names no `expires`.
    pub default_validity_secs: u64,
}

/// The challenge chosen, with its request decoded and priced.
#[derive(Clone, Debug)]
pub struct Choice {
    pub challenge: PaymentChallenge,
    pub request: ChargeRequest,
    pub amount: Micros,
    /// The Unix second after which the credential can no longer be used.
    pub expires_at_secs: u64,
    /// The Stripe Business Network profile the token is bounded to (`methodDetails.networkId`).
    pub network_id: String,
}

/// Minor units per unit of the currencies the ledger can count (micro-USD): `usd` has cents.
fn micros_per_base_unit(currency: &str) -> Option<u64> {
    match currency {
        "usd" => Some(10_000),
        _ => None,
    }
}

/// Chooses the cheapest challenge the policy accepts. The reasons others were refused are kept
/// for the error when none is acceptable.
pub fn choose(challenges: &[PaymentChallenge], policy: &Policy, now_secs: u64) -> Result<Choice, MppError> {
    let mut reasons = Vec::new();
    let mut over: Option<MppError> = None;
    let mut expired: Option<MppError> = None;
    let mut best: Option<Choice> = None;
    for challenge in challenges {
        match judge(challenge, policy, now_secs) {
            Ok(choice) => {
                if best.as_ref().is_none_or(|b| choice.amount < b.amount) {
                    best = Some(choice);
                }
            }
            Err(err @ MppError::OverMaximum { .. }) => over = Some(err),
            Err(err @ MppError::Expired(_)) => expired = Some(err),
            Err(err) => reasons.push(format!("{} ({}/{}): {err}", challenge.id, challenge.method, challenge.intent)),
        }
    }
    if let Some(best) = best {
        return Ok(best);
    }
    if let Some(err) = over.or(expired) {
        return Err(err);
    }
    Err(MppError::NoAcceptable(reasons.join("; ")))
}

fn judge(challenge: &PaymentChallenge, policy: &Policy, now_secs: u64) -> Result<Choice, MppError> {
    let method = challenge.method.as_str().to_ascii_lowercase();
    if !SUPPORTED_METHODS.contains(&method.as_str()) || !policy.methods.contains(&method) {
        return Err(MppError::NoAcceptable(format!("method {method:?} is not allowed")));
    }
    if !challenge.intent.is_charge() {
        return Err(MppError::NoAcceptable(format!("intent {:?} is not paid", challenge.intent.as_str())));
    }
    let request: ChargeRequest = challenge.request.decode().map_err(|err| MppError::Malformed(err.to_string()))?;
    let currency = request.currency.to_ascii_lowercase();
    let per_unit = micros_per_base_unit(&currency)
        .filter(|_| policy.currencies.contains(&currency))
        .ok_or_else(|| MppError::NoAcceptable(format!("currency {currency:?} is not allowed")))?;
    let base: u64 = request
        .amount
        .parse()
        .map_err(|_| MppError::Malformed(format!("amount {:?} is not a whole number of base units", request.amount)))?;
    let micros = base
        .checked_mul(per_unit)
        .and_then(|m| Micros::positive(m).ok())
        .ok_or_else(|| MppError::Malformed(format!("amount {:?} is out of range", request.amount)))?;
    if micros > policy.max_payment {
        return Err(MppError::OverMaximum { amount: micros.get(), maximum: policy.max_payment.get() });
    }
    let expires_at_secs = match (&challenge.expires, challenge.expires_at()) {
        (None, _) => now_secs + policy.default_validity_secs,
        (Some(_), Some(at)) => u64::try_from(at.unix_timestamp()).unwrap_or(0),
        (Some(text), None) => return Err(MppError::Malformed(format!("expires {text:?} is not an RFC 3339 time"))),
    };
    if expires_at_secs < now_secs + policy.min_validity_secs {
        return Err(MppError::Expired(challenge.expires.clone().unwrap_or_default()));
    }
    let network_id = request
        .method_details
        .as_ref()
        .and_then(|details| details.get("networkId"))
        .and_then(|id| id.as_str())
        .unwrap_or_default()
        .to_owned();
    if method == "stripe" && network_id.is_empty() {
        return Err(MppError::Malformed("a stripe challenge without methodDetails.networkId".to_owned()));
    }
    Ok(Choice { challenge: challenge.clone(), request, amount: micros, expires_at_secs, network_id })
}

impl Choice {
    /// The payment as the ledger holds it. The challenge's own fields (no secret) are in the
    /// details, so that a resumed purchase can check it answers the same challenge.
    pub fn intent(&self, url: &str) -> PaymentIntent {
        let service = http::Uri::try_from(url)
            .ok()
            .and_then(|uri| uri.host().map(str::to_ascii_lowercase))
            .unwrap_or_else(|| self.challenge.realm.clone());
        let mut details = BTreeMap::from([
            ("challenge_id".to_owned(), self.challenge.id.clone()),
            ("realm".to_owned(), self.challenge.realm.clone()),
            // The payee the operator's payee controls match (the server's protection space).
            ("payee".to_owned(), self.challenge.realm.clone()),
            ("method".to_owned(), self.challenge.method.as_str().to_owned()),
            ("intent".to_owned(), self.challenge.intent.as_str().to_owned()),
            ("currency".to_owned(), self.request.currency.clone()),
            ("base_amount".to_owned(), self.request.amount.clone()),
            ("expires_at".to_owned(), self.expires_at_secs.to_string()),
        ]);
        if !self.network_id.is_empty() {
            details.insert("network_id".to_owned(), self.network_id.clone());
        }
        PaymentIntent { amount: self.amount, service, protocol: Protocol::Mpp, details }
    }

    /// What a Shared Payment Token for this challenge may be used for: this amount, this
    /// currency, this seller, until the challenge expires.
    pub fn spt_request(&self) -> SptRequest {
        SptRequest {
            currency: self.request.currency.to_ascii_lowercase(),
            max_amount: self.request.amount.clone(),
            expires_at: self.expires_at_secs,
            network_id: self.network_id.clone(),
        }
    }
}

/// The `stripe` credential: the challenge echoed, the token as payload (with the challenge's
/// `externalId` when it names one). Recorded in the conformance sink (the token masked).
pub fn stripe_credential(choice: &Choice, spt: &str, sink: &ConformanceSink) -> Result<String, MppError> {
    let mut payload = serde_json::json!({ "spt": spt });
    if let Some(external) = &choice.request.external_id {
        payload["externalId"] = serde_json::Value::String(external.clone());
    }
    let credential = PaymentCredential::new(choice.challenge.to_echo(), payload);
    let header = format_authorization(&credential).map_err(|err| MppError::Malformed(err.to_string()))?;
    if let Ok(mut recorded) = serde_json::to_value(&credential) {
        recorded["payload"]["spt"] = serde_json::Value::String(mask(spt));
        recorded["authorization_scheme"] = serde_json::Value::String("Payment".to_owned());
        sink.record(CONFORMANCE_PROTOCOL, "PaymentCredential", &recorded);
    }
    Ok(header)
}

/// What a receipt says was charged, in micro-USD, when it reports an `amount` (base units of the
/// challenge's currency, as the request states them). `None`: no amount reported, or one that is
/// not a whole number of base units (the price then stands).
pub fn receipt_amount(receipt: &Receipt, choice: &Choice) -> Option<Micros> {
    let text = receipt.extensions.get("amount")?.as_str()?;
    let base: u64 = text.parse().ok()?;
    let per_unit = micros_per_base_unit(&choice.request.currency.to_ascii_lowercase())?;
    Micros::new(base.checked_mul(per_unit)?).ok()
}

/// A secret shown by its prefix only (`spt_…` → `spt_****`).
fn mask(secret: &str) -> String {
    let keep = secret.find('_').map_or(0, |i| i + 1);
    format!("{}{}", &secret[..keep], "*".repeat(secret.len() - keep))
}

/// The server's `Payment-Receipt`, if it sent one. `Ok(None)`: no receipt header.
pub fn parse_receipt(headers: &HeaderMap) -> Result<Option<Receipt>, MppError> {
    let Some(value) = headers.get(RECEIPT_HEADER) else { return Ok(None) };
    let text = value.to_str().map_err(|_| MppError::Receipt("not ASCII".to_owned()))?;
    ::mpp::parse_receipt(text).map(Some).map_err(|err| MppError::Receipt(err.to_string()))
}

#[cfg(test)]
mod tests;
