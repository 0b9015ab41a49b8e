//! Data-driven tests: every file in `fixtures/x402/parse/` is one 402 response and the outcome the
//! daemon must reach for it. Adding a case is adding a file:
//!
//! ```json
//! {
//!   "description": "what the case is about",
//!   "headers": {"PAYMENT-REQUIRED": "<raw header value>"},    // optional
//!   "payment_required": { ... },   // optional: JSON sent base64-encoded as PAYMENT-REQUIRED
//!   "body": { ... },               // optional: JSON body; or "body_text": "<raw body>"
//!   "policy": {"max_payment_micros": 1000000, "max_validity_secs": 300},   // optional
//!   "expect": "ok" | "<X402Error code>",
//!   "chosen": {"index": 0, "amount_micros": 10000, "network": "eip155:84532", "chain_id": 84532,
//!              "pay_to": "0x...", "timeout_secs": 60}   // with "ok"
//! }
//! ```
//!
//! An `ok` case is then paid end to end: signed with the public test key, encoded into its header,
//! decoded again and checked (amount, payee, validity window, `accepted` echo, payment id, and the
//! signature recovering to the signer's address).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::conformance::ConformanceSink;
use crate::money::Micros;

/// The public Hardhat/Anvil key #0 (also the spec's test vector key); address 0xf39F…2266.
const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const NOW_SECS: u64 = 1_740_672_000;
const NONCE: &str = "0x5c1f1d5e6a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d";
const PAYMENT_ID: &str = "spendcap_fixture_payment_0001";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    payment_required: Option<Value>,
    body: Option<Value>,
    body_text: Option<String>,
    #[serde(default)]
    policy: PolicyOverrides,
    expect: String,
    chosen: Option<Expected>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyOverrides {
    max_payment_micros: Option<u64>,
    max_validity_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    index: usize,
    amount_micros: u64,
    network: String,
    chain_id: u64,
    pay_to: String,
    timeout_secs: u64,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/x402/parse")
}

fn load_cases() -> Vec<(String, Case)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixtures/x402/parse exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_stem().expect("file name").to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("readable fixture");
            let case = serde_json::from_str(&text).unwrap_or_else(|err| panic!("fixture {name} is malformed: {err}"));
            (name, case)
        })
        .collect()
}

impl Case {
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("fixture header name");
            headers.insert(name, HeaderValue::from_str(value).expect("fixture header value"));
        }
        if let Some(required) = &self.payment_required {
            let json = serde_json::to_vec(required).expect("fixture JSON serializes");
            headers.insert(PAYMENT_REQUIRED, HeaderValue::from_str(&STANDARD.encode(json)).expect("base64 is ASCII"));
        }
        headers
    }

    fn body(&self) -> Vec<u8> {
        match (&self.body, &self.body_text) {
            (Some(json), None) => serde_json::to_vec(json).expect("fixture JSON serializes"),
            (None, Some(text)) => text.clone().into_bytes(),
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => panic!("a fixture has `body` or `body_text`, not both"),
        }
    }

    fn policy(&self) -> Policy {
        let max_payment = Micros::new(self.policy.max_payment_micros.unwrap_or(1_000_000)).expect("fixture maximum");
        Policy::with_default_assets(max_payment, self.policy.max_validity_secs.unwrap_or(300))
    }

    /// The 402 as the server meant it, as plain JSON: what `accepted` must echo.
    fn raw_payment_required(&self) -> Value {
        if let Some(required) = &self.payment_required {
            return required.clone();
        }
        if let Some(header) = self.headers.get("PAYMENT-REQUIRED") {
            let padded = format!("{header}{}", "=".repeat((4 - header.len() % 4) % 4));
            return serde_json::from_slice(&STANDARD.decode(padded).expect("fixture base64")).expect("fixture JSON");
        }
        self.body.clone().expect("an ok fixture has a PaymentRequired somewhere")
    }

    fn answer(&self) -> Result<(PaymentRequired, Choice), X402Error> {
        let required = parse_payment_required(&self.headers(), &self.body())?;
        let choice = choose(&required, &self.policy())?;
        Ok((required, choice))
    }
}

fn test_terms() -> PaymentTerms {
    PaymentTerms {
        nonce: NONCE.parse().expect("valid nonce"),
        now_secs: NOW_SECS,
        payment_id: Some(PAYMENT_ID.parse().expect("valid payment id")),
    }
}

#[test]
fn every_fixture_reaches_its_expected_outcome() {
    let cases = load_cases();
    assert!(cases.len() >= 40, "expected the fixture set, found {} files in {:?}", cases.len(), fixture_dir());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let outcome = case.answer();
        match (case.expect.as_str(), outcome) {
            ("ok", Ok((required, choice))) => {
                if let Err(problem) = check_payment(case, &required, &choice) {
                    failures.push(format!("{name}: {problem}"));
                }
            }
            ("ok", Err(err)) => failures.push(format!("{name}: expected ok, got {} ({err})", err.code())),
            (code, Ok(_)) => failures.push(format!("{name}: expected {code}, got ok")),
            (code, Err(err)) if err.code() != code => {
                failures.push(format!("{name}: expected {code}, got {} ({err})", err.code()))
            }
            (_, Err(_)) => {}
        }
        if case.expect == "ok" && case.chosen.is_none() {
            failures.push(format!("{name}: an ok case must say what is chosen"));
        }
        assert!(!case.description.is_empty(), "{name}: fixture needs a description");
    }
    assert!(failures.is_empty(), "fixture failures:\n{}", failures.join("\n"));
}

/// Pays an accepted case end to end and checks what would go on the wire.
fn check_payment(case: &Case, required: &PaymentRequired, choice: &Choice) -> Result<(), String> {
    let expected = case.chosen.as_ref().ok_or("no `chosen` in an ok case")?;
    let raw = case.raw_payment_required();
    let raw_requirement = &raw["accepts"][expected.index];
    let expected_pay_to = parse_address("payTo", &expected.pay_to).map_err(|e| e.to_string())?;

    let facts = [
        ("amount", choice.amount().get().to_string(), expected.amount_micros.to_string()),
        ("network", choice.network().to_owned(), expected.network.clone()),
        ("chain id", choice.chain_id().to_string(), expected.chain_id.to_string()),
        ("payTo", choice.pay_to().to_string(), expected_pay_to.to_string()),
        ("timeout", choice.timeout_secs().to_string(), expected.timeout_secs.to_string()),
        (
            "asset",
            choice.asset().to_string(),
            parse_address("asset", raw_requirement["asset"].as_str().unwrap_or(""))
                .map_err(|e| e.to_string())?
                .to_string(),
        ),
    ];
    for (what, got, want) in facts {
        if got != want {
            return Err(format!("{what}: chose {got}, expected {want}"));
        }
    }

    let signer = EvmSigner::from_hex(TEST_KEY).map_err(|e| e.to_string())?;
    let payment = sign_payment(choice, &signer, &test_terms()).map_err(|e| e.to_string())?;
    let (header_name, header_value) = payment.to_header().map_err(|e| e.to_string())?;
    // The header must be standard padded base64: the strict decoder refuses anything else.
    let sent: Value = serde_json::from_slice(
        &STANDARD
            .decode(header_value.to_str().map_err(|e| e.to_string())?)
            .map_err(|e| format!("header base64: {e}"))?,
    )
    .map_err(|e| format!("header JSON: {e}"))?;

    let exact: ExactEvmPayload =
        serde_json::from_value(sent["payload"].clone()).map_err(|e| format!("payload shape: {e}"))?;
    let authorization = &exact.authorization;
    let recovered = recover_signer(&exact, choice.domain()).map_err(|e| e.to_string())?;
    if recovered != signer.address() || authorization.from != signer.address().to_string() {
        return Err(format!("signature recovers to {recovered}, not the signer {}", signer.address()));
    }
    let expected_domain_name = match expected.chain_id {
        84532 => "USDC",
        _ => "USD Coin",
    };
    if choice.domain().name != expected_domain_name || choice.domain().verifying_contract != choice.asset() {
        return Err(format!("signed under the wrong domain {:?}", choice.domain()));
    }
    if authorization.value != expected.amount_micros.to_string() {
        return Err(format!("authorizes {} atomic units, not {}", authorization.value, expected.amount_micros));
    }
    if parse_address("to", &authorization.to).map_err(|e| e.to_string())? != expected_pay_to {
        return Err(format!("pays {}, not {}", authorization.to, expected.pay_to));
    }
    if authorization.nonce != NONCE || authorization.valid_before != (NOW_SECS + expected.timeout_secs).to_string() {
        return Err(format!("nonce/validBefore not as asked: {authorization:?}"));
    }

    match required {
        PaymentRequired::V1(_) => {
            let want_after = (NOW_SECS - 600).to_string();
            if header_name != X_PAYMENT || sent["x402Version"] != 1 || authorization.valid_after != want_after {
                return Err(format!("v1 payment malformed: {header_name} {sent}"));
            }
            if sent["scheme"] != "exact" || sent["network"] != raw_requirement["network"] {
                return Err(format!("v1 scheme/network not echoed: {sent}"));
            }
        }
        PaymentRequired::V2(_) => {
            if header_name != PAYMENT_SIGNATURE || sent["x402Version"] != 2 || authorization.valid_after != "0" {
                return Err(format!("v2 payment malformed: {header_name} {sent}"));
            }
            if &sent["accepted"] != raw_requirement {
                return Err(format!("accepted {} does not echo {}", sent["accepted"], raw_requirement));
            }
            if sent.get("resource") != raw.get("resource") {
                return Err(format!("resource {:?} does not echo {:?}", sent.get("resource"), raw.get("resource")));
            }
            let declared = raw.get("extensions").and_then(|e| e.get(PAYMENT_IDENTIFIER)).is_some();
            let sent_id = sent.pointer("/extensions/payment-identifier/info/id");
            if declared != (sent_id == Some(&Value::String(PAYMENT_ID.to_owned()))) {
                return Err(format!("payment-identifier declared: {declared}, sent: {sent_id:?}"));
            }
        }
    }
    if serde_json::to_string(&sent).map_err(|e| e.to_string())?.contains("null") {
        return Err(format!("a null went on the wire: {sent}"));
    }
    Ok(())
}

#[test]
fn a_retry_with_the_same_nonce_authorizes_the_same_transfer() {
    let (_, case) = load_cases().into_iter().find(|(name, _)| name == "v2_valid").expect("v2_valid fixture");
    let (_, choice) = case.answer().expect("v2_valid is payable");
    let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
    let first = sign_payment(&choice, &signer, &test_terms()).expect("signs");
    let again = sign_payment(&choice, &signer, &test_terms()).expect("signs");
    assert_eq!(first, again, "same nonce and time: the very same authorization");
    let fresh = PaymentTerms { nonce: Nonce::random(), ..test_terms() };
    let other = sign_payment(&choice, &signer, &fresh).expect("signs");
    assert_ne!(
        first.exact().expect("an exact payment").authorization.nonce,
        other.exact().expect("an exact payment").authorization.nonce
    );
    assert_ne!(first.exact().expect("an exact payment").signature, other.exact().expect("an exact payment").signature);
}

#[test]
fn a_required_payment_identifier_without_an_id_is_refused() {
    let (_, mut case) = load_cases().into_iter().find(|(name, _)| name == "v2_valid").expect("v2_valid fixture");
    let required = case.payment_required.as_mut().expect("v2 fixture");
    required["extensions"]["payment-identifier"]["info"]["required"] = Value::Bool(true);
    let (_, choice) = case.answer().expect("payable");
    let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
    let terms = PaymentTerms { payment_id: None, ..test_terms() };
    assert_eq!(sign_payment(&choice, &signer, &terms).map_err(|e| e.code()), Err("x402_payment_id_required"));
}

/// Records every payable fixture's payment and requirement the way the daemon does, for
/// `../shared/tools/conform <dir printed below>`.
#[test]
fn payments_are_recorded_for_conformance_checking() {
    let dir = std::env::temp_dir().join(format!(
        "spendcap-x402-conformance-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    let sink = ConformanceSink::to_dir(&dir).also_to(ConformanceSink::test_dir());
    let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
    let (mut v1, mut v2) = (0, 0);
    for (_, case) in load_cases().into_iter().filter(|(_, case)| case.expect == "ok") {
        let (required, choice) = case.answer().expect("an ok fixture is payable");
        let payment = sign_payment(&choice, &signer, &test_terms()).expect("signs");
        record_payment(&sink, &payment, &choice);
        match required.version() {
            X402Version::V1 => v1 += 1,
            X402Version::V2 => v2 += 1,
        }
    }
    let count = |kind: &str| std::fs::read_dir(dir.join("x402").join(kind)).map(|entries| entries.count()).unwrap_or(0);
    assert!(v1 > 0 && v2 > 0);
    assert_eq!(count("PaymentPayload"), v2);
    assert_eq!(count("PaymentRequirements"), v2);
    assert_eq!(count("PaymentPayloadV1"), v1);
    assert_eq!(count("PaymentRequirementsV1"), v1);
    println!("x402 conformance samples recorded under {}", dir.display());
}

/// The standalone samples that the integration tests serve must stay payable and decodable.
#[test]
fn standalone_samples_are_payable_and_settlements_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/x402");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
    let policy = Policy::with_default_assets(Micros::new(1_000_000).expect("valid"), 300);

    let mut headers = HeaderMap::new();
    headers.insert(
        PAYMENT_REQUIRED,
        HeaderValue::from_str(&STANDARD.encode(read("v2_payment_required.json"))).expect("ASCII"),
    );
    let v2 = choose(&parse_payment_required(&headers, b"{}").expect("v2 sample parses"), &policy).expect("v2 payable");
    let v1 = choose(
        &parse_payment_required(&HeaderMap::new(), &read("v1_payment_required.json")).expect("v1 parses"),
        &policy,
    )
    .expect("v1 payable");
    assert_eq!((v2.version(), v2.amount().get()), (X402Version::V2, 10_000));
    assert_eq!((v1.version(), v1.amount().get()), (X402Version::V1, 10_000));

    let success = decode_settlement_json(&read("settlement_success.json")).expect("success sample decodes");
    assert!(success.success && success.transaction.starts_with("0x") && success.amount.as_deref() == Some("10000"));
    let failure = decode_settlement_json(&read("settlement_failure.json")).expect("failure sample decodes");
    assert!(!failure.success && failure.transaction.is_empty());
    assert_eq!(failure.error_reason.as_deref(), Some("insufficient_funds"));
}
