//! What spendcap puts on the wire, and what it never shows.

use std::collections::BTreeMap;

use super::super::delegate::rfc3339_utc;
use super::super::{
    ApiKey, CancelReason, CancelSessionRequest, CardDetails, CardFunding, CardNumberType,
    CheckoutSessionCompleteRequest, CurrencyPolicy, DelegatePaymentRequest, DelegatedToken, Delegation, IdempotencyKey,
    RiskSignal, SessionTotal,
};
use super::{session, test_card, TEST_CARD_NUMBER, TEST_CVC};
use crate::Micros;

fn ready_total() -> SessionTotal {
    super::super::session_total(&session("session_ready.json"), &CurrencyPolicy::usd_only()).expect("total")
}

/// 2025-10-09T08:53:20.999Z.
const EXPIRES_AT_MS: u64 = 1_760_000_000_999;

fn delegation_request(risk_signals: Vec<RiskSignal>) -> Result<DelegatePaymentRequest, super::super::AcpError> {
    let ready = session("session_ready.json");
    let handler = super::super::pick_delegate_handler(&ready, "stripe").expect("handler");
    let card = test_card();
    let total = ready_total();
    let address = billing_address();
    DelegatePaymentRequest::for_session(Delegation {
        card: &card,
        billing_address: Some(&address),
        total: &total,
        handler,
        expires_at_ms: EXPIRES_AT_MS,
        risk_signals,
        metadata: BTreeMap::from([("agent_id".to_owned(), "agent_7".to_owned())]),
    })
}

fn billing_address() -> super::super::Address {
    super::super::Address {
        name: "Ada Lovelace".into(),
        line_one: "1234 Chat Road".into(),
        line_two: None,
        city: "San Francisco".into(),
        state: "CA".into(),
        country: "US".into(),
        postal_code: "94131".into(),
    }
}

#[test]
fn acp_delegation_allows_exactly_the_held_total_for_one_session_and_merchant() {
    let request = delegation_request(vec![RiskSignal::cap_authorized()]).expect("request");
    let body = serde_json::to_value(&request).expect("serialize");
    assert_eq!(
        body["allowance"],
        serde_json::json!({
            "reason": "one_time",
            "max_amount": 480,
            "currency": "usd",
            "checkout_session_id": "checkout_session_123",
            "merchant_id": "acct_1234567890",
            "expires_at": "2025-10-09T08:53:20Z",
        })
    );
    assert_eq!(
        body["payment_method"],
        serde_json::json!({
            "type": "card",
            "card_number_type": "fpan",
            "number": TEST_CARD_NUMBER,
            "exp_month": "11",
            "exp_year": "2026",
            "name": "Jane Doe",
            "cvc": TEST_CVC,
            "iin": "424242",
            "display_card_funding_type": "credit",
            "display_brand": "visa",
            "display_last4": "4242",
            "metadata": {},
            "virtual": false,
        })
    );
    assert_eq!(
        body["risk_signals"],
        serde_json::json!([{ "type": "card_testing", "score": 0, "action": "authorized" }])
    );
    assert_eq!(
        body["metadata"],
        serde_json::json!({
            "agent_id": "agent_7",
            "checkout_session_id": "checkout_session_123",
            "handler_id": "card_tokenized",
        })
    );
    assert_eq!(body["billing_address"]["country"], "US");
    assert!(body["billing_address"].get("line_two").is_none(), "absent, not null");

    assert_eq!(delegation_request(vec![]).map_err(|e| e.code()).err(), Some("acp_invalid_input"));
}

#[test]
fn acp_delegation_needs_a_merchant_to_bind_the_token_to() {
    let ready = session("session_ready.json");
    let mut handler = super::super::pick_delegate_handler(&ready, "stripe").expect("handler").clone();
    handler.config.remove("merchant_id");
    let card = test_card();
    let total = ready_total();
    let result = DelegatePaymentRequest::for_session(Delegation {
        card: &card,
        billing_address: None,
        total: &total,
        handler: &handler,
        expires_at_ms: EXPIRES_AT_MS,
        risk_signals: vec![RiskSignal::cap_authorized()],
        metadata: BTreeMap::new(),
    });
    assert_eq!(result.map_err(|e| e.code()).err(), Some("acp_invalid_input"));
}

#[test]
fn acp_secrets_never_reach_debug_output() {
    let card = test_card();
    let request = delegation_request(vec![RiskSignal::cap_authorized()]).expect("request");
    let complete = CheckoutSessionCompleteRequest::with_delegated_token(
        "card_tokenized",
        DelegatedToken::new("vt_01J8Z3WXYZ9ABC"),
        None,
    );
    let api_key = ApiKey::new("sk_live_very_secret").expect("key");
    let shown = format!("{card:?} {card:#?} {request:?} {complete:?} {api_key:?}");
    for secret in [TEST_CARD_NUMBER, "424242424242", "vt_01J8Z3WXYZ9ABC", "sk_live_very_secret", "2026"] {
        assert!(!shown.contains(secret), "{secret:?} shown in {shown}");
    }
    assert!(!format!("{card:?}").contains(TEST_CVC), "the cvc is shown");
    assert!(shown.contains("last4 4242"), "the last four digits identify the card: {shown}");
    // The token itself does reach the wire, where it belongs.
    let body = serde_json::to_value(&complete).expect("serialize");
    assert_eq!(body["payment_data"]["instrument"]["credential"]["token"], "vt_01J8Z3WXYZ9ABC");
}

#[test]
fn acp_card_configuration_is_validated_without_echoing_it() {
    let card = |number: &str, month: &str, year: &str| {
        CardDetails::new(number, month, year, CardFunding::Debit)
            .map(|c| c.last4().to_owned())
            .map_err(|e| e.to_string())
    };
    assert_eq!(card(TEST_CARD_NUMBER, "01", "2030"), Ok("4242".into()));
    assert_eq!(card("5555555555554444", "12", "2030"), Ok("4444".into()));
    for (number, month, year) in [
        ("4242424242424241", "11", "2030"), // Luhn
        ("4242 4242 4242 4242", "11", "2030"),
        ("42424242424", "11", "2030"),
        (TEST_CARD_NUMBER, "13", "2030"),
        (TEST_CARD_NUMBER, "00", "2030"),
        (TEST_CARD_NUMBER, "1", "2030"),
        (TEST_CARD_NUMBER, "+1", "2030"),
        (TEST_CARD_NUMBER, "11", "30"),
    ] {
        let error = card(number, month, year).expect_err("invalid card");
        assert!(!error.contains("4242"), "error repeats the number: {error}");
    }
    assert!(test_card().with_cvc("12").is_err());
    assert!(test_card().with_cvc("12a").is_err());
    assert!(test_card().with_cvc("1234").is_ok());

    let config = serde_json::json!({
        "number": "5555555555554444", "number_type": "network_token", "exp_month": "02", "exp_year": "2031",
        "funding": "prepaid", "brand": "Mastercard", "virtual": true, "metadata": { "card_origin": "config" }
    });
    let card: CardDetails = serde_json::from_value(config.clone()).expect("card from config");
    let wire = serde_json::to_value(&card).expect("serialize");
    assert_eq!(wire["card_number_type"], "network_token");
    assert!(wire.get("iin").is_none(), "a network token has no issuer identification number");
    assert!(wire.get("cvc").is_none());
    assert_eq!((wire["display_brand"].as_str(), wire["virtual"].as_bool()), (Some("mastercard"), Some(true)));
    assert_eq!(card.clone().with_number_type(CardNumberType::Fpan).last4(), "4444");

    let mut typo = config;
    typo["cvv"] = "123".into();
    assert!(serde_json::from_value::<CardDetails>(typo).is_err(), "unknown fields are refused");
}

#[test]
fn acp_timestamps_are_rfc3339_utc() {
    assert_eq!(rfc3339_utc(0).as_deref(), Ok("1970-01-01T00:00:00Z"));
    assert_eq!(rfc3339_utc(951_782_400_000).as_deref(), Ok("2000-02-29T00:00:00Z"));
    assert_eq!(rfc3339_utc(EXPIRES_AT_MS).as_deref(), Ok("2025-10-09T08:53:20Z"));
    assert_eq!(rfc3339_utc(4_102_444_799_000).as_deref(), Ok("2099-12-31T23:59:59Z"));
    assert_eq!(rfc3339_utc(253_402_300_799_000).as_deref(), Ok("9999-12-31T23:59:59Z"));
    assert!(rfc3339_utc(253_402_300_800_000).is_err());
}

#[test]
fn acp_cancel_and_complete_bodies_have_the_schema_shape() {
    assert_eq!(serde_json::to_value(CancelSessionRequest::default()).expect("serialize"), serde_json::json!({}));
    let long = "é".repeat(600);
    let cancel = CancelSessionRequest::with_reason(CancelReason::Other, Some(&long));
    let body = serde_json::to_value(&cancel).expect("serialize");
    assert_eq!(body["intent_trace"]["reason_code"], "other");
    assert_eq!(body["intent_trace"]["trace_summary"].as_str().map(|s| s.chars().count()), Some(500));

    let complete = CheckoutSessionCompleteRequest::with_delegated_token(
        "card_tokenized",
        DelegatedToken::new("vt_1"),
        Some(billing_address()),
    );
    assert_eq!(
        serde_json::to_value(&complete).expect("serialize"),
        serde_json::json!({
            "payment_data": {
                "handler_id": "card_tokenized",
                "instrument": { "type": "card", "credential": { "type": "spt", "token": "vt_1" } },
                "billing_address": {
                    "name": "Ada Lovelace", "line_one": "1234 Chat Road", "city": "San Francisco",
                    "state": "CA", "country": "US", "postal_code": "94131"
                }
            }
        })
    );
}

#[test]
fn acp_keys_and_rates_are_checked() {
    assert!(IdempotencyKey::new("hold_01:complete").is_ok());
    assert!(IdempotencyKey::new("k".repeat(255)).is_ok());
    for bad in [String::new(), "k".repeat(256), "has space".into(), "new\nline".into()] {
        assert_eq!(IdempotencyKey::new(bad).map_err(|e| e.code()).err(), Some("acp_invalid_input"));
    }
    assert!(ApiKey::new("").is_err());
    assert!(CurrencyPolicy::usd_only().with_rate("euro", 10_800).is_err());
    assert!(CurrencyPolicy::usd_only().with_rate("eur", 0).is_err());
    assert_eq!(CurrencyPolicy::default().to_micros(1, "usd"), Ok(Micros::new(10_000).expect("micros")));
}
