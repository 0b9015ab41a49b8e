use http::{HeaderMap, HeaderValue};
use serde_json::json;

use super::*;

fn challenge(id: &str, method: &str, intent: &str, request: serde_json::Value) -> PaymentChallenge {
    let request = ::mpp::Base64UrlJson::from_value(&request).expect("encodes");
    PaymentChallenge::new(id, "api.example", method, intent, request)
}

fn stripe_request(cents: &str) -> serde_json::Value {
    json!({ "amount": cents, "currency": "usd", "methodDetails": { "networkId": "net_1", "paymentMethodTypes": ["card"] } })
}

fn policy(max_micros: u64) -> Policy {
    Policy {
        methods: vec!["stripe".to_owned()],
        currencies: vec!["usd".to_owned()],
        max_payment: Micros::new(max_micros).expect("micros"),
        min_validity_secs: 3,
        default_validity_secs: 300,
    }
}

fn headers_of(challenges: &[PaymentChallenge]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in ::mpp::format_www_authenticate_many(challenges).expect("formats") {
        headers.append(http::header::WWW_AUTHENTICATE, HeaderValue::from_str(&value).expect("ascii"));
    }
    headers
}

#[test]
fn several_challenges_are_read_and_the_cheapest_allowed_one_is_chosen() {
    let tempo = challenge("t1", "tempo", "charge", json!({ "amount": "1", "currency": "0x20c0", "recipient": "0x1" }));
    let session = challenge("s1", "stripe", "session", stripe_request("5"));
    let dear = challenge("d1", "stripe", "charge", stripe_request("50"));
    let cheap = challenge("c1", "stripe", "charge", stripe_request("10"));
    let headers = headers_of(&[tempo, session, dear, cheap]);
    let parsed = parse_challenges(&headers).expect("four challenges");
    assert_eq!(parsed.len(), 4);
    let choice = choose(&parsed, &policy(1_000_000), 1_000).expect("a stripe charge is allowed");
    assert_eq!(choice.challenge.id, "c1");
    assert_eq!(choice.amount.get(), 100_000, "10 cents");
    assert_eq!(choice.network_id, "net_1");
    assert_eq!(choice.expires_at_secs, 1_300);
    let intent = choice.intent("https://api.example/paid");
    assert_eq!(intent.protocol, Protocol::Mpp);
    assert_eq!(intent.service, "api.example");
    assert_eq!(intent.details["challenge_id"], "c1");
}

#[test]
fn policy_refusals_name_their_reason() {
    let only_tempo = [challenge("t1", "tempo", "charge", json!({ "amount": "1", "currency": "usd" }))];
    let err = choose(&only_tempo, &policy(1_000_000), 0).expect_err("tempo is not paid");
    assert_eq!(err.code(), "mpp_no_acceptable_challenge");
    assert!(err.is_policy());
    let euro = [challenge(
        "e1",
        "stripe",
        "charge",
        json!({ "amount": "10", "currency": "eur", "methodDetails": {"networkId": "n"} }),
    )];
    assert_eq!(choose(&euro, &policy(1_000_000), 0).expect_err("eur").code(), "mpp_no_acceptable_challenge");
    let dear = [challenge("d1", "stripe", "charge", stripe_request("500"))];
    let err = choose(&dear, &policy(1_000_000), 0).expect_err("5 USD > 1 USD");
    assert_eq!(err, MppError::OverMaximum { amount: 5_000_000, maximum: 1_000_000 });
    let expired = [challenge("x1", "stripe", "charge", stripe_request("10")).with_expires("1970-01-01T00:00:10Z")];
    assert_eq!(choose(&expired, &policy(1_000_000), 9).expect_err("expires in 1 s").code(), "mpp_challenge_expired");
    let garbled = [challenge("g1", "stripe", "charge", stripe_request("ten"))];
    assert_eq!(
        choose(&garbled, &policy(1_000_000), 0).expect_err("not a number").code(),
        "mpp_no_acceptable_challenge"
    );
}

#[test]
fn a_402_without_payment_challenges_is_named() {
    assert_eq!(parse_challenges(&HeaderMap::new()).expect_err("none"), MppError::NoChallenge);
    let mut headers = HeaderMap::new();
    headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Payment id=\"x\""));
    assert_eq!(parse_challenges(&headers).expect_err("incomplete").code(), "mpp_malformed_challenge");
}

#[test]
fn the_stripe_credential_echoes_the_challenge_and_reads_back_with_the_official_parser() {
    let choice =
        choose(&[challenge("c1", "stripe", "charge", stripe_request("10"))], &policy(1_000_000), 0).expect("allowed");
    let header = stripe_credential(&choice, "spt_abc123", &ConformanceSink::disabled()).expect("credential");
    let credential = parse_authorization(&header).expect("the official parser reads it");
    assert_eq!(credential.challenge.id, "c1");
    assert_eq!(credential.challenge.request.raw(), choice.challenge.request.raw());
    assert_eq!(credential.payload["spt"], "spt_abc123");
    assert_eq!(mask("spt_abc123"), "spt_******");
}

#[test]
fn receipts_are_read_with_the_official_codec() {
    let mut headers = HeaderMap::new();
    assert!(parse_receipt(&headers).expect("no header is no error").is_none());
    let receipt = Receipt::success("stripe", "pi_123");
    headers.insert(
        RECEIPT_HEADER,
        HeaderValue::from_str(&::mpp::format_receipt(&receipt).expect("formats")).expect("ascii"),
    );
    let read = parse_receipt(&headers).expect("readable").expect("present");
    assert_eq!(read.reference, "pi_123");
    headers.insert(RECEIPT_HEADER, HeaderValue::from_static("!!"));
    assert_eq!(parse_receipt(&headers).expect_err("garbled").code(), "mpp_receipt_invalid");
}

#[test]
fn a_receipt_may_report_the_amount_charged() {
    let choice =
        choose(&[challenge("c1", "stripe", "charge", stripe_request("10"))], &policy(1_000_000), 0).expect("allowed");
    let mut receipt = Receipt::success("stripe", "pi_1");
    assert_eq!(receipt_amount(&receipt, &choice), None);
    receipt.extensions.insert("amount".to_owned(), json!("7"));
    assert_eq!(receipt_amount(&receipt, &choice), Some(Micros::new(70_000).expect("micros")));
    receipt.extensions.insert("amount".to_owned(), json!("seven"));
    assert_eq!(receipt_amount(&receipt, &choice), None);
}
