//! End-to-end tests of the AP2 adapter against the committed fixtures in `fixtures/ap2/`, which
//! were produced by an independent Python implementation (`fixtures/ap2/generate.py`).
//!
//! Where the tests check what spendcap signed, they do it by hand — base64, SHA-256 and the
//! P-256 verifying key straight from the crates — rather than through the module's own
//! verification code.

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::jose::sign_jws;
use super::*;
use crate::conformance::ConformanceSink;
use crate::{Micros, Protocol};

/// The fixtures' tokens were issued at 1_780_000_000; a minute later everything is valid.
const NOW: i64 = 1_780_000_060;
const OPEN_EXP: i64 = 1_780_000_000 + 30 * 86_400;
const CHECKOUT_EXP: i64 = 1_780_000_000 + 3_600;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ap2").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn public(name: &str) -> Jwk {
    Jwk::from_json(&fixture(&format!("keys/{name}.public.jwk.json"))).expect("public fixture key")
}

fn private(name: &str) -> AgentKey {
    AgentKey::from_private_jwk(&fixture(&format!("keys/{name}.private.jwk.json"))).expect("private fixture key")
}

fn kid(name: &str) -> Option<String> {
    public(name).kid
}

/// Signs a JSON payload with a fixture key, as that party would.
fn sign_as(name: &str, payload: &Value) -> String {
    sign_jws(private(name).signing_key(), Some("JWT"), kid(name).as_deref(), &payload.to_string()).expect("signs")
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

fn sha256(text: &str) -> String {
    b64(&Sha256::digest(text.as_bytes()))
}

fn open_mandates() -> OpenMandates {
    verify_open_mandates(
        &fixture("open_checkout_mandate.sdjwt"),
        &fixture("open_payment_mandate.sdjwt"),
        &[public("user")],
        private("agent").public_jwk(),
        NOW,
    )
    .expect("the fixture open mandates verify")
}

fn checkout_claims() -> Value {
    let mut claims: Value = serde_json::from_str(&fixture("checkout.json")).expect("checkout fixture");
    claims["iat"] = json!(1_780_000_000);
    claims["exp"] = json!(CHECKOUT_EXP);
    claims
}

fn verified_checkout(claims: &Value) -> Result<VerifiedCheckout, Ap2Error> {
    verify_checkout_jwt(&sign_as("merchant", claims), &[public("merchant")], NOW)
}

fn choice() -> PaymentChoice {
    PaymentChoice::default()
}

fn close_params() -> CloseParams {
    CloseParams {
        checkout_audience: "merchant_1".into(),
        checkout_nonce: "merchant-nonce-1".into(),
        payment_audience: "credential-provider".into(),
        payment_nonce: "cp-nonce-1".into(),
        ttl_secs: 300,
    }
}

fn closed_mandates() -> ClosedMandates {
    let open = open_mandates();
    let checkout =
        verify_checkout_jwt(fixture("checkout.jwt").trim(), &[public("merchant")], NOW).expect("fixture checkout");
    let authorized = authorize_payment(&open, &checkout, &choice(), &MandateUsage::default(), NOW).expect("authorized");
    close_mandates(&private("agent"), &authorized, &close_params(), NOW).expect("closes")
}

/// Verifies an ES256 compact JWS with nothing but `p256`, returning (header, payload).
fn verify_by_hand(jwt: &str, key: &Jwk) -> (Value, Value) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS");
    let mut sec1 = vec![4u8];
    sec1.extend(unb64(key.x.as_deref().expect("x")));
    sec1.extend(unb64(key.y.as_deref().expect("y")));
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).expect("P-256 point");
    let signature = p256::ecdsa::Signature::from_slice(&unb64(parts[2])).expect("64-byte signature");
    verifying.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("signature verifies");
    let header = serde_json::from_slice(&unb64(parts[0])).expect("header JSON");
    let payload = serde_json::from_slice(&unb64(parts[1])).expect("payload JSON");
    (header, payload)
}

/// Decodes a disclosure by hand into its JSON array.
fn disclosure_by_hand(encoded: &str) -> Vec<Value> {
    serde_json::from_slice(&unb64(encoded)).expect("disclosure is a JSON array")
}

/// Splits `<open>~~<closed jwt>~<d>~...~` by hand into (open SD-JWT text, closed JWT, disclosures).
fn split_by_hand(chain: &str) -> (String, String, Vec<String>) {
    let (open, closed) = chain.split_once("~~").expect("a delegate chain");
    let mut closed_parts: Vec<&str> = closed.split('~').collect();
    assert_eq!(closed_parts.pop(), Some(""), "the chain ends with ~");
    let jwt = closed_parts.remove(0).to_owned();
    (format!("{open}~"), jwt, closed_parts.into_iter().map(str::to_owned).collect())
}

fn code<T>(result: Result<T, Ap2Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    }
}

// ---- open mandates ----

#[test]
fn ap2_open_mandates_reduce_to_plain_constraints() {
    let open = open_mandates();
    let c = &open.constraints;
    assert_eq!(
        c.amount_range,
        Some(AmountLimits { min: Micros::new(1_000_000).expect("m"), max: Micros::new(200_000_000).expect("m") })
    );
    // "150.10" dollars, read from the disclosure's text.
    assert_eq!(c.budget.as_ref().map(|b| (b.max.get(), b.currency.as_str())), Some((150_100_000, "USD")));
    let ids =
        |list: &Option<Vec<types::Merchant>>| list.as_ref().map(|l| l.iter().map(|m| m.id.clone()).collect::<Vec<_>>());
    assert_eq!(ids(&c.allowed_payees), Some(vec!["merchant_1".to_owned(), "merchant_3".to_owned()]));
    assert_eq!(ids(&c.allowed_merchants), Some(vec!["merchant_1".to_owned(), "merchant_2".to_owned()]));
    assert_eq!(c.line_items.len(), 1);
    assert_eq!(
        c.line_items[0].iter().map(|r| (r.id.as_str(), r.quantity)).collect::<Vec<_>>(),
        [("shoes", 1), ("socks", 2)]
    );
    assert_eq!(c.line_items[0][0].acceptable_items.len(), 2);
    assert_eq!(c.expires_at, Some(OPEN_EXP));
    let issuer_jwt = fixture("open_payment_mandate.sdjwt");
    // The signed content (`header.payload`), not the signature: a re-signed copy is the same mandate.
    let issuer_jwt = issuer_jwt.split('~').next().expect("jwt");
    let (signed_content, _) = issuer_jwt.rsplit_once('.').expect("a JWS");
    assert_eq!(c.payment_mandate_id, sha256(signed_content));
    assert_eq!(open.open_checkout_hash(), sha256(fixture("open_checkout_mandate.sdjwt").trim()));
}

#[test]
fn ap2_open_mandates_refuse_the_wrong_agent_issuer_time_and_reference() {
    let checkout = fixture("open_checkout_mandate.sdjwt");
    let payment = fixture("open_payment_mandate.sdjwt");
    let agent = private("agent");
    let verify = |checkout: &str, payment: &str, trusted: &[Jwk], agent: &Jwk, now: i64| {
        code(verify_open_mandates(checkout, payment, trusted, agent, now))
    };
    let user = [public("user")];
    assert_eq!(verify(&checkout, &payment, &user, agent.public_jwk(), NOW), "ok");
    // Delegated to another agent key.
    assert_eq!(verify(&checkout, &payment, &user, AgentKey::generate().public_jwk(), NOW), "ap2_cnf_mismatch");
    // The user's kid is not among the trusted keys.
    assert_eq!(verify(&checkout, &payment, &[public("merchant")], agent.public_jwk(), NOW), "ap2_untrusted_issuer");
    // A kid-less trusted key is tried, and does not verify.
    assert_eq!(verify(&checkout, &payment, &[public("attacker")], agent.public_jwk(), NOW), "ap2_bad_signature");
    // Expired at exp.
    assert_eq!(verify(&checkout, &payment, &user, agent.public_jwk(), OPEN_EXP), "ap2_expired");
    // Withholding one disclosure of the checkout mandate changes its hash: payment.reference breaks.
    let parts: Vec<&str> = checkout.trim().split('~').collect();
    let fewer = format!("{}~{}~", parts[0], parts[2..parts.len() - 1].join("~"));
    assert_eq!(verify(&fewer, &payment, &user, agent.public_jwk(), NOW), "ap2_reference_mismatch");
    // An edited disclosure no longer matches its digest, so it is a stray disclosure.
    let edited_disclosure = b64(br#"["salt",{"id":"merchant_9","name":"Evil"}]"#);
    let tampered = format!("{}~{}~{}~", parts[0], parts[1..parts.len() - 1].join("~"), edited_disclosure);
    assert_eq!(verify(&tampered, &payment, &user, agent.public_jwk(), NOW), "ap2_malformed_sd_jwt");
    // The two mandates swapped: each is read as the other type.
    assert_eq!(verify(&payment, &checkout, &user, agent.public_jwk(), NOW), "ap2_wrong_mandate_type");
    // Not an SD-JWT at all.
    assert_eq!(verify("garbage", &payment, &user, agent.public_jwk(), NOW), "ap2_malformed_sd_jwt");
}

/// Issues an open Payment Mandate with the fixture user key (the test plays the trusted surface).
fn issue_open_payment(content: Value) -> String {
    let disclosure = Disclosure::element(&content).expect("disclosure");
    let payload =
        json!({"delegate_payload": [{"...": disclosure.digest()}], "_sd_alg": "sha-256", "iat": 1_780_000_000});
    let jwt = sign_jws(private("user").signing_key(), Some("dc+sd-jwt"), kid("user").as_deref(), &payload.to_string())
        .expect("signs");
    format!("{jwt}~{}~", disclosure.encoded())
}

fn open_payment_content(constraints: Value) -> Value {
    let reference = sha256(fixture("open_checkout_mandate.sdjwt").trim());
    let mut all = constraints.as_array().cloned().unwrap_or_default();
    all.push(json!({"type": "payment.reference", "conditional_transaction_id": reference}));
    json!({
        "vct": "mandate.payment.open.1",
        "constraints": all,
        "cnf": {"jwk": private("agent").public_jwk()},
        "iat": 1_780_000_000,
        "exp": OPEN_EXP,
    })
}

#[test]
fn ap2_open_payment_mandates_in_other_currencies_or_with_unknown_constraints_are_refused() {
    let verify = |content: Value| {
        code(verify_open_mandates(
            &fixture("open_checkout_mandate.sdjwt"),
            &issue_open_payment(content),
            &[public("user")],
            private("agent").public_jwk(),
            NOW,
        ))
    };
    assert_eq!(
        verify(open_payment_content(json!([{"type": "payment.amount_range", "currency": "USD", "max": 100}]))),
        "ok"
    );
    assert_eq!(
        verify(open_payment_content(json!([{"type": "payment.amount_range", "currency": "EUR", "max": 100}]))),
        "ap2_currency_mismatch"
    );
    assert_eq!(
        verify(open_payment_content(json!([{"type": "payment.budget", "currency": "GBP", "max": 10}]))),
        "ap2_currency_mismatch"
    );
    assert_eq!(verify(open_payment_content(json!([{"type": "payment.surprise"}]))), "ap2_unknown_constraint");
}

// ---- the merchant's checkout ----

#[test]
fn ap2_fixture_checkout_verifies_to_an_exact_total() {
    let jwt = fixture("checkout.jwt");
    let checkout = verify_checkout_jwt(&jwt, &[public("merchant")], NOW).expect("verifies");
    assert_eq!(checkout.total.get(), 146_260_000);
    assert_eq!(checkout.total_minor, 14_626);
    assert_eq!(checkout.merchant.id, "merchant_1");
    assert_eq!(checkout.checkout_hash, sha256(jwt.trim()));
    assert_eq!(checkout.expires_at, Some(CHECKOUT_EXP));
}

#[test]
fn ap2_tampered_checkouts_are_refused_with_distinct_codes() {
    let merchant = [public("merchant")];
    let genuine = fixture("checkout.jwt").trim().to_owned();
    let parts: Vec<&str> = genuine.split('.').collect();

    // Payload edited (the total lowered) under the merchant's signature.
    let mut claims: Value = serde_json::from_slice(&unb64(parts[1])).expect("payload");
    claims["totals"][2]["amount"] = json!(100);
    let edited = format!("{}.{}.{}", parts[0], b64(claims.to_string().as_bytes()), parts[2]);
    assert_eq!(code(verify_checkout_jwt(&edited, &merchant, NOW)), "ap2_bad_signature");

    // Signed by someone else's key.
    let forged =
        sign_jws(private("attacker").signing_key(), Some("JWT"), None, &checkout_claims().to_string()).expect("signs");
    assert_eq!(code(verify_checkout_jwt(&forged, &merchant, NOW)), "ap2_bad_signature");

    // alg none, with the original payload.
    let unsigned = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    assert_eq!(code(verify_checkout_jwt(&unsigned, &merchant, NOW)), "ap2_alg_not_allowed");
    let hmac = format!("{}.{}.{}", b64(br#"{"alg":"HS256"}"#), parts[1], parts[2]);
    assert_eq!(code(verify_checkout_jwt(&hmac, &merchant, NOW)), "ap2_alg_not_allowed");

    // Expired: by the JWT's exp, and by the checkout's own expires_at.
    assert_eq!(code(verify_checkout_jwt(&genuine, &merchant, CHECKOUT_EXP)), "ap2_expired");
    let mut stale = checkout_claims();
    stale.as_object_mut().expect("object").remove("exp");
    stale["expires_at"] = json!("2026-05-28T20:28:00Z");
    assert_eq!(code(verify_checkout_jwt(&sign_as("merchant", &stale), &merchant, NOW)), "ok");
    assert_eq!(code(verify_checkout_jwt(&sign_as("merchant", &stale), &merchant, NOW + 20)), "ap2_expired");

    // Malformed.
    for bad in [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c",
        &format!("{}.{}.{}", b64(b"{}"), parts[1], parts[2]),
        &format!("{}.e30", parts[0]),
    ] {
        assert_eq!(code(verify_checkout_jwt(bad, &merchant, NOW)), "ap2_malformed_jwt", "{bad:?}");
    }

    // Currency, status, totals, merchant.
    let mut euros = checkout_claims();
    euros["currency"] = json!("EUR");
    assert_eq!(code(verified_checkout(&euros)), "ap2_currency_mismatch");
    let mut done = checkout_claims();
    done["status"] = json!("completed");
    assert_eq!(code(verified_checkout(&done)), "ap2_checkout_not_payable");
    let mut no_total = checkout_claims();
    no_total["totals"] = json!([{"type": "subtotal", "amount": 13543}]);
    assert_eq!(code(verified_checkout(&no_total)), "ap2_invalid_checkout");
    let mut float_total = checkout_claims();
    float_total["totals"][2]["amount"] = json!(146.26);
    assert_eq!(code(verified_checkout(&float_total)), "ap2_invalid_checkout");
    let mut anonymous = checkout_claims();
    anonymous.as_object_mut().expect("object").remove("merchant");
    assert_eq!(code(verified_checkout(&anonymous)), "ap2_invalid_checkout");
}

// ---- constraints ----

#[test]
fn ap2_checkouts_outside_the_mandates_are_refused() {
    let open = open_mandates();
    let authorize = |claims: &Value, usage: MandateUsage| {
        let checkout = verified_checkout(claims).expect("a validly signed checkout");
        code(authorize_payment(&open, &checkout, &choice(), &usage, NOW))
    };
    let none = MandateUsage::default();
    assert_eq!(authorize(&checkout_claims(), none), "ok");

    // merchant_2 may take the checkout but is not an allowed payee; merchant_3 the reverse.
    let mut second = checkout_claims();
    second["merchant"] = json!({"id": "merchant_2", "name": "Second Merchant"});
    assert_eq!(authorize(&second, none), "ap2_payee_not_allowed");
    let mut third = checkout_claims();
    third["merchant"] = json!({"id": "merchant_3", "name": "Third Merchant"});
    assert_eq!(authorize(&third, none), "ap2_merchant_not_allowed");
    // A look-alike name does not make an allowed merchant.
    let mut lookalike = checkout_claims();
    lookalike["merchant"] =
        json!({"id": "merchant_99", "name": "Demo Merchant", "website": "https://demo-merchant.example"});
    assert_eq!(authorize(&lookalike, none), "ap2_payee_not_allowed");

    // Amounts: 200.00 is the top of the range, 200.01 is over, 0.99 under.
    for (total, expected) in [(20_000, "ok"), (20_001, "ap2_amount_out_of_range"), (99, "ap2_amount_out_of_range")] {
        let mut claims = checkout_claims();
        claims["totals"][2]["amount"] = json!(total);
        let usage = MandateUsage::default();
        let expected = if total == 20_000 { "ap2_budget_exceeded" } else { expected };
        assert_eq!(authorize(&claims, usage), expected, "total {total}");
    }
    // Budget 150.10: 146.26 + 3.84 spent fits exactly, one cent more does not.
    let spent = |micros| MandateUsage { spent: Micros::new(micros).expect("micros"), ..MandateUsage::default() };
    assert_eq!(authorize(&checkout_claims(), spent(3_840_000)), "ok");
    assert_eq!(authorize(&checkout_claims(), spent(3_850_000)), "ap2_budget_exceeded");

    // Line items: two pairs of shoes, or a shoe the mandate does not list.
    let mut two_shoes = checkout_claims();
    two_shoes["line_items"][1]["item"] = json!({"id": "sku_silver_sneaker_9", "title": "Silver", "price": 599});
    assert_eq!(authorize(&two_shoes, none), "ap2_line_items_not_allowed");
    let mut one_sock = checkout_claims();
    one_sock["line_items"][1]["quantity"] = json!(1);
    assert_eq!(authorize(&one_sock, none), "ap2_line_items_not_allowed");
    let mut silver = checkout_claims();
    silver["line_items"][0]["item"]["id"] = json!("sku_silver_sneaker_9");
    assert_eq!(authorize(&silver, none), "ok");

    // After the open mandates expire nothing is authorized, even with a fresh checkout.
    let checkout = verified_checkout(&checkout_claims()).expect("checkout");
    assert_eq!(code(authorize_payment(&open, &checkout, &choice(), &none, OPEN_EXP)), "ap2_expired");
}

#[test]
fn ap2_payment_instrument_must_be_allowed() {
    let open = open_mandates();
    let checkout = verified_checkout(&checkout_claims()).expect("checkout");
    let usage = MandateUsage::default();
    // Exactly one instrument is allowed, so none needs choosing.
    let authorized = authorize_payment(&open, &checkout, &choice(), &usage, NOW).expect("authorized");
    assert_eq!(authorized.intent().details.get("payment_instrument_id").map(String::as_str), Some("card_4242"));
    let other = PaymentChoice {
        payment_instrument: Some(types::PaymentInstrument {
            id: "card_0000".into(),
            instrument_type: "card".into(),
            description: None,
        }),
        pisp: None,
    };
    assert_eq!(code(authorize_payment(&open, &checkout, &other, &usage, NOW)), "ap2_instrument_not_allowed");
}

// ---- closing: the full v0.2 round trip ----

#[test]
fn ap2_v02_round_trip_closes_mandates_bound_to_the_open_ones() {
    let open = open_mandates();
    let checkout_jwt = fixture("checkout.jwt").trim().to_owned();
    let checkout = verify_checkout_jwt(&checkout_jwt, &[public("merchant")], NOW).expect("checkout");
    let authorized = authorize_payment(&open, &checkout, &choice(), &MandateUsage::default(), NOW).expect("authorized");

    // What the daemon holds.
    let intent = authorized.intent();
    assert_eq!(intent.amount.get(), 146_260_000);
    assert_eq!(intent.protocol, Protocol::Ap2);
    assert_eq!(intent.service, "demo-merchant.example");
    assert_eq!(intent.details.get("checkout_hash"), Some(&sha256(&checkout_jwt)));

    let agent = private("agent");
    let closed = close_mandates(&agent, &authorized, &close_params(), NOW).expect("closes");
    let agent_jwk = agent.public_jwk().clone();

    // -- The Payment Mandate, checked by hand. --
    let (open_text, jwt, disclosures) = split_by_hand(&closed.payment_mandate_jwt);
    assert_eq!(open_text, fixture("open_payment_mandate.sdjwt").trim(), "the open mandate is presented as issued");
    let (header, payload) = verify_by_hand(&jwt, &agent_jwk);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "kb+sd-jwt");
    assert_eq!(payload["sd_hash"], json!(sha256(&open_text)), "sd_hash binds the open payment mandate");
    assert_eq!(payload["aud"], "credential-provider");
    assert_eq!(payload["nonce"], "cp-nonce-1");
    assert_eq!(payload["iat"], json!(NOW));
    assert_eq!(payload["_sd_alg"], "sha-256");
    assert_eq!(disclosures.len(), 1);
    assert_eq!(payload["delegate_payload"], json!([{"...": sha256(&disclosures[0])}]));
    let decoded = disclosure_by_hand(&disclosures[0]);
    assert_eq!(decoded.len(), 2, "an array-element disclosure");
    let mandate = &decoded[1];
    assert_eq!(mandate["vct"], "mandate.payment.1");
    assert_eq!(mandate["transaction_id"], json!(sha256(&checkout_jwt)), "transaction_id = hash of checkout_jwt");
    assert_eq!(mandate["payee"]["id"], "merchant_1");
    assert_eq!(mandate["payment_amount"], json!({"amount": 14626, "currency": "USD"}));
    assert_eq!(mandate["payment_instrument"]["id"], "card_4242");
    assert_eq!(mandate["exp"], json!(NOW + 300));
    assert!(mandate.get("cnf").is_none(), "a closed mandate delegates no further");
    assert_eq!(closed.payment_reference.jwt_hash, sha256(&jwt));

    // -- The Checkout Mandate, checked by hand. --
    let (open_text, jwt, disclosures) = split_by_hand(&closed.checkout_mandate_jwt);
    assert_eq!(open_text, fixture("open_checkout_mandate.sdjwt").trim());
    let (header, payload) = verify_by_hand(&jwt, &agent_jwk);
    assert_eq!(header["typ"], "kb+sd-jwt");
    assert_eq!(payload["sd_hash"], json!(sha256(&open_text)));
    assert_eq!(payload["aud"], "merchant_1");
    assert_eq!(payload["nonce"], "merchant-nonce-1");
    assert_eq!(disclosures.len(), 2);
    let content = disclosure_by_hand(&disclosures[0]);
    assert_eq!(payload["delegate_payload"], json!([{"...": sha256(&disclosures[0])}]));
    let mandate = &content[1];
    assert_eq!(mandate["vct"], "mandate.checkout.1");
    assert_eq!(mandate["checkout_hash"], json!(sha256(&checkout_jwt)));
    // checkout_jwt is a selectively disclosable claim, disclosed.
    assert_eq!(mandate["_sd"], json!([sha256(&disclosures[1])]));
    assert_eq!(disclosure_by_hand(&disclosures[1])[1..], [json!("checkout_jwt"), json!(checkout_jwt)]);
    assert_eq!(closed.checkout_reference.jwt_hash, sha256(&jwt));
    // The open checkout mandate's hash is what the open payment mandate's payment.reference names.
    assert_eq!(closed.open_checkout_hash, sha256(&open_text));

    // -- And as a verifier sees it, through the chain verifier. --
    let chain = verify_mandate_chain(
        &closed.payment_mandate_jwt,
        &[public("user")],
        Some("credential-provider"),
        Some("cp-nonce-1"),
        NOW,
    )
    .expect("the chain verifies");
    assert_eq!(types::PaymentMandate::from_json(&chain.closed_content_json).expect("closed"), closed.payment_mandate);
    let chain = verify_mandate_chain(&closed.checkout_mandate_jwt, &[public("user")], Some("merchant_1"), None, NOW)
        .expect("the chain verifies");
    assert_eq!(types::CheckoutMandate::from_json(&chain.closed_content_json).expect("closed"), closed.checkout_mandate);
    assert_eq!(
        code(verify_mandate_chain(&closed.checkout_mandate_jwt, &[public("user")], Some("someone-else"), None, NOW)),
        "ap2_key_binding_mismatch"
    );
    assert_eq!(
        code(verify_mandate_chain(&closed.checkout_mandate_jwt, &[public("user")], None, None, NOW + 300)),
        "ap2_expired"
    );
}

#[test]
fn ap2_a_closed_mandate_moved_onto_another_open_mandate_does_not_verify() {
    let closed = closed_mandates();
    let (_, payment_closed) = closed.payment_mandate_jwt.split_once("~~").expect("chain");
    let (checkout_open, _) = closed.checkout_mandate_jwt.split_once("~~").expect("chain");
    // The closed payment mandate presented after the open *checkout* mandate: sd_hash mismatch.
    let spliced = format!("{checkout_open}~~{payment_closed}");
    assert_eq!(code(verify_mandate_chain(&spliced, &[public("user")], None, None, NOW)), "ap2_binding_mismatch");
    // An edited closed disclosure (amount lowered) is not the one the agent signed.
    let (open, closed_part) = closed.payment_mandate_jwt.split_once("~~").expect("chain");
    let mut parts: Vec<String> = closed_part.split('~').map(str::to_owned).collect();
    let mut content = disclosure_by_hand(&parts[1]);
    content[1]["payment_amount"]["amount"] = json!(1);
    parts[1] = b64(Value::Array(content).to_string().as_bytes());
    let edited = format!("{open}~~{}", parts.join("~"));
    assert_eq!(code(verify_mandate_chain(&edited, &[public("user")], None, None, NOW)), "ap2_malformed_sd_jwt");
}

#[test]
fn ap2_closing_refuses_another_key_and_late_calls() {
    let open = open_mandates();
    let checkout = verified_checkout(&checkout_claims()).expect("checkout");
    let authorized = authorize_payment(&open, &checkout, &choice(), &MandateUsage::default(), NOW).expect("authorized");
    assert_eq!(code(close_mandates(&AgentKey::generate(), &authorized, &close_params(), NOW)), "ap2_cnf_mismatch");
    // The checkout expired between the hold and the signature.
    assert_eq!(code(close_mandates(&private("agent"), &authorized, &close_params(), CHECKOUT_EXP)), "ap2_expired");
    let mut params = close_params();
    params.payment_nonce = String::new();
    assert_eq!(code(close_mandates(&private("agent"), &authorized, &params, NOW)), "ap2_invalid_config");
    // The closed mandates never outlive the checkout.
    let mut long = close_params();
    long.ttl_secs = 86_400;
    let closed = close_mandates(&private("agent"), &authorized, &long, NOW).expect("closes");
    assert_eq!(closed.payment_mandate.exp, Some(CHECKOUT_EXP));
}

// ---- receipts ----

fn payment_receipt(reference: &str, status: &str) -> Value {
    match status {
        "Success" => json!({"status": "Success", "iss": "mpp.example", "iat": NOW, "reference": reference,
            "payment_id": "pay_1", "psp_confirmation_id": "psp_1", "network_confirmation_id": "net_1"}),
        _ => json!({"status": "Error", "iss": "cp.example", "iat": NOW, "reference": reference,
            "payment_id": "pay_1", "error": "invalid_mandate", "error_description": "amount too high"}),
    }
}

fn checkout_receipt(reference: &str) -> Value {
    json!({"status": "Success", "iss": "https://demo-merchant.example", "iat": NOW, "reference": reference, "order_id": "order_1"})
}

#[test]
fn ap2_receipts_are_verified_against_key_schema_and_reference() {
    let closed = closed_mandates();
    let processor = [public("processor")];
    let reference = &closed.payment_reference;
    let ok = sign_as("processor", &payment_receipt(&reference.jwt_hash, "Success"));
    let receipt = verify_payment_receipt(&ok, &processor, Some(reference)).expect("verifies");
    assert_eq!(receipt.status, types::ReceiptStatus::Success);
    assert_eq!(receipt.psp_confirmation_id.as_deref(), Some("psp_1"));
    assert!(receipt.ensure_success().is_ok());
    // The sd_hash-style reference is accepted too.
    let ok = sign_as("processor", &payment_receipt(&reference.sd_jwt_hash, "Success"));
    assert_eq!(code(verify_payment_receipt(&ok, &processor, Some(reference))), "ok");

    let error = sign_as("processor", &payment_receipt(&reference.jwt_hash, "Error"));
    let receipt = verify_payment_receipt(&error, &processor, Some(reference)).expect("a valid error receipt");
    assert_eq!(code(receipt.ensure_success()), "ap2_receipt_error");

    let other = sign_as("processor", &payment_receipt(&closed.checkout_reference.jwt_hash, "Success"));
    assert_eq!(code(verify_payment_receipt(&other, &processor, Some(reference))), "ap2_receipt_reference_mismatch");
    let forged = sign_as("attacker", &payment_receipt(&reference.jwt_hash, "Success"));
    assert_eq!(code(verify_payment_receipt(&forged, &processor, Some(reference))), "ap2_bad_signature");
    let mut incomplete = payment_receipt(&reference.jwt_hash, "Success");
    incomplete.as_object_mut().expect("object").remove("network_confirmation_id");
    assert_eq!(
        code(verify_payment_receipt(&sign_as("processor", &incomplete), &processor, Some(reference))),
        "ap2_receipt_invalid"
    );
    let mut contradictory = payment_receipt(&reference.jwt_hash, "Success");
    contradictory["error"] = json!("x");
    assert_eq!(
        code(verify_payment_receipt(&sign_as("processor", &contradictory), &processor, Some(reference))),
        "ap2_receipt_invalid"
    );

    let checkout = sign_as("merchant", &checkout_receipt(&closed.checkout_reference.jwt_hash));
    let receipt =
        verify_checkout_receipt(&checkout, &[public("merchant")], Some(&closed.checkout_reference)).expect("verifies");
    assert_eq!(receipt.order_id.as_deref(), Some("order_1"));
}

// ---- provider clients over real HTTP ----

fn conformance_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spendcap-ap2-conformance-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn files_in(dir: &std::path::Path, protocol: &str, message_type: &str) -> Vec<Value> {
    let folder = dir.join(protocol).join(message_type);
    let Ok(entries) = std::fs::read_dir(&folder) else { return Vec::new() };
    entries
        .map(|entry| {
            serde_json::from_str(&std::fs::read_to_string(entry.expect("entry").path()).expect("file")).expect("JSON")
        })
        .collect()
}

fn provider(server: &MockServer) -> ProviderConfig {
    ProviderConfig { base_url: server.uri(), timeout: Duration::from_secs(5), resolver: None }
}

#[tokio::test]
async fn ap2_clients_pay_through_credential_provider_and_merchant() {
    let closed = closed_mandates();
    let cp = MockServer::start().await;
    let merchant = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ap2/v0.2/payment-credentials"))
        .and(body_partial_json(json!({
            "payment_mandate": closed.payment_mandate_jwt,
            "checkout_hash": closed.checkout_hash,
            "open_checkout_hash": closed.open_checkout_hash,
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"payment_token": "tok_abc"})))
        .expect(1)
        .mount(&cp)
        .await;
    let receipts = json!({
        "checkout_receipt": sign_as("merchant", &checkout_receipt(&closed.checkout_reference.jwt_hash)),
        "payment_receipt": sign_as("processor", &payment_receipt(&closed.payment_reference.jwt_hash, "Success")),
    });
    Mock::given(method("POST"))
        .and(path("/ap2/v0.2/checkouts/chk_7f3a/complete"))
        .and(body_partial_json(json!({"checkout_mandate": closed.checkout_mandate_jwt, "payment_token": "tok_abc"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(receipts))
        .expect(1)
        .mount(&merchant)
        .await;

    let dir = conformance_dir("clients");
    let sink = ConformanceSink::to_dir(&dir);
    let cp_client = CredentialProviderClient::new(&provider(&cp), vec![public("credential_provider")], sink.clone())
        .expect("client");
    let merchant_client =
        MerchantClient::new(&provider(&merchant), vec![public("merchant")], vec![public("processor")], sink)
            .expect("client");

    let CredentialOutcome::Issued(credential) = cp_client.request_credential(&closed).await.expect("answer") else {
        panic!("expected a token");
    };
    assert_eq!(credential.expose(), "tok_abc");
    let completion = merchant_client.complete_checkout(&closed, &credential).await.expect("receipts");
    assert!(completion.is_paid());
    assert_eq!(completion.checkout_receipt.order_id.as_deref(), Some("order_1"));

    // Every mandate sent was recorded, decoded; receipts (received, not sent) are not.
    let sent = files_in(&dir, "ap2", "payment_mandate");
    assert_eq!(sent, vec![serde_json::to_value(&closed.payment_mandate).expect("json")]);
    assert_eq!(files_in(&dir, "ap2", "checkout_mandate").len(), 1);
    assert_eq!(files_in(&dir, "ap2", "open_payment_mandate").len(), 1);
    assert_eq!(files_in(&dir, "ap2", "open_checkout_mandate").len(), 1);
    assert!(files_in(&dir, "ap2", "payment_receipt").is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn ap2_client_failures_are_reported_with_their_codes() {
    let closed = closed_mandates();
    let server = MockServer::start().await;
    let cp = |server: &MockServer| {
        CredentialProviderClient::new(
            &provider(server),
            vec![public("credential_provider")],
            ConformanceSink::disabled(),
        )
        .expect("client")
    };

    // A refusal with a signed error receipt.
    let refusal = sign_as("credential_provider", &payment_receipt(&closed.payment_reference.jwt_hash, "Error"));
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"payment_receipt": refusal})))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    match cp(&server).request_credential(&closed).await.expect("an answer") {
        CredentialOutcome::Refused(receipt) => assert_eq!(receipt.error.as_deref(), Some("invalid_mandate")),
        CredentialOutcome::Issued(_) => panic!("expected a refusal"),
    }
    // A refusal receipt signed by someone else is not believed.
    server.reset().await;
    let forged = sign_as("attacker", &payment_receipt(&closed.payment_reference.jwt_hash, "Error"));
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"payment_receipt": forged})))
        .mount(&server)
        .await;
    assert_eq!(code(cp(&server).request_credential(&closed).await), "ap2_bad_signature");
    // An HTTP error without a receipt, and a success without a token.
    server.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(500).set_body_string("oops")).mount(&server).await;
    assert_eq!(code(cp(&server).request_credential(&closed).await), "ap2_provider_error");
    server.reset().await;
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(json!({}))).mount(&server).await;
    assert_eq!(code(cp(&server).request_credential(&closed).await), "ap2_provider_bad_response");

    // The merchant's receipts must name this checkout mandate.
    server.reset().await;
    let wrong = json!({"checkout_receipt": sign_as("merchant", &checkout_receipt(&closed.payment_reference.jwt_hash))});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(200).set_body_json(wrong)).mount(&server).await;
    let merchant = MerchantClient::new(
        &provider(&server),
        vec![public("merchant")],
        vec![public("processor")],
        ConformanceSink::disabled(),
    )
    .expect("client");
    let credential = PaymentCredential::new("tok".into());
    assert_eq!(code(merchant.complete_checkout(&closed, &credential).await), "ap2_receipt_reference_mismatch");
    // A merchant that refuses before payment: a valid error receipt, not paid.
    server.reset().await;
    let refused = json!({"checkout_receipt": sign_as("merchant", &json!({"status": "Error", "iss": "m", "iat": NOW,
        "reference": closed.checkout_reference.jwt_hash, "error": "unresolved_constraint", "error_description": "no"}))});
    Mock::given(method("POST")).respond_with(ResponseTemplate::new(409).set_body_json(refused)).mount(&server).await;
    let completion = merchant.complete_checkout(&closed, &credential).await.expect("a refusal is an answer");
    assert!(!completion.is_paid());
    assert_eq!(code(completion.checkout_receipt.ensure_success()), "ap2_receipt_error");

    // An answer longer than any receipt is refused with the provider's bad answer, not buffered.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(vec![b' '; 1024 * 1024 + 1], "application/json"))
        .mount(&server)
        .await;
    let error = cp(&server).request_credential(&closed).await.map(|_| ()).expect_err("too long");
    assert_eq!(error.code(), "ap2_provider_bad_response");
    assert!(error.to_string().contains("answer too large"), "{error}");

    // Nobody listening.
    let unreachable =
        ProviderConfig { base_url: "http://127.0.0.1:9".into(), timeout: Duration::from_secs(2), resolver: None };
    let client = CredentialProviderClient::new(&unreachable, vec![], ConformanceSink::disabled()).expect("client");
    assert_eq!(code(client.request_credential(&closed).await), "ap2_provider_unreachable");
}

// ---- v0.1 ----

/// Re-signs a cart's contents (JSON text, numbers as written) as the merchant would.
fn sign_cart(contents_text: &str, exp: i64) -> String {
    let contents: Value = serde_json::from_str(contents_text).expect("contents JSON");
    let canonical = serde_json_canonicalizer::to_string(&contents).expect("JCS");
    let claims = json!({"iss": "https://demo-merchant.example", "aud": "spendcap", "iat": 1_780_000_000, "exp": exp,
        "cart_hash": hex::encode(Sha256::digest(canonical.as_bytes()))});
    format!(r#"{{"contents": {contents_text}, "merchant_authorization": "{}"}}"#, sign_as("merchant", &claims))
}

fn cart_contents_text() -> String {
    let cart = fixture("v0.1/cart_mandate.json");
    let start = cart.find('{').expect("object") + 1;
    let start = start + cart[start..].find('{').expect("contents");
    let end = cart.rfind(",\n  \"merchant_authorization\"").expect("authorization");
    cart[start..end].to_owned()
}

fn v01_params() -> v01::PaymentMandateParams {
    v01::PaymentMandateParams {
        payment_mandate_id: "pm_1".into(),
        method_name: "CARD".into(),
        method_details: Some(serde_json::Map::from_iter([("token".to_owned(), json!("card_4242"))])),
        merchant_agent: "demo-merchant-agent".into(),
        audience: "credential-provider".into(),
        nonce: "nonce-v01".into(),
    }
}

#[test]
fn ap2_v01_cart_to_payment_mandate_round_trip() {
    let cart_json = fixture("v0.1/cart_mandate.json");
    let cart = v01::verify_cart_mandate(&cart_json, &[public("merchant")], NOW).expect("the fixture cart verifies");
    assert_eq!(cart.total.get(), 126_090_000, "126.09 dollars, exactly");
    assert_eq!(cart.intent.amount, cart.total);
    assert_eq!(cart.intent.service, "Demo Merchant");

    let dir = conformance_dir("v01");
    let agent = private("agent");
    let mandate = v01::create_payment_mandate(&agent, &cart, &v01_params(), NOW, &ConformanceSink::to_dir(&dir))
        .expect("creates");
    let contents = &mandate.payment_mandate_contents;
    assert_eq!(contents.payment_details_id, "order_shoes_123");
    assert_eq!(contents.payment_details_total.amount.value.as_str(), "126.09");
    assert_eq!(contents.timestamp.as_deref(), Some("2026-05-28T20:27:40Z"));

    // By hand: the cart hash is SHA-256 of the JCS form of the CartMandate as received.
    let whole: Value = serde_json::from_str(&cart_json).expect("JSON");
    let cart_digest = Sha256::digest(serde_json_canonicalizer::to_string(&whole).expect("JCS").as_bytes());
    assert_eq!(contents.cart_mandate_hash.as_deref(), Some(hex::encode(cart_digest).as_str()));
    // user_authorization is the agent's ES256 signature over both hashes.
    let (header, claims) =
        verify_by_hand(mandate.user_authorization.as_deref().expect("authorization"), agent.public_jwk());
    assert_eq!(header["kid"], json!(agent.thumbprint()));
    let contents_json = serde_json::to_value(contents).expect("JSON");
    let contents_digest = Sha256::digest(serde_json_canonicalizer::to_string(&contents_json).expect("JCS").as_bytes());
    assert_eq!(claims["transaction_data"], json!([b64(&cart_digest), b64(&contents_digest)]));
    assert_eq!(claims["aud"], "credential-provider");
    assert_eq!(claims["nonce"], "nonce-v01");

    assert_eq!(
        code(v01::verify_user_authorization(&mandate, &cart, agent.public_jwk(), "credential-provider", "nonce-v01")),
        "ok"
    );
    let mut inflated = mandate.clone();
    inflated.payment_mandate_contents.payment_details_total.amount.value = JsonDecimal::parse("1.00").expect("number");
    assert_eq!(
        code(v01::verify_user_authorization(&inflated, &cart, agent.public_jwk(), "credential-provider", "nonce-v01")),
        "ap2_binding_mismatch"
    );

    // Recorded for the conformance tool, with the total written as it was read.
    let recorded = files_in(&dir, "ap2-v0.1", "PaymentMandate");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["payment_mandate_contents"]["payment_details_total"]["amount"]["value"], json!(126.09));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ap2_v01_carts_are_refused_when_tampered_expired_or_inexact() {
    let merchant = [public("merchant")];
    let verify = |json: &str, now: i64| code(v01::verify_cart_mandate(json, &merchant, now));
    let genuine = fixture("v0.1/cart_mandate.json");
    assert_eq!(verify(&genuine, NOW), "ok");
    // A price edited after the merchant signed.
    assert_eq!(verify(&genuine.replace("126.09", "26.09"), NOW), "ap2_binding_mismatch");
    // The merchant authorization or the cart itself expired.
    assert_eq!(verify(&genuine, 1_780_000_900), "ap2_expired");
    // Signed by another key; no signature at all.
    let contents = cart_contents_text();
    let resigned = sign_cart(&contents, NOW + 600);
    assert_eq!(verify(&resigned, NOW), "ok");
    let resigned_by_attacker = {
        let cart: Value = serde_json::from_str(&resigned).expect("JSON");
        let jwt = cart["merchant_authorization"].as_str().expect("jwt");
        let payload: Value = serde_json::from_slice(&unb64(jwt.split('.').nth(1).expect("payload"))).expect("claims");
        let attacker_jwt = sign_as("attacker", &payload);
        resigned.replace(jwt, &attacker_jwt)
    };
    assert_eq!(verify(&resigned_by_attacker, NOW), "ap2_bad_signature");
    assert_eq!(verify(&format!(r#"{{"contents": {contents}}}"#), NOW), "ap2_invalid_cart");

    // Exact decimals: a sub-micro fraction and exponent notation are refused, not rounded.
    let total_text = |text: &str| contents.replace("\"value\": 126.09", &format!("\"value\": {text}"));
    assert_eq!(verify(&sign_cart(&total_text("126.0900001"), NOW + 600), NOW), "ap2_invalid_amount");
    assert_eq!(verify(&sign_cart(&total_text("1.2609e2"), NOW + 600), NOW), "ap2_invalid_amount");
    let cart = v01::verify_cart_mandate(&sign_cart(&total_text("0.1"), NOW + 600), &merchant, NOW).expect("verifies");
    assert_eq!(cart.total.get(), 100_000);
    let cart =
        v01::verify_cart_mandate(&sign_cart(&total_text("12.345678"), NOW + 600), &merchant, NOW).expect("verifies");
    assert_eq!(cart.total.get(), 12_345_678);
    // The total's currency (the last "USD" before the total's value) in euros.
    let total_at = contents.find("\"value\": 126.09").expect("the total");
    let usd_at = contents[..total_at].rfind("\"USD\"").expect("its currency");
    let euros = format!("{}\"EUR\"{}", &contents[..usd_at], &contents[usd_at + 5..]);
    assert_eq!(verify(&sign_cart(&euros, NOW + 600), NOW), "ap2_currency_mismatch");
}

// ---- conformance ----

/// Records every AP2 message spendcap produces into one folder for `../shared/tools/conform`.
/// The folder is printed; the tool is run on it by hand (it needs a Python environment).
#[tokio::test]
async fn ap2_records_messages_for_the_conformance_tool() {
    let dir = std::env::temp_dir().join(format!("spendcap-ap2-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sink = ConformanceSink::to_dir(&dir).also_to(ConformanceSink::test_dir());
    let closed = closed_mandates();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ap2/v0.2/payment-credentials"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"payment_token": "tok"})))
        .mount(&server)
        .await;
    let receipts = json!({
        "checkout_receipt": sign_as("merchant", &checkout_receipt(&closed.checkout_reference.jwt_hash)),
        "payment_receipt": sign_as("processor", &payment_receipt(&closed.payment_reference.jwt_hash, "Success")),
    });
    Mock::given(method("POST"))
        .and(path("/ap2/v0.2/checkouts/chk_7f3a/complete"))
        .respond_with(ResponseTemplate::new(200).set_body_json(receipts))
        .mount(&server)
        .await;
    let cp = CredentialProviderClient::new(&provider(&server), vec![public("credential_provider")], sink.clone())
        .expect("client");
    let merchant =
        MerchantClient::new(&provider(&server), vec![public("merchant")], vec![public("processor")], sink.clone())
            .expect("client");
    let CredentialOutcome::Issued(credential) = cp.request_credential(&closed).await.expect("answer") else {
        panic!("expected a token");
    };
    assert!(merchant.complete_checkout(&closed, &credential).await.expect("receipts").is_paid());
    let cart = v01::verify_cart_mandate(&fixture("v0.1/cart_mandate.json"), &[public("merchant")], NOW).expect("cart");
    v01::create_payment_mandate(&private("agent"), &cart, &v01_params(), NOW, &sink).expect("mandate");

    for (protocol, message_type) in [
        ("ap2", "open_payment_mandate"),
        ("ap2", "payment_mandate"),
        ("ap2", "open_checkout_mandate"),
        ("ap2", "checkout_mandate"),
        ("ap2-v0.1", "PaymentMandate"),
    ] {
        assert!(!files_in(&dir, protocol, message_type).is_empty(), "{protocol}/{message_type} recorded");
    }
    println!("AP2 conformance records in {}", dir.display());
}
