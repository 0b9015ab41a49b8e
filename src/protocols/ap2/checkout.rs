//! One AP2 v0.2 human-not-present payment: verify the open mandates and the merchant-signed
//! checkout, check every constraint, hold the total against the agent's caps and the open
//! mandate's budget, and only then sign the closed mandates with the agent's key, obtain a
//! payment token from the Credential Provider, complete the checkout at the merchant and settle
//! on verified `Success` receipts.
//!
//! How each ending leaves the money:
//!
//! - Both receipts `Success` (signatures and references checked): settled, with the merchant as
//!   the service and the checkout id, mandate ids and receipt references in the log line and the
//!   receipt.
//! - A verified refusal (a Credential Provider's or the merchant's `Error` receipt, or an HTTP
//!   4xx without one): the reason is logged as a `note`, then the hold is voided; 402
//!   `ap2_payment_declined`.
//! - Nothing sent yet (signing or the Credential Provider failed): voided; 502.
//! - Outcome unknown (no answer from the merchant, an HTTP 5xx, a receipt whose signature or
//!   reference does not verify): nothing is settled and nothing voided. The reason is logged and
//!   the hold stays until the closed mandates are dead (it expires 60 s after them), because the
//!   merchant may have charged with the token; a retry with the same idempotency key resumes
//!   the same hold and presents the same checkout again.
//!
//! Idempotency: the agent's `Idempotency-Key`, or else `ap2:<checkout content hash>`, keys a
//! `Pending` hold whose fingerprint is the whole request (the same key with any other request is
//! `idempotency_conflict`); finished payments (paid or refused) are replayed to duplicates. One
//! merchant-signed checkout is paid at most once whatever the keys: it is claimed by its first
//! request ([`claim_payment`]: a budget bucket `ap2:co:<checkout content hash>` capped at its
//! total, charged by the hold), and a request with another key is answered as the first one.

use std::collections::BTreeMap;

use adapters::ap2::types::{PaymentInstrument, Pisp};
use adapters::ap2::{
    authorize_payment, close_mandates, content_hash, random_nonce, verify_checkout_jwt, verify_open_mandates, AgentKey,
    Ap2Error, AuthorizedPayment, CloseParams, CredentialOutcome, MandateUsage, PaymentChoice, VerifiedCheckout,
};
use adapters::Protocol;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::budget::{authenticate, check_enforceable, claim_payment, ensure_bucket, input_error, unix_secs};
use super::Ap2Service;
use super::{Merchant, Settings, HOLD_GRACE_MS};
use crate::app::Core;
use crate::identity::AgentAuth;
use crate::ledger::{Grant, Idempotency, IdempotencyFinish, IdempotencyMode};
use crate::outcome::{label, Failure, Kind, Reply};
use crate::pay::{self, Held, HoldSpec};

/// `POST /v1/ap2/payments`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    /// The merchant-signed UCP Checkout JWT, exactly as received.
    pub checkout_jwt: String,
    /// The user-signed open Checkout Mandate (SD-JWT), exactly as issued.
    pub open_checkout_mandate: String,
    /// The user-signed open Payment Mandate (SD-JWT), exactly as issued.
    pub open_payment_mandate: String,
    /// The configured merchant id [default: the checkout's `merchant.id`].
    #[serde(default)]
    pub merchant: Option<String>,
    /// The agent's task label, for attribution.
    #[serde(default)]
    pub task: String,
    /// The payment instrument at the Credential Provider [default: the mandate's pre-set or only
    /// allowed one, else the configured one].
    #[serde(default)]
    pub payment_instrument: Option<PaymentInstrument>,
    #[serde(default)]
    pub pisp: Option<Pisp>,
}

/// The answer to a paid checkout.
#[derive(Serialize, Deserialize, Debug)]
pub struct PaymentView {
    pub status: String,
    pub hold_id: String,
    pub amount_micros: u64,
    /// The payee as the log names it (the merchant website's host).
    pub service: String,
    pub merchant_id: String,
    pub checkout_id: String,
    pub checkout_hash: String,
    pub payment_mandate_id: String,
    pub checkout_mandate_id: String,
    pub order_id: Option<String>,
    pub payment_id: Option<String>,
    /// The verified receipts (decoded).
    pub checkout_receipt: Value,
    pub payment_receipt: Value,
    /// spendcap's signed receipt of the settlement.
    pub receipt: Value,
    pub replayed: bool,
}

/// Reads the checkout's `merchant.id` without verifying anything, only to pick whose keys to
/// verify it with; `verify_checkout_jwt` then checks the signature and the id again.
fn peek_merchant_id(checkout_jwt: &str) -> Option<String> {
    let payload = checkout_jwt.trim().split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("merchant")?.get("id")?.as_str().map(str::to_owned)
}

/// Verifies the checkout with the keys of the merchant it claims (or the request names).
fn verify_checkout<'a>(
    settings: &'a Settings,
    body: &PaymentRequest,
    now: i64,
) -> Result<(&'a Merchant, VerifiedCheckout), Failure> {
    let claimed = body.merchant.clone().or_else(|| peek_merchant_id(&body.checkout_jwt));
    let Some(claimed) = claimed else {
        // Not even readable: let the verifier say what is wrong with it.
        let all: Vec<_> = settings.merchants.iter().flat_map(|m| m.keys.iter().cloned()).collect();
        let error = verify_checkout_jwt(&body.checkout_jwt, &all, now)
            .err()
            .unwrap_or_else(|| Ap2Error::InvalidCheckout("the checkout names no merchant id".into()));
        return Err(input_error(error));
    };
    let merchant = settings.merchant(&claimed)?;
    let checkout = verify_checkout_jwt(&body.checkout_jwt, &merchant.keys, now).map_err(input_error)?;
    if checkout.merchant.id != merchant.id {
        return Err(Failure::new(
            Kind::Invalid,
            "ap2_merchant_mismatch",
            format!("the checkout is from merchant {:?}, not {:?}", checkout.merchant.id, merchant.id),
        ));
    }
    Ok((merchant, checkout))
}

/// One v0.2 payment for `auth` (the agent's `Idempotency-Key` is `header_key`): the whole answer,
/// kept for duplicates.
pub async fn pay(
    core: &Core,
    ap2: &Ap2Service,
    auth: &AgentAuth,
    header_key: Option<String>,
    body: PaymentRequest,
) -> Result<Reply, Failure> {
    let settings = ap2.settings()?;
    authenticate(core, auth).await?;
    let task = label("task", &body.task, 128)?;
    let key = ap2.agent_key(core, &auth.agent).await?;
    let now_ms = core.clock.now_ms();
    let now = unix_secs(now_ms);

    // Everything the agent sent is checked before anything is held or signed.
    let open = verify_open_mandates(
        &body.open_checkout_mandate,
        &body.open_payment_mandate,
        &settings.trusted_issuers,
        key.public_jwk(),
        now,
    )
    .map_err(input_error)?;
    check_enforceable(&open.constraints)?;
    let (merchant, checkout) = verify_checkout(settings, &body, now)?;
    let choice = PaymentChoice {
        payment_instrument: body.payment_instrument.clone().or_else(|| settings.payment_instrument.clone()),
        pisp: body.pisp.clone(),
    };
    // The budget's running total is the ledger's (the bucket, atomically with the caps); the
    // adapter checks this one payment against everything else.
    let authorized =
        authorize_payment(&open, &checkout, &choice, &MandateUsage::default(), now).map_err(input_error)?;
    // A revoked, suspended or expired agent, or one denied AP2 or this merchant, is refused here
    // (logged like any refusal) before its mandate or checkout is given a budget.
    pay::precheck_task(core, auth, Protocol::Ap2, &authorized.intent().service, &task).await?;
    let (bucket, _) = ensure_bucket(core, &auth.agent, &open.constraints, "").await?;

    // The checkout's identity is its signed content: one payment per merchant-signed checkout,
    // whatever idempotency keys, signature bytes or instances the requests come with.
    let checkout_id = content_hash(&checkout.checkout_jwt);
    let own_key = header_key.unwrap_or_else(|| format!("ap2:{checkout_id}"));
    let own_fingerprint = crate::fingerprint::of("ap2.payments", &body);
    let claim =
        claim_payment(core, &auth.agent, format!("ap2:co:{checkout_id}"), checkout.total, &own_key, &own_fingerprint)
            .await?;
    let (idempotency_key, fingerprint) = claim.idempotency(&own_key, &own_fingerprint);
    let spec = HoldSpec {
        intent: authorized.intent(),
        task: &task,
        expires: crate::ledger::HoldExpiry::At(now_ms + ap2.mandate_ttl.as_millis() as u64 + HOLD_GRACE_MS),
        idempotency: Some(Idempotency {
            key: idempotency_key.clone(),
            fingerprint,
            mode: IdempotencyMode::Pending { lease_ms: ap2.lease.as_millis() as u64 },
        }),
    };
    let (grant, resumed) = match pay::hold_with_budgets(core, auth, spec, vec![bucket, claim.bucket]).await? {
        Held::New(grant) => (grant, false),
        Held::Resumed(grant) => {
            let info = pay::hold_info(core, auth, &grant.hold_id).await?;
            if info.state != "open" && info.state != "unknown" {
                let reply = Reply::error(
                    &Failure::new(
                        Kind::Conflict,
                        "ap2_payment_ended",
                        format!("an earlier attempt with this idempotency key ended as {}", info.state),
                    )
                    .with_extra(json!({ "hold_id": grant.hold_id.to_string(), "state": info.state })),
                );
                finish(core, auth, &idempotency_key, IdempotencyFinish::Done(reply.stored())).await;
                return Ok(reply);
            }
            tracing::info!(agent = %auth.agent, hold = %grant.hold_id, state = %info.state, "resuming an AP2 payment");
            (grant, true)
        }
        Held::Finished(stored) => return Reply::replay(&stored),
    };

    let attempt = Attempt {
        core,
        ap2,
        auth,
        settings,
        merchant,
        key: &key,
        idempotency_key: &idempotency_key,
        authorized: &authorized,
        grant: &grant,
        resumed,
        now,
    };
    let ending = complete(attempt).await;
    let (finish_as, reply) = match ending {
        Ending::Stored(reply) => return Ok(reply),
        Ending::Final(reply) => (IdempotencyFinish::Done(reply.stored()), reply),
        Ending::Unknown(reply) => (IdempotencyFinish::Release, reply),
    };
    finish(core, auth, &idempotency_key, finish_as).await;
    Ok(reply)
}

async fn finish(core: &Core, auth: &AgentAuth, key: &str, finish: IdempotencyFinish) {
    if let Err(error) = pay::finish(core, auth, key, finish).await {
        // The payment itself is decided; a duplicate meanwhile waits for the lease to run out.
        tracing::warn!(agent = %auth.agent, code = error.code, "could not record the AP2 payment's idempotent outcome");
    }
}

/// How a payment after the hold ended.
pub(super) enum Ending {
    /// Paid, or refused with the hold voided: duplicates get this answer.
    Final(Reply),
    /// Nobody knows whether the merchant charged: the hold stays, a retry resumes it.
    Unknown(Reply),
    /// The ledger call that ended the hold also ended the payment's idempotency key (the settle
    /// or the void stored this answer for duplicates, or marking the hold unknown released the
    /// key for a retry): nothing more to record.
    Stored(Reply),
}

/// Sends the reason to the log as a note on the hold; failures to log are reported, not fatal.
pub(super) async fn note(core: &Core, auth: &AgentAuth, grant: &Grant, reason: &str, detail: BTreeMap<String, String>) {
    if let Err(error) = pay::note(core, auth, &grant.hold_id, reason, &detail).await {
        tracing::warn!(agent = %auth.agent, hold = %grant.hold_id, code = error.code, "could not log an AP2 note");
    }
}

/// Voids the hold and answers with `error` (plus the hold id); if even the void fails, the hold
/// expires by itself and the answer says so.
///
/// Only for a first attempt: when `resumed`, an earlier attempt with this hold may have reached
/// the merchant, so this attempt's refusal (a completed checkout refuses a second completion,
/// say) proves nothing about the money. The hold is then marked unknown instead
/// ([`unknown_after`]), never voided.
///
/// The void stores the answer under the payment's idempotency key `purchase` in the same
/// ledger call ([`Ending::Stored`]).
pub(super) async fn void_with(
    core: &Core,
    auth: &AgentAuth,
    (grant, resumed, purchase): (&Grant, bool, &str),
    reason: &str,
    error: Failure,
) -> Ending {
    if resumed {
        return unknown_after(core, auth, (grant, purchase), reason, error).await;
    }
    let reply = |voided: bool| {
        let mut extra = error.extra.clone().unwrap_or_else(|| json!({}));
        extra["hold_id"] = json!(grant.hold_id.to_string());
        extra["voided"] = json!(voided);
        Reply::error(&error.clone().with_extra(extra))
    };
    let voided = reply(true);
    match pay::void_finishing(core, auth, &grant.hold_id, reason, purchase, &voided.stored()).await {
        Ok((_, true)) => Ending::Stored(voided),
        Ok((_, false)) => Ending::Final(voided),
        Err(void_error) => {
            tracing::error!(agent = %auth.agent, hold = %grant.hold_id, code = void_error.code,
                "could not void an AP2 hold; it is released when it expires");
            Ending::Final(reply(false))
        }
    }
}

/// Marks the hold `unknown` (counted against the caps, never expiring, until a retry settles it
/// or an admin resolves it) with `reason` and `detail`; failures are logged: the hold stays
/// open then, which keeps it counted until it expires.
///
/// With the payment's idempotency key `purchase`, the same call releases it for the retry; true
/// when it did.
async fn mark_unknown(
    core: &Core,
    auth: &AgentAuth,
    (grant, purchase): (&Grant, Option<&str>),
    reason: &str,
    detail: &str,
) -> bool {
    match pay::mark_unknown_releasing(core, &grant.hold_id, &format!("{reason}: {detail}"), purchase).await {
        Ok((_, released)) => released,
        Err(error) => {
            tracing::error!(agent = %auth.agent, hold = %grant.hold_id, code = error.code,
                "could not mark an AP2 hold unknown; it stays open until it expires");
            false
        }
    }
}

/// The answer of a payment whose outcome is unknown: its key was released by the mark
/// (`released`), or is released afterwards.
fn unknown_ending(reply: Reply, released: bool) -> Ending {
    if released {
        Ending::Stored(reply)
    } else {
        Ending::Unknown(reply)
    }
}

/// A verified payment whose settle failed: the hold is marked unknown (if the ledger takes that),
/// with the payment's facts in the reason, so that it stays counted until someone settles it.
pub(super) async fn settle_failed(core: &Core, auth: &AgentAuth, grant: &Grant, error: &Failure) {
    let detail = format!("the provider confirmed the payment but the settle failed ({})", error.code);
    mark_unknown(core, auth, (grant, None), "ap2_settle_failed", &detail).await;
}

/// Logs why the outcome is unknown, marks the hold `unknown` and keeps it for a retry to resume.
pub(super) async fn unknown(
    core: &Core,
    auth: &AgentAuth,
    (grant, purchase): (&Grant, &str),
    reason: &str,
    error: Ap2Error,
) -> Ending {
    let mut detail = BTreeMap::new();
    detail.insert("error".to_owned(), error.code().to_owned());
    detail.insert("detail".to_owned(), truncate(&error.to_string()));
    note(core, auth, grant, reason, detail).await;
    let released = mark_unknown(core, auth, (grant, Some(purchase)), reason, &error.to_string()).await;
    let api = Failure::new(Kind::Provider, reason_code(reason), error.to_string()).with_extra(json!({
        "hold_id": grant.hold_id.to_string(),
        "hold_state": "unknown",
        "provider_code": error.code(),
    }));
    unknown_ending(Reply::error(&api), released)
}

/// A resumed payment's refusal: the earlier attempt's outcome is still unknown, so the hold is
/// marked unknown and the answer is 502 `ap2_outcome_unknown`, with this attempt's refusal.
async fn unknown_after(
    core: &Core,
    auth: &AgentAuth,
    (grant, purchase): (&Grant, &str),
    reason: &str,
    error: Failure,
) -> Ending {
    let mut detail = BTreeMap::new();
    detail.insert("error".to_owned(), error.code.to_string());
    detail.insert("detail".to_owned(), truncate(&error.detail));
    detail.insert("resumed".to_owned(), "true".to_owned());
    note(core, auth, grant, reason, detail).await;
    let detail = format!("a resumed attempt was refused: {}", error.detail);
    let released = mark_unknown(core, auth, (grant, Some(purchase)), reason, &detail).await;
    let mut extra = error.extra.clone().unwrap_or_else(|| json!({}));
    extra["hold_id"] = json!(grant.hold_id.to_string());
    extra["hold_state"] = json!("unknown");
    extra["provider_code"] = json!(error.code);
    let api = Failure::new(
        Kind::Provider,
        "ap2_outcome_unknown",
        format!("an earlier attempt may have paid; this one was refused: {}", error.detail),
    )
    .with_extra(extra);
    unknown_ending(Reply::error(&api), released)
}

fn reason_code(reason: &str) -> &'static str {
    match reason {
        "ap2_receipt_invalid" => "ap2_receipt_invalid",
        _ => "ap2_outcome_unknown",
    }
}

pub(super) fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}

/// One payment after its hold: everything signing and presenting needs.
struct Attempt<'a> {
    core: &'a Core,
    ap2: &'a Ap2Service,
    auth: &'a AgentAuth,
    settings: &'a Settings,
    merchant: &'a Merchant,
    key: &'a AgentKey,
    /// The payment's idempotency key: the settle stores the answer under it when it can.
    idempotency_key: &'a str,
    authorized: &'a AuthorizedPayment,
    grant: &'a Grant,
    /// An earlier attempt made this hold (and may have reached the merchant).
    resumed: bool,
    now: i64,
}

/// The payment after the hold: sign, obtain the token, complete, settle or void.
async fn complete(attempt: Attempt<'_>) -> Ending {
    let Attempt { core, ap2, auth, settings, merchant, key, idempotency_key, authorized, grant, resumed, now } =
        attempt;

    let params = CloseParams {
        checkout_audience: merchant.audience.clone(),
        checkout_nonce: random_nonce(),
        payment_audience: settings.credential_provider_audience.clone(),
        payment_nonce: random_nonce(),
        ttl_secs: ap2.mandate_ttl.as_secs().max(1) as i64,
    };
    let closed = match close_mandates(key, authorized, &params, now) {
        Ok(closed) => closed,
        Err(error) => {
            // Nothing was signed (an open mandate or the checkout expired since it was checked).
            let status = if matches!(error, Ap2Error::Expired { .. }) { Kind::Invalid } else { Kind::Internal };
            tracing::warn!(agent = %auth.agent, code = error.code(), "closing the AP2 mandates failed");
            return void_with(
                core,
                auth,
                (grant, resumed, idempotency_key),
                "ap2_close_failed",
                Failure::new(status, error.code(), error.to_string()),
            )
            .await;
        }
    };
    tracing::info!(agent = %auth.agent, hold = %grant.hold_id, checkout = %closed.checkout_id,
        mandate = %closed.payment_mandate_id, amount = closed.amount.get(), "signed AP2 closed mandates");

    let credential = match settings.credential_provider.request_credential(&closed).await {
        Ok(CredentialOutcome::Issued(credential)) => credential,
        Ok(CredentialOutcome::Refused(receipt)) => {
            let mut detail = BTreeMap::new();
            detail.insert("stage".to_owned(), "credential_provider".to_owned());
            detail.insert("error".to_owned(), truncate(receipt.error.as_deref().unwrap_or_default()));
            detail.insert(
                "error_description".to_owned(),
                truncate(receipt.error_description.as_deref().unwrap_or_default()),
            );
            detail.insert("payment_id".to_owned(), receipt.payment_id.clone());
            note(core, auth, grant, "ap2_credential_refused", detail).await;
            let error = declined("credential_provider", receipt.error.as_deref(), receipt.error_description.as_deref());
            return void_with(core, auth, (grant, resumed, idempotency_key), "ap2_credential_refused", error).await;
        }
        Err(error) => {
            // No token reached anyone who could charge with it.
            let mut detail = BTreeMap::new();
            detail.insert("error".to_owned(), error.code().to_owned());
            detail.insert("detail".to_owned(), truncate(&error.to_string()));
            note(core, auth, grant, "ap2_credential_provider_error", detail).await;
            let api = Failure::new(Kind::Provider, error.code(), error.to_string());
            return void_with(core, auth, (grant, resumed, idempotency_key), "ap2_credential_provider_error", api)
                .await;
        }
    };

    let completion = match merchant.client.complete_checkout(&closed, &credential).await {
        Ok(completion) => completion,
        Err(error @ Ap2Error::ProviderError { status, .. }) if status < 500 => {
            // The merchant refused the completion outright, without a receipt.
            let mut detail = BTreeMap::new();
            detail.insert("stage".to_owned(), "merchant".to_owned());
            detail.insert("error".to_owned(), error.code().to_owned());
            detail.insert("detail".to_owned(), truncate(&error.to_string()));
            note(core, auth, grant, "ap2_merchant_declined", detail).await;
            let api = declined("merchant", Some(error.code()), Some(&error.to_string()));
            return void_with(core, auth, (grant, resumed, idempotency_key), "ap2_merchant_declined", api).await;
        }
        Err(
            error @ (Ap2Error::ProviderUnreachable(_)
            | Ap2Error::ProviderError { .. }
            | Ap2Error::ProviderBadResponse(_)),
        ) => return unknown(core, auth, (grant, idempotency_key), "ap2_outcome_unknown", error).await,
        // A receipt that does not verify (signature, issuer, schema, reference) proves nothing
        // either way.
        Err(error) => return unknown(core, auth, (grant, idempotency_key), "ap2_receipt_invalid", error).await,
    };

    if !completion.is_paid() {
        let (error, description) = match (&completion.payment_receipt, &completion.checkout_receipt) {
            (Some(receipt), _) if receipt.error.is_some() => (receipt.error.clone(), receipt.error_description.clone()),
            (_, receipt) => (receipt.error.clone(), receipt.error_description.clone()),
        };
        let mut detail = BTreeMap::new();
        detail.insert("stage".to_owned(), "merchant".to_owned());
        detail.insert("error".to_owned(), truncate(error.as_deref().unwrap_or_default()));
        detail.insert("error_description".to_owned(), truncate(description.as_deref().unwrap_or_default()));
        detail.insert("checkout_receipt_reference".to_owned(), completion.checkout_receipt.reference.clone());
        if let Some(receipt) = &completion.payment_receipt {
            detail.insert("payment_receipt_reference".to_owned(), receipt.reference.clone());
            detail.insert("payment_id".to_owned(), receipt.payment_id.clone());
        }
        note(core, auth, grant, "ap2_payment_declined", detail).await;
        let api = declined("merchant", error.as_deref(), description.as_deref());
        return void_with(core, auth, (grant, resumed, idempotency_key), "ap2_payment_declined", api).await;
    }

    let checkout_receipt = &completion.checkout_receipt;
    let Some(payment_receipt) = &completion.payment_receipt else {
        // `is_paid` needs both receipts; this is unreachable, and unknown if it were not.
        return unknown(
            core,
            auth,
            (grant, idempotency_key),
            "ap2_receipt_invalid",
            Ap2Error::ReceiptInvalid("no payment receipt".into()),
        )
        .await;
    };
    let mut details: BTreeMap<String, String> = authorized.intent().details.clone();
    details.insert("checkout_receipt_reference".to_owned(), checkout_receipt.reference.clone());
    details.insert("payment_receipt_reference".to_owned(), payment_receipt.reference.clone());
    details.insert("payment_id".to_owned(), payment_receipt.payment_id.clone());
    for (name, value) in [
        ("order_id", &checkout_receipt.order_id),
        ("psp_confirmation_id", &payment_receipt.psp_confirmation_id),
        ("network_confirmation_id", &payment_receipt.network_confirmation_id),
    ] {
        if let Some(value) = value {
            details.insert(name.to_owned(), value.clone());
        }
    }
    let answer = |settlement: &pay::Settlement| {
        let view = PaymentView {
            status: "paid".into(),
            hold_id: grant.hold_id.to_string(),
            amount_micros: settlement.outcome.amount.get(),
            service: authorized.intent().service.clone(),
            merchant_id: merchant.id.clone(),
            checkout_id: closed.checkout_id.clone(),
            checkout_hash: closed.checkout_hash.clone(),
            payment_mandate_id: closed.payment_mandate_id.clone(),
            checkout_mandate_id: authorized.open_mandates().constraints.checkout_mandate_id.clone(),
            order_id: checkout_receipt.order_id.clone(),
            payment_id: Some(payment_receipt.payment_id.clone()),
            checkout_receipt: serde_json::to_value(checkout_receipt).unwrap_or(Value::Null),
            payment_receipt: serde_json::to_value(payment_receipt).unwrap_or(Value::Null),
            receipt: serde_json::to_value(&settlement.receipt).unwrap_or(Value::Null),
            replayed: false,
        };
        Reply::ok(serde_json::to_value(&view).unwrap_or(Value::Null))
    };
    // The settle stores the answer for duplicates itself when it can (one ledger call).
    let stored = |settlement: &pay::Settlement| Some(answer(settlement).stored());
    let settled =
        pay::settle_finishing(core, auth, &grant.hold_id, closed.amount, &details, idempotency_key, stored).await;
    let (settlement, stored) = match settled {
        Ok(settled) => settled,
        Err(error) => {
            // The merchant was paid; the hold must not be released. It stays, marked unknown so
            // that it never expires (a retry resumes and settles it, or an admin does), unless
            // it already ended.
            tracing::error!(agent = %auth.agent, hold = %grant.hold_id, code = error.code,
                "an AP2 payment succeeded but could not be settled");
            settle_failed(core, auth, grant, &error).await;
            return Ending::Unknown(Reply::error(&error));
        }
    };
    tracing::info!(agent = %auth.agent, hold = %grant.hold_id, merchant = %merchant.id,
        checkout = %closed.checkout_id, amount = closed.amount.get(), "AP2 payment settled");
    match stored {
        true => Ending::Stored(answer(&settlement)),
        false => Ending::Final(answer(&settlement)),
    }
}

/// 402 `ap2_payment_declined`: a provider refused the payment (nothing was charged).
pub(super) fn declined(stage: &str, error: Option<&str>, description: Option<&str>) -> Failure {
    Failure::new(Kind::Refused, "ap2_payment_declined", format!("the {} declined the payment", stage.replace('_', " ")))
        .with_extra(json!({
            "stage": stage,
            "error": error.map(truncate),
            "error_description": description.map(truncate),
        }))
}
