//! One AP2 v0.1 payment: the agent hands over a merchant-signed `CartMandate`; the daemon
//! verifies it (merchant signature over the cart hash, expiry, exact USD amounts), holds the
//! total, signs the `PaymentMandate` with the agent's key (`user_authorization`) and presents it
//! to the configured v0.1 processor, then settles on a verified `Success` Payment Receipt or
//! voids on `Error`.
//!
//! Why the daemon presents the mandate itself instead of handing it back to the agent: a signed
//! v0.1 PaymentMandate has no expiry of its own and is redeemable by whoever holds it until the
//! cart expires. Given to the agent, the daemon would never learn whether it was used, so it
//! could neither settle (spend would escape the log) nor release the hold safely (the cap would
//! no longer bound what was spent). The processor binding (spendcap's; v0.1 fixes none):
//!
//! `POST {processor_url}/ap2/v0.1/payments` with
//! `{"payment_mandate": <PaymentMandate>, "cart_mandate": <CartMandate>}`; the answer (any
//! status) is `{"payment_receipt": "<Payment Receipt JWT signed by a processor key>"}` whose
//! `reference` is the PaymentMandate's `payment_mandate_id`, or an HTTP error with
//! `{"error", "error_description"}`.

use std::collections::BTreeMap;

use adapters::ap2::types::{PaymentReceipt, ReceiptStatus};
use adapters::ap2::v01::{
    create_payment_mandate, verify_cart_mandate, PaymentMandate, PaymentMandateParams, VerifiedCart,
};
use adapters::ap2::{random_nonce, verify_payment_receipt, Ap2Error, MandateReference};
use adapters::Protocol;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::budget::{authenticate, claim_payment, input_error, unix_secs};
use super::checkout::{declined, note, settle_failed, truncate, unknown, void_with, Ending};
use super::Ap2Service;
use super::{Merchant, Settings, V01Processor, HOLD_GRACE_MS};
use crate::app::Core;
use crate::identity::AgentAuth;
use crate::ledger::{Grant, Idempotency, IdempotencyFinish, IdempotencyMode};
use crate::outcome::{label, Failure, Kind, Reply};
use crate::pay::{self, Held, HoldSpec};

/// Largest processor answer read.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// `POST /v1/ap2/v0.1/payments`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CartPaymentRequest {
    /// The merchant's CartMandate (a JSON object, with `merchant_authorization`), as received:
    /// amounts keep their decimal text.
    pub cart_mandate: Box<RawValue>,
    /// The configured merchant id [default: the merchant whose `v01_name` is the cart's
    /// `merchant_name`].
    #[serde(default)]
    pub merchant: Option<String>,
    #[serde(default)]
    pub task: String,
    /// Method-specific details for the PaymentResponse (a token reference, say).
    #[serde(default)]
    pub method_details: Option<Map<String, Value>>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CartPaymentView {
    pub status: String,
    pub hold_id: String,
    pub amount_micros: u64,
    pub service: String,
    pub merchant_id: String,
    pub cart_id: String,
    pub cart_mandate_hash: String,
    pub payment_mandate_id: String,
    /// The signed PaymentMandate as presented (already used: it authorizes nothing more).
    pub payment_mandate: Value,
    pub payment_receipt: Value,
    pub receipt: Value,
    pub replayed: bool,
}

fn pick_merchant<'a>(settings: &'a Settings, body: &CartPaymentRequest) -> Result<&'a Merchant, Failure> {
    if let Some(id) = &body.merchant {
        return settings.merchant(id);
    }
    let name = serde_json::from_str::<Value>(body.cart_mandate.get())
        .ok()
        .and_then(|cart| cart["contents"]["merchant_name"].as_str().map(str::to_owned));
    let Some(name) = name else {
        return Err(input_error(Ap2Error::InvalidCart("the cart names no merchant_name".into())));
    };
    settings.merchants.iter().find(|m| m.v01_name.as_deref() == Some(name.as_str())).ok_or_else(|| {
        Failure::new(Kind::Invalid, "ap2_unknown_merchant", format!("no configured merchant has v01_name {name:?}"))
    })
}

/// One v0.1 cart payment for `auth` (the agent's `Idempotency-Key` is `header_key`): the whole
/// answer, kept for duplicates.
pub async fn pay(
    core: &Core,
    ap2: &Ap2Service,
    auth: &AgentAuth,
    header_key: Option<String>,
    body: CartPaymentRequest,
) -> Result<Reply, Failure> {
    let settings = ap2.settings()?;
    let processor = settings.v01.as_ref().ok_or_else(|| {
        Failure::new(
            Kind::Unavailable,
            "ap2_not_configured",
            "AP2 v0.1 payments need a v01 processor in the AP2 configuration",
        )
    })?;
    authenticate(core, auth).await?;
    let task = label("task", &body.task, 128)?;
    let key = ap2.agent_key(core, &auth.agent).await?;
    let now_ms = core.clock.now_ms();
    let now = unix_secs(now_ms);

    let merchant = pick_merchant(settings, &body)?;
    let cart = verify_cart_mandate(body.cart_mandate.get(), &merchant.keys, now).map_err(input_error)?;
    // The mandate is redeemable until the cart expires: the hold lasts as long, at least the
    // mandate lifetime and at most the longest hold the daemon allows.
    let cart_expiry_ms = u64::try_from(cart.expires_at).unwrap_or(0).saturating_mul(1000);
    let shortest = now_ms + ap2.mandate_ttl.as_millis() as u64;
    let longest = (now_ms + core.limits.max_hold_ttl.as_millis() as u64).max(shortest);
    let expires_at_ms = (cart_expiry_ms + HOLD_GRACE_MS).max(shortest).min(longest);

    // The cart's identity is what the merchant signed (its contents): one payment per cart,
    // whatever keys or `merchant_authorization` bytes the requests come with.
    // Refused agents are refused before the cart is claimed (see the v0.2 flow).
    pay::precheck_task(core, auth, Protocol::Ap2, &cart.intent.service, &task).await?;
    let own_key = header_key.unwrap_or_else(|| format!("ap2-v01:{}", cart.contents_hash));
    let cart_value: Value = serde_json::from_str(body.cart_mandate.get()).map_err(Failure::internal)?;
    let own_fingerprint = crate::fingerprint::of(
        "ap2.v01.payments",
        &json!({ "cart_mandate": cart_value, "merchant": body.merchant, "task": body.task,
                 "method_details": body.method_details }),
    );
    let claim = claim_payment(
        core,
        &auth.agent,
        format!("ap2:cart:{}", cart.contents_hash),
        cart.total,
        &own_key,
        &own_fingerprint,
    )
    .await?;
    let (idempotency_key, fingerprint) = claim.idempotency(&own_key, &own_fingerprint);
    // The configured merchant's id too, so that allow- and deny-lists naming it apply.
    let mut intent = cart.intent.clone();
    intent.details.insert("merchant_id".to_owned(), merchant.id.clone());
    let spec = HoldSpec {
        intent: &intent,
        task: &task,
        expires: crate::ledger::HoldExpiry::At(expires_at_ms),
        idempotency: Some(Idempotency {
            key: idempotency_key.clone(),
            fingerprint,
            mode: IdempotencyMode::Pending { lease_ms: ap2.lease.as_millis() as u64 },
        }),
    };
    let (grant, resumed) = match pay::hold_with_budgets(core, auth, spec, vec![claim.bucket]).await? {
        Held::New(grant) => (grant, false),
        Held::Resumed(grant) => {
            let info = pay::hold_info(core, auth, &grant.hold_id).await?;
            if info.state != "open" && info.state != "unknown" {
                let error = Failure::new(
                    Kind::Conflict,
                    "ap2_payment_ended",
                    format!("an earlier attempt with this idempotency key ended as {}", info.state),
                )
                .with_extra(json!({ "hold_id": grant.hold_id.to_string(), "state": info.state }));
                let reply = Reply::error(&error);
                let _ = pay::finish(core, auth, &idempotency_key, IdempotencyFinish::Done(reply.stored())).await;
                return Ok(reply);
            }
            (grant, true)
        }
        Held::Finished(stored) => return Reply::replay(&stored),
    };

    let params = PaymentMandateParams {
        payment_mandate_id: format!("pm_{}", hex::encode(rand::random::<[u8; 16]>())),
        method_name: processor.method_name.clone(),
        method_details: body.method_details.clone(),
        merchant_agent: merchant.id.clone(),
        audience: processor.audience.clone(),
        nonce: random_nonce(),
    };
    let ending = match create_payment_mandate(&key, &cart, &params, now, &ap2.conformance) {
        Err(error) => {
            let status = match error {
                Ap2Error::InstrumentNotAllowed(_) => Kind::Invalid,
                _ => Kind::Internal,
            };
            let api = Failure::new(status, error.code(), error.to_string());
            void_with(core, auth, (&grant, resumed, &idempotency_key), "ap2_sign_failed", api).await
        }
        Ok(mandate) => {
            present(core, auth, processor, merchant, &cart, &mandate, (&grant, resumed, &idempotency_key)).await
        }
    };
    let (finish_as, reply) = match ending {
        Ending::Stored(reply) => return Ok(reply),
        Ending::Final(reply) => (IdempotencyFinish::Done(reply.stored()), reply),
        Ending::Unknown(reply) => (IdempotencyFinish::Release, reply),
    };
    if let Err(error) = pay::finish(core, auth, &idempotency_key, finish_as).await {
        tracing::warn!(agent = %auth.agent, code = error.code, "could not record the AP2 v0.1 payment's outcome");
    }
    Ok(reply)
}

#[derive(Deserialize, Default)]
struct ProcessorAnswer {
    #[serde(default)]
    payment_receipt: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Posts the mandate; returns the HTTP status and the answer.
async fn post_mandate(
    processor: &V01Processor,
    cart: &VerifiedCart,
    mandate: &PaymentMandate,
) -> Result<(u16, ProcessorAnswer), Ap2Error> {
    let mut url = processor.url.clone();
    url.path_segments_mut()
        .map_err(|_| Ap2Error::InvalidConfig("processor URL cannot take a path".into()))?
        .pop_if_empty()
        .extend(["ap2", "v0.1", "payments"]);
    let body = json!({ "payment_mandate": mandate, "cart_mandate": cart.cart });
    let response = processor
        .http
        .post(url)
        .json(&body)
        .send()
        .await
        .map_err(|e| Ap2Error::ProviderUnreachable(e.without_url().to_string()))?;
    let status = response.status().as_u16();
    let bytes = adapters::ap2::read_answer(response, MAX_RESPONSE_BYTES).await?;
    let answer = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok((status, answer))
}

async fn present(
    core: &Core,
    auth: &AgentAuth,
    processor: &V01Processor,
    merchant: &Merchant,
    cart: &VerifiedCart,
    mandate: &PaymentMandate,
    // The hold, whether an earlier attempt made it (and may have presented a mandate), and the
    // payment's idempotency key (the void or the mark that ends the hold ends it too).
    (grant, resumed, purchase): (&Grant, bool, &str),
) -> Ending {
    let mandate_id = mandate.payment_mandate_contents.payment_mandate_id.clone();
    tracing::info!(agent = %auth.agent, hold = %grant.hold_id, cart = %cart.cart.contents.id, mandate = %mandate_id,
        "signed an AP2 v0.1 PaymentMandate");
    let (status, answer) = match post_mandate(processor, cart, mandate).await {
        Ok(answered) => answered,
        Err(error) => return unknown(core, auth, (grant, purchase), "ap2_outcome_unknown", error).await,
    };
    let Some(receipt_jwt) = answer.payment_receipt else {
        let error = Ap2Error::ProviderError {
            status,
            detail: truncate(&format!(
                "{}: {}",
                answer.error.as_deref().unwrap_or("no payment_receipt"),
                answer.error_description.as_deref().unwrap_or_default()
            )),
        };
        if (400..500).contains(&status) {
            let mut detail = BTreeMap::new();
            detail.insert("stage".to_owned(), "processor".to_owned());
            detail.insert("detail".to_owned(), truncate(&error.to_string()));
            note(core, auth, grant, "ap2_payment_declined", detail).await;
            let api = declined("processor", answer.error.as_deref(), answer.error_description.as_deref());
            return void_with(core, auth, (grant, resumed, purchase), "ap2_payment_declined", api).await;
        }
        return unknown(core, auth, (grant, purchase), "ap2_outcome_unknown", error).await;
    };
    let reference = MandateReference { jwt_hash: mandate_id.clone(), sd_jwt_hash: mandate_id.clone() };
    let receipt: PaymentReceipt = match verify_payment_receipt(&receipt_jwt, &processor.keys, Some(&reference)) {
        Ok(receipt) => receipt,
        Err(error) => return unknown(core, auth, (grant, purchase), "ap2_receipt_invalid", error).await,
    };
    if receipt.status == ReceiptStatus::Error {
        let mut detail = BTreeMap::new();
        detail.insert("stage".to_owned(), "processor".to_owned());
        detail.insert("error".to_owned(), truncate(receipt.error.as_deref().unwrap_or_default()));
        detail
            .insert("error_description".to_owned(), truncate(receipt.error_description.as_deref().unwrap_or_default()));
        detail.insert("payment_id".to_owned(), receipt.payment_id.clone());
        detail.insert("payment_receipt_reference".to_owned(), receipt.reference.clone());
        note(core, auth, grant, "ap2_payment_declined", detail).await;
        let api = declined("processor", receipt.error.as_deref(), receipt.error_description.as_deref());
        return void_with(core, auth, (grant, resumed, purchase), "ap2_payment_declined", api).await;
    }

    let mut details = cart.intent.details.clone();
    details.insert("merchant_id".to_owned(), merchant.id.clone());
    details.insert("payment_mandate_id".to_owned(), mandate_id.clone());
    details.insert("payment_receipt_reference".to_owned(), receipt.reference.clone());
    details.insert("payment_id".to_owned(), receipt.payment_id.clone());
    for (name, value) in [
        ("psp_confirmation_id", &receipt.psp_confirmation_id),
        ("network_confirmation_id", &receipt.network_confirmation_id),
    ] {
        if let Some(value) = value {
            details.insert(name.to_owned(), value.clone());
        }
    }
    let settlement = match pay::settle(core, auth, &grant.hold_id, cart.total, &details).await {
        Ok(settlement) => settlement,
        Err(error) => {
            tracing::error!(agent = %auth.agent, hold = %grant.hold_id, code = error.code,
                "an AP2 v0.1 payment succeeded but could not be settled");
            settle_failed(core, auth, grant, &error).await;
            return Ending::Unknown(Reply::error(&error));
        }
    };
    tracing::info!(agent = %auth.agent, hold = %grant.hold_id, merchant = %merchant.id, amount = cart.total.get(),
        "AP2 v0.1 payment settled");
    let view = CartPaymentView {
        status: "paid".into(),
        hold_id: grant.hold_id.to_string(),
        amount_micros: settlement.outcome.amount.get(),
        service: cart.intent.service.clone(),
        merchant_id: merchant.id.clone(),
        cart_id: cart.cart.contents.id.clone(),
        cart_mandate_hash: cart.cart_mandate_hash.clone(),
        payment_mandate_id: mandate_id,
        payment_mandate: serde_json::to_value(mandate).unwrap_or(Value::Null),
        payment_receipt: serde_json::to_value(&receipt).unwrap_or(Value::Null),
        receipt: serde_json::to_value(&settlement.receipt).unwrap_or(Value::Null),
        replayed: false,
    };
    Ending::Final(Reply::ok(serde_json::to_value(&view).unwrap_or(Value::Null)))
}
