//! AP2 v0.1: the merchant-signed `CartMandate` (a W3C PaymentRequest with prices in major units)
//! and the `PaymentMandate` the agent produces for it. Types follow `specs/ap2/v0.1/*.schema.json`.
//!
//! - A cart is verified through its `merchant_authorization`: an ES256 JWT by a trusted merchant key
//!   whose `cart_hash` claim is SHA-256 over the RFC 8785 (JCS) canonical JSON of `contents`, with
//!   `null` members left out. v0.1 does not fix the digest's text form, so lowercase hex and
//!   base64url are both accepted.
//! - Amounts (`PaymentCurrencyAmount.value`) are JSON numbers in US dollars, converted to micro-USD
//!   from their decimal text ([`JsonDecimal`]); exponent notation and sub-micro fractions are refused.
//! - The produced PaymentMandate carries `cart_mandate_id` and `cart_mandate_hash` =
//!   hex(SHA-256(JCS(CartMandate))) (the spec's cart-to-payment binding) and a `user_authorization`
//!   that is a real ES256 signature by the agent's key: a compact JWT (`typ: kb+jwt`, `kid` = the
//!   key's RFC 7638 thumbprint) with `aud`, `nonce`, `iat` and `transaction_data` = [base64url
//!   SHA-256 of JCS(CartMandate), base64url SHA-256 of JCS(PaymentMandateContents)].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::decimal::JsonDecimal;
use super::error::Ap2Error;
use super::jose::{self, b64url, verify_jws, TimeClaims, MAX_TOKEN_LEN};
use super::key::AgentKey;
use super::mandate::USD;
use super::time::{format_datetime, parse_datetime};
use super::types::Jwk;
use crate::conformance::ConformanceSink;
use crate::intent::{PaymentIntent, Protocol};
use crate::money::Micros;

/// W3C `PaymentCurrencyAmount`; `value` in major units, kept as decimal text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCurrencyAmount {
    pub currency: String,
    pub value: JsonDecimal,
}

fn default_refund_period() -> i64 {
    30
}

/// W3C `PaymentItem`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentItem {
    pub label: String,
    pub amount: PaymentCurrencyAmount,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<bool>,
    #[serde(default = "default_refund_period")]
    pub refund_period: i64,
}

/// W3C `PaymentShippingOption`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentShippingOption {
    pub id: String,
    pub label: String,
    pub amount: PaymentCurrencyAmount,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<bool>,
}

/// W3C `PaymentMethodData`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMethodData {
    pub supported_methods: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

/// W3C `PaymentDetailsModifier`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDetailsModifier {
    pub supported_methods: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<PaymentItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_display_items: Option<Vec<PaymentItem>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

/// W3C `PaymentDetailsInit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDetailsInit {
    pub id: String,
    pub display_items: Vec<PaymentItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_options: Option<Vec<PaymentShippingOption>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modifiers: Option<Vec<PaymentDetailsModifier>>,
    pub total: PaymentItem,
}

/// W3C `PaymentOptions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_payer_name: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_payer_email: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_payer_phone: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_shipping: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_type: Option<String>,
}

/// W3C `ContactAddress`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactAddress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependent_locality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sorting_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_line: Option<Vec<String>>,
}

/// W3C `PaymentRequest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequest {
    pub method_data: Vec<PaymentMethodData>,
    pub details: PaymentDetailsInit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<PaymentOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_address: Option<ContactAddress>,
}

/// `CartContents`: what the merchant signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartContents {
    pub id: String,
    pub user_cart_confirmation_required: bool,
    pub payment_request: PaymentRequest,
    pub cart_expiry: String,
    pub merchant_name: String,
}

/// `CartMandate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartMandate {
    pub contents: CartContents,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant_authorization: Option<String>,
}

/// W3C `PaymentResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentResponse {
    pub request_id: String,
    pub method_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_address: Option<ContactAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping_option: Option<PaymentShippingOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer_phone: Option<String>,
}

/// `PaymentMandateContents`, plus the spec's `cart_mandate_id` / `cart_mandate_hash` binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMandateContents {
    pub payment_mandate_id: String,
    pub payment_details_id: String,
    pub payment_details_total: PaymentItem,
    pub payment_response: PaymentResponse,
    pub merchant_agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_mandate_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_mandate_hash: Option<String>,
}

/// `PaymentMandate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMandate {
    pub payment_mandate_contents: PaymentMandateContents,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_authorization: Option<String>,
}

/// A CartMandate whose merchant signature, cart hash, expiry and amounts were checked.
#[derive(Clone, Debug)]
pub struct VerifiedCart {
    pub cart: CartMandate,
    /// The cart's total in micro-USD, converted from its decimal text.
    pub total: Micros,
    pub expires_at: i64,
    /// hex(SHA-256(JCS(CartMandate as received, nulls left out))).
    pub cart_mandate_hash: String,
    /// hex(SHA-256(JCS(contents))): what the merchant signed (its `cart_hash`), without the
    /// signature. The cart's identity: the same whatever `merchant_authorization` carries it.
    pub contents_hash: String,
    /// What to ask the ledger to hold.
    pub intent: PaymentIntent,
    cart_mandate_digest: [u8; 32],
}

/// SHA-256 of the JCS canonical form of a JSON value, `null` members left out.
fn jcs_sha256(value: Value) -> Result<[u8; 32], Ap2Error> {
    fn strip_nulls(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
            other => other,
        }
    }
    let canonical = serde_json_canonicalizer::to_vec(&strip_nulls(value))
        .map_err(|e| Ap2Error::InvalidCart(format!("cannot canonicalize: {e}")))?;
    Ok(Sha256::digest(canonical).into())
}

fn usd(amount: &PaymentCurrencyAmount) -> Result<Micros, Ap2Error> {
    if amount.currency != USD {
        return Err(Ap2Error::CurrencyMismatch { expected: USD.into(), found: amount.currency.clone() });
    }
    Ok(amount.value.to_usd_micros()?)
}

/// Verifies a CartMandate (JSON text) at `now` against trusted merchant keys.
///
/// Refuses: a missing or invalid `merchant_authorization` (signature, ES256, `exp`), a `cart_hash`
/// that is not the hash of `contents`, a `cart_expiry` at or before `now`, a currency other than
/// USD anywhere in the request, and amounts that are not exact micro-USD decimals.
pub fn verify_cart_mandate(cart_mandate_json: &str, merchant_keys: &[Jwk], now: i64) -> Result<VerifiedCart, Ap2Error> {
    if cart_mandate_json.len() > MAX_TOKEN_LEN {
        return Err(Ap2Error::InvalidCart("too long".into()));
    }
    #[derive(Deserialize)]
    struct RawCart {
        contents: Box<RawValue>,
    }
    let raw: RawCart = serde_json::from_str(cart_mandate_json)
        .map_err(|e| Ap2Error::InvalidCart(format!("not a CartMandate: {e}")))?;
    let cart: CartMandate = serde_json::from_str(cart_mandate_json)
        .map_err(|e| Ap2Error::InvalidCart(format!("not a CartMandate: {e}")))?;
    let authorization = cart
        .merchant_authorization
        .as_deref()
        .ok_or_else(|| Ap2Error::InvalidCart("the cart has no merchant_authorization".into()))?;
    let jws = verify_jws(authorization, merchant_keys)?;
    TimeClaims::read(&jws.payload_json)?.check(now)?;
    #[derive(Deserialize)]
    struct CartClaims {
        cart_hash: String,
    }
    let claims: CartClaims = serde_json::from_str(&jws.payload_json)
        .map_err(|_| Ap2Error::InvalidCart("merchant_authorization has no cart_hash".into()))?;
    let contents: Value =
        serde_json::from_str(raw.contents.get()).map_err(|_| Ap2Error::InvalidCart("contents is not JSON".into()))?;
    let contents_digest = jcs_sha256(contents)?;
    if claims.cart_hash != hex::encode(contents_digest) && claims.cart_hash != b64url(&contents_digest) {
        return Err(Ap2Error::BindingMismatch("cart_hash is not the hash of the cart contents".into()));
    }

    let expires_at = parse_datetime(&cart.contents.cart_expiry)
        .ok_or_else(|| Ap2Error::InvalidCart("cart_expiry is not an ISO 8601 date-time".into()))?;
    if now >= expires_at {
        return Err(Ap2Error::Expired { expired_at: expires_at, now });
    }
    let details = &cart.contents.payment_request.details;
    for item in &details.display_items {
        usd(&item.amount)?;
    }
    let total = Micros::positive(usd(&details.total.amount)?.get())?;

    let whole: Value = serde_json::from_str(cart_mandate_json).map_err(|_| Ap2Error::InvalidCart("not JSON".into()))?;
    let cart_mandate_digest = jcs_sha256(whole)?;
    let cart_mandate_hash = hex::encode(cart_mandate_digest);
    let mut intent_details = BTreeMap::new();
    intent_details.insert("ap2_version".to_owned(), "0.1".to_owned());
    intent_details.insert("cart_id".to_owned(), cart.contents.id.clone());
    intent_details.insert("payment_details_id".to_owned(), details.id.clone());
    intent_details.insert("cart_mandate_hash".to_owned(), cart_mandate_hash.clone());
    let intent = PaymentIntent {
        amount: total,
        service: cart.contents.merchant_name.clone(),
        protocol: Protocol::Ap2,
        details: intent_details,
    };
    Ok(VerifiedCart {
        cart,
        total,
        expires_at,
        cart_mandate_hash,
        contents_hash: hex::encode(contents_digest),
        intent,
        cart_mandate_digest,
    })
}

/// What the daemon decides for the PaymentMandate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentMandateParams {
    pub payment_mandate_id: String,
    /// The payment method chosen among the cart's `method_data` (`supported_methods`).
    pub method_name: String,
    /// Method-specific details for the PaymentResponse (e.g. a token reference).
    pub method_details: Option<Map<String, Value>>,
    /// Identifier of the merchant agent the mandate goes to.
    pub merchant_agent: String,
    /// `aud` and `nonce` of `user_authorization`.
    pub audience: String,
    pub nonce: String,
}

/// The `user_authorization` claims.
#[derive(Debug, Serialize, Deserialize)]
struct UserAuthorizationClaims {
    iat: i64,
    aud: String,
    nonce: String,
    transaction_data_hashes_alg: String,
    transaction_data: Vec<String>,
}

/// Builds and signs the PaymentMandate for a verified cart, and records it under `ap2-v0.1` /
/// `PaymentMandate`. Call it after the ledger holds [`VerifiedCart::intent`].
pub fn create_payment_mandate(
    agent_key: &AgentKey,
    cart: &VerifiedCart,
    params: &PaymentMandateParams,
    now: i64,
    sink: &ConformanceSink,
) -> Result<PaymentMandate, Ap2Error> {
    let request = &cart.cart.contents.payment_request;
    if !request.method_data.iter().any(|method| method.supported_methods == params.method_name) {
        return Err(Ap2Error::InstrumentNotAllowed(format!("the cart does not accept {:?}", params.method_name)));
    }
    if params.audience.is_empty() || params.nonce.is_empty() {
        return Err(Ap2Error::InvalidConfig("user_authorization needs an audience and a nonce".into()));
    }
    let contents = PaymentMandateContents {
        payment_mandate_id: params.payment_mandate_id.clone(),
        payment_details_id: request.details.id.clone(),
        payment_details_total: request.details.total.clone(),
        payment_response: PaymentResponse {
            request_id: request.details.id.clone(),
            method_name: params.method_name.clone(),
            details: params.method_details.clone(),
            shipping_address: None,
            shipping_option: None,
            payer_name: None,
            payer_email: None,
            payer_phone: None,
        },
        merchant_agent: params.merchant_agent.clone(),
        timestamp: Some(format_datetime(now)),
        cart_mandate_id: Some(cart.cart.contents.id.clone()),
        cart_mandate_hash: Some(cart.cart_mandate_hash.clone()),
    };
    let authorization = sign_user_authorization(agent_key, cart, &contents, &params.audience, &params.nonce, now)?;
    let mandate = PaymentMandate { payment_mandate_contents: contents, user_authorization: Some(authorization) };
    if let Ok(value) = serde_json::to_value(&mandate) {
        sink.record("ap2-v0.1", "PaymentMandate", &value);
    }
    Ok(mandate)
}

fn transaction_data(cart: &VerifiedCart, contents: &PaymentMandateContents) -> Result<Vec<String>, Ap2Error> {
    let contents_value =
        serde_json::to_value(contents).map_err(|_| Ap2Error::InvalidCart("contents do not serialize".into()))?;
    Ok(vec![b64url(&cart.cart_mandate_digest), b64url(&jcs_sha256(contents_value)?)])
}

fn sign_user_authorization(
    agent_key: &AgentKey,
    cart: &VerifiedCart,
    contents: &PaymentMandateContents,
    audience: &str,
    nonce: &str,
    now: i64,
) -> Result<String, Ap2Error> {
    let claims = UserAuthorizationClaims {
        iat: now,
        aud: audience.to_owned(),
        nonce: nonce.to_owned(),
        transaction_data_hashes_alg: "sha-256".to_owned(),
        transaction_data: transaction_data(cart, contents)?,
    };
    let payload = serde_json::to_string(&claims).map_err(|_| Ap2Error::SigningFailed)?;
    jose::sign_jws(agent_key.signing_key(), Some("kb+jwt"), Some(&agent_key.thumbprint()), &payload)
}

/// Verifies a PaymentMandate's `user_authorization` the way a Credential Provider would: signed by
/// `agent` (ES256), for `expected_aud` / `expected_nonce`, over this cart's and these contents'
/// hashes, with `cart_mandate_hash` and the total matching the cart.
pub fn verify_user_authorization(
    mandate: &PaymentMandate,
    cart: &VerifiedCart,
    agent: &Jwk,
    expected_aud: &str,
    expected_nonce: &str,
) -> Result<(), Ap2Error> {
    let contents = &mandate.payment_mandate_contents;
    let jwt = mandate
        .user_authorization
        .as_deref()
        .ok_or_else(|| Ap2Error::MalformedJwt("the mandate has no user_authorization".into()))?;
    let jws = verify_jws(jwt, std::slice::from_ref(agent))?;
    let claims: UserAuthorizationClaims = serde_json::from_str(&jws.payload_json)
        .map_err(|_| Ap2Error::MalformedJwt("user_authorization claims are incomplete".into()))?;
    if claims.aud != expected_aud {
        return Err(Ap2Error::KeyBindingMismatch("aud"));
    }
    if claims.nonce != expected_nonce {
        return Err(Ap2Error::KeyBindingMismatch("nonce"));
    }
    if claims.transaction_data_hashes_alg != "sha-256" || claims.transaction_data != transaction_data(cart, contents)? {
        return Err(Ap2Error::BindingMismatch("transaction_data does not hash this cart and mandate".into()));
    }
    if contents.cart_mandate_hash.as_deref() != Some(cart.cart_mandate_hash.as_str())
        || contents.payment_details_total != cart.cart.contents.payment_request.details.total
    {
        return Err(Ap2Error::BindingMismatch("the mandate does not describe this cart".into()));
    }
    Ok(())
}
