//! The daemon's checks on sessions, driven by the fixtures.

use std::collections::BTreeMap;

use super::super::{
    completed_order, intent, pick_delegate_handler, require_ready, session_total, verify_unchanged, CheckoutSession,
    CompletedOrder, CurrencyPolicy, SessionStatus, SessionTotal,
};
use super::{fixture, fixtures_dir, session};
use crate::{Micros, Protocol};

/// Runs the checks the daemon makes before holding: ready, total, handler. Returns what it would
/// hold and pay through, or the error code that refuses the payment.
fn pre_payment(text: &str) -> Result<String, String> {
    let session: CheckoutSession = serde_json::from_str(text).map_err(|_| "unparseable".to_owned())?;
    let policy = CurrencyPolicy::usd_only();
    require_ready(&session).map_err(|e| e.code().to_owned())?;
    let total = session_total(&session, &policy).map_err(|e| e.code().to_owned())?;
    let handler = pick_delegate_handler(&session, "stripe").map_err(|e| e.code().to_owned())?;
    Ok(format!("{} {} = {} micros via {}", total.minor_units, total.currency, total.amount, handler.id))
}

/// One line per session fixture; a new case is a new file and a new line here.
#[test]
fn acp_session_fixtures_pass_or_fail_the_pre_payment_checks() {
    let expected: BTreeMap<&str, Result<&str, &str>> = BTreeMap::from([
        ("session_ready.json", Ok("480 usd = 4800000 micros via card_tokenized")),
        ("session_ready_no_delegate_handler.json", Err("acp_no_delegate_handler")),
        ("session_not_ready.json", Err("acp_session_not_ready")),
        ("session_wrong_currency.json", Err("acp_currency_not_supported")),
        ("session_fractional_total.json", Err("acp_bad_total")),
        ("session_without_total.json", Err("acp_bad_total")),
        ("session_malformed_total_string.json", Err("unparseable")),
        ("session_malformed_missing_fields.json", Err("unparseable")),
        ("session_completed.json", Err("acp_session_not_ready")),
        ("session_completed_total_changed.json", Err("acp_session_not_ready")),
        ("session_canceled.json", Err("acp_session_not_ready")),
    ]);
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).expect("fixtures/acp exists") {
        let name = entry.expect("directory entry").file_name().to_string_lossy().into_owned();
        if !name.starts_with("session_") {
            continue;
        }
        let want = expected.get(name.as_str()).unwrap_or_else(|| panic!("fixture {name} has no expected outcome"));
        let got = pre_payment(&fixture(&name));
        assert_eq!(got.as_deref().map_err(String::as_str), *want, "fixture {name}");
        seen.push(name);
    }
    assert_eq!(seen.len(), expected.len(), "every expected fixture exists: saw {seen:?}");
}

#[test]
fn acp_total_is_converted_exactly_and_only_with_a_known_currency() {
    let ready = session("session_ready.json");
    let total = session_total(&ready, &CurrencyPolicy::usd_only()).expect("usd total");
    assert_eq!(
        total,
        SessionTotal {
            checkout_session_id: "checkout_session_123".into(),
            minor_units: 480,
            currency: "usd".into(),
            amount: Micros::new(4_800_000).expect("amount"),
        }
    );

    let eur = session("session_wrong_currency.json");
    let error = session_total(&eur, &CurrencyPolicy::usd_only()).expect_err("eur without a rate");
    assert_eq!(error.code(), "acp_currency_not_supported");
    assert!(error.to_string().contains("\"eur\""), "{error}");
    // With a configured rate (a euro cent = 10,800 micro-USD) the same session converts exactly.
    let policy = CurrencyPolicy::usd_only().with_rate("EUR", 10_800).expect("rate");
    let total = session_total(&eur, &policy).expect("eur with a rate");
    assert_eq!((total.minor_units, total.currency.as_str(), total.amount.get()), (480, "eur", 5_184_000));

    // An uppercase code names the same currency.
    let mut upper = session("session_ready.json");
    upper.currency = "USD".into();
    assert_eq!(session_total(&upper, &CurrencyPolicy::usd_only()).map(|t| t.currency), Ok("usd".into()));
}

fn with_total_amount(amount: serde_json::Value) -> CheckoutSession {
    let mut json: serde_json::Value = serde_json::from_str(&fixture("session_ready.json")).expect("fixture");
    let totals = json["totals"].as_array_mut().expect("totals");
    for total in totals.iter_mut().filter(|t| t["type"] == "total") {
        total["amount"] = amount.clone();
    }
    serde_json::from_value(json).expect("session")
}

#[test]
fn acp_unusable_totals_are_refused() {
    let policy = CurrencyPolicy::usd_only();
    let code =
        |session: &CheckoutSession| session_total(session, &policy).map(|t| t.amount.get()).map_err(|e| e.code());
    assert_eq!(code(&with_total_amount(serde_json::json!(1))), Ok(10_000));
    assert_eq!(code(&with_total_amount(serde_json::json!(0))), Err("acp_bad_total"));
    assert_eq!(code(&with_total_amount(serde_json::json!(-480))), Err("acp_bad_total"));
    assert_eq!(code(&with_total_amount(serde_json::json!(4.8))), Err("acp_bad_total"));
    // 10^11 cents is one billion dollars, the largest amount spendcap represents; one more is too much.
    assert_eq!(code(&with_total_amount(serde_json::json!(100_000_000_000u64))), Ok(1_000_000_000_000_000));
    assert_eq!(code(&with_total_amount(serde_json::json!(100_000_000_001u64))), Err("acp_bad_total"));
    assert_eq!(code(&with_total_amount(serde_json::json!(u64::MAX))), Err("acp_bad_total"));

    let mut two_totals = session("session_ready.json");
    let extra = two_totals.totals.iter().find(|t| t.kind == "total").cloned().expect("a total");
    two_totals.totals.push(extra);
    assert_eq!(code(&two_totals), Err("acp_bad_total"));
}

#[test]
fn acp_not_ready_sessions_say_why() {
    let error = require_ready(&session("session_not_ready.json")).expect_err("not ready");
    assert_eq!(error.code(), "acp_session_not_ready");
    assert_eq!(
        error.to_string(),
        "checkout session is not_ready_for_payment, not ready_for_payment (missing: A shipping address is required.)"
    );

    // A status from a newer protocol version is kept, and is not ready.
    let mut json: serde_json::Value = serde_json::from_str(&fixture("session_ready.json")).expect("fixture");
    json["status"] = "awaiting_wallet".into();
    let future: CheckoutSession = serde_json::from_value(json).expect("session");
    assert_eq!(future.status, SessionStatus::Other("awaiting_wallet".into()));
    assert_eq!(require_ready(&future).map_err(|e| e.code()), Err("acp_session_not_ready"));
}

fn handler(
    id: &str,
    name: &str,
    psp: &str,
    display_order: Option<i64>,
    merchant_id: Option<&str>,
) -> serde_json::Value {
    let mut config = serde_json::json!({});
    if let Some(merchant_id) = merchant_id {
        config["merchant_id"] = merchant_id.into();
    }
    let mut handler = serde_json::json!({
        "id": id, "name": name, "version": "2026-01-22", "spec": "https://acp.dev/handlers/tokenized.card",
        "requires_delegate_payment": true, "requires_pci_compliance": false, "psp": psp,
        "config_schema": "https://acp.dev/schemas/handlers/tokenized.card/config.json",
        "instrument_schemas": [], "config": config,
    });
    if let Some(order) = display_order {
        handler["display_order"] = order.into();
    }
    handler
}

fn with_handlers(handlers: Vec<serde_json::Value>) -> CheckoutSession {
    let mut json: serde_json::Value = serde_json::from_str(&fixture("session_ready.json")).expect("fixture");
    json["capabilities"]["payment"]["handlers"] = handlers.into();
    serde_json::from_value(json).expect("session")
}

#[test]
fn acp_the_delegate_handler_is_a_tokenized_card_of_our_psp_in_the_merchants_order() {
    let ready = session("session_ready.json");
    // The fixture's seller-backed saved card comes first in display order, but it is not a
    // tokenized card handler, so the delegated token could not pay through it.
    let picked = pick_delegate_handler(&ready, "Stripe").expect("a handler");
    assert_eq!((picked.id.as_str(), picked.merchant_id()), ("card_tokenized", Some("acct_1234567890")));
    assert_eq!(pick_delegate_handler(&ready, "adyen").map_err(|e| e.code()).err(), Some("acp_no_delegate_handler"));

    let session = with_handlers(vec![
        handler("unordered", "dev.acp.tokenized.card", "stripe", None, Some("acct_a")),
        handler("second", "dev.acp.tokenized.card", "stripe", Some(5), Some("acct_b")),
        handler("first", "dev.acp.tokenized.card", "stripe", Some(2), Some("acct_c")),
        handler("no_merchant", "dev.acp.tokenized.card", "stripe", Some(0), None),
        handler("wallet", "com.example.wallet", "stripe", Some(-1), Some("acct_d")),
    ]);
    assert_eq!(pick_delegate_handler(&session, "stripe").map(|h| h.id.as_str()), Ok("first"));

    let mut not_delegated = handler("direct", "dev.acp.tokenized.card", "stripe", Some(0), Some("acct_e"));
    not_delegated["requires_delegate_payment"] = false.into();
    let session = with_handlers(vec![not_delegated]);
    assert_eq!(pick_delegate_handler(&session, "stripe").map_err(|e| e.code()).err(), Some("acp_no_delegate_handler"));
}

#[test]
fn acp_a_completion_at_another_total_is_refused() {
    let policy = CurrencyPolicy::usd_only();
    let read = session_total(&session("session_ready.json"), &policy).expect("read total");

    assert_eq!(verify_unchanged(&read, &session("session_completed.json")), Ok(()));

    let error = verify_unchanged(&read, &session("session_completed_total_changed.json")).expect_err("changed");
    assert_eq!(error.code(), "acp_total_changed");
    assert_eq!(
        error,
        super::super::AcpError::TotalChanged {
            read_minor: 480,
            read_currency: "usd".into(),
            completed_minor: 830,
            completed_currency: "usd".into(),
        }
    );

    let mut other_currency = session("session_completed.json");
    other_currency.currency = "eur".into();
    assert_eq!(verify_unchanged(&read, &other_currency).map_err(|e| e.code()), Err("acp_total_changed"));

    let mut other_session = session("session_completed.json");
    other_session.id = "checkout_session_999".into();
    assert_eq!(verify_unchanged(&read, &other_session).map_err(|e| e.code()), Err("acp_session_mismatch"));
}

#[test]
fn acp_only_a_completed_session_with_an_order_has_one() {
    let completed = session("session_completed.json");
    assert_eq!(
        completed_order(&completed),
        Some(CompletedOrder {
            order_id: "ord_abc123",
            permalink_url: Some("https://www.testshop.com/orders/ord_abc123"),
        })
    );
    assert_eq!(completed_order(&session("session_ready.json")), None);
    assert_eq!(completed_order(&session("session_canceled.json")), None);

    let mut without_order = completed.clone();
    without_order.order = None;
    assert_eq!(completed_order(&without_order), None);

    let mut without_permalink = completed;
    if let Some(order) = without_permalink.order.as_mut() {
        order.permalink_url = None;
    }
    assert_eq!(completed_order(&without_permalink).map(|o| (o.order_id, o.permalink_url)), Some(("ord_abc123", None)));
}

#[test]
fn acp_intent_holds_the_total_for_the_merchant() {
    let held = intent(&session("session_ready.json"), "testshop.com", &CurrencyPolicy::usd_only()).expect("intent");
    assert_eq!(held.amount, Micros::new(4_800_000).expect("amount"));
    assert_eq!(held.service, "testshop.com");
    assert_eq!(held.protocol, Protocol::Acp);
    assert_eq!(
        held.details,
        BTreeMap::from([
            ("checkout_session_id".to_owned(), "checkout_session_123".to_owned()),
            ("currency".to_owned(), "usd".to_owned()),
            ("total_minor_units".to_owned(), "480".to_owned()),
        ])
    );
    let eur = intent(&session("session_wrong_currency.json"), "testshop.com", &CurrencyPolicy::usd_only());
    assert_eq!(eur.map_err(|e| e.code()).err(), Some("acp_currency_not_supported"));
}
