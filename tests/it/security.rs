//! One agent's token against another agent's things, through every protocol endpoint as well as
//! the generic API: agent A can neither read, spend, nor revoke anything of agent B. (Tokens on
//! admin routes, forged tokens and body limits are in `api.rs`; secrets in logs, in
//! `fire.rs::secrets_never_reach_the_logs`; SSRF in `x402.rs`; tampered receipts and mandates in
//! `api.rs` and `ap2.rs`.)

use reqwest::Method;
use serde_json::{json, Value};
use spendcap::sim::ap2::MandateTerms;
use spendcap::sim::{Providers, AP2_CATALOG};

use crate::support::{spawn_app_with, Agent, AppOptions, TestApp};

/// What A tries, the method and path, the body, and the answer expected (status, code).
type Case<'a> = (&'a str, Method, String, Option<Value>, u16, &'a str);

async fn ap2_key(app: &TestApp, agent: &Agent) -> adapters::ap2::Jwk {
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/ap2/key", None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["jwk"].clone()).expect("a public JWK")
}

async fn cart(providers: &Providers) -> String {
    let cart: Value = reqwest::Client::new()
        .post(format!("{}/checkouts", providers.ap2.merchant_base()))
        .json(&json!({ "items": [AP2_CATALOG[0].0] }))
        .send()
        .await
        .expect("cart")
        .json()
        .await
        .expect("json");
    cart["checkout_jwt"].as_str().expect("checkout JWT").to_owned()
}

/// (spent, held) and the log length: what "nothing changed" is checked against.
async fn state_of(app: &TestApp, agent: &Agent) -> (Value, Value, usize) {
    let shown = app.show(&agent.id).await;
    let log = app.log().await;
    (shown["spent_micros"].clone(), shown["held_micros"].clone(), log.len())
}

#[tokio::test]
async fn one_agents_token_reaches_nothing_of_another_agent_through_any_protocol() {
    let providers = Providers::start().await.expect("simulated providers");
    let protocols = providers.protocol_config().expect("configuration");
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;
    let a = app.create_agent("agent-a", 10_000_000, None).await;
    let b = app.create_agent("agent-b", 10_000_000, None).await;
    let terms = MandateTerms { items: &[AP2_CATALOG[0].0], budget_cents: 500, max_payment_cents: 100, valid_secs: 600 };
    let b_mandates = providers.ap2.issue_mandates(&ap2_key(&app, &b).await, &terms).expect("B's mandates");
    let a_key = ap2_key(&app, &a).await;
    assert_ne!(a_key, ap2_key(&app, &b).await, "every agent has its own AP2 key");

    // B pays once, so it has a receipt, a mandate budget and a settled ACP hold.
    let (status, paid) = app
        .agent_call(
            &b.token,
            Method::POST,
            "/v1/ap2/payments",
            Some(json!({ "checkout_jwt": cart(&providers).await, "open_checkout_mandate": b_mandates.checkout,
                         "open_payment_mandate": b_mandates.payment, "task": "b-task" })),
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let (status, bought) = app
        .agent_call(
            &b.token,
            Method::POST,
            "/v1/acp/checkouts",
            Some(json!({ "merchant": spendcap::sim::ACP_MERCHANT, "items": [{ "id": "report_market" }], "task": "b-task" })),
        )
        .await;
    assert_eq!(status, 200, "{bought}");
    let b_session = bought["checkout_session_id"].as_str().expect("session").to_owned();
    let b_hold = bought["hold_id"].as_str().expect("hold").to_owned();
    let before = (state_of(&app, &a).await, state_of(&app, &b).await);
    let paid_before = (providers.ap2.paid_cents(), providers.acp.charged_cents());

    let (open_jwt, _) = b_mandates.payment.split_once('~').expect("SD-JWT");
    let b_mandate_id = adapters::ap2::content_hash(open_jwt);
    let cases: Vec<Case> = vec![
        (
            "spend under B's AP2 mandates (bound to B's key)",
            Method::POST,
            "/v1/ap2/payments".into(),
            Some(json!({ "checkout_jwt": cart(&providers).await, "open_checkout_mandate": b_mandates.checkout,
                         "open_payment_mandate": b_mandates.payment, "task": "a-task" })),
            422,
            "ap2_cnf_mismatch",
        ),
        (
            "register B's mandates",
            Method::POST,
            "/v1/ap2/mandates".into(),
            Some(json!({ "open_checkout_mandate": b_mandates.checkout, "open_payment_mandate": b_mandates.payment })),
            422,
            "ap2_cnf_mismatch",
        ),
        ("read B's mandate budget", Method::GET, format!("/v1/ap2/mandates/{b_mandate_id}"), None, 404, ""),
        ("read B's AP2 key", Method::GET, format!("/v1/ap2/agents/{}/key", b.id), None, 403, "admin_only"),
        (
            "cancel B's ACP purchase",
            Method::POST,
            format!("/v1/acp/checkouts/{b_session}/cancel"),
            Some(json!({ "merchant": spendcap::sim::ACP_MERCHANT, "hold_id": b_hold })),
            404,
            "unknown_hold",
        ),
        (
            "settle B's hold",
            Method::POST,
            format!("/v1/holds/{b_hold}/settle"),
            Some(json!({ "amount_micros": 1 })),
            404,
            "unknown_hold",
        ),
        ("void B's hold", Method::POST, format!("/v1/holds/{b_hold}/void"), Some(json!({})), 404, "unknown_hold"),
        ("read B", Method::GET, format!("/v1/agents/{}", b.id), None, 403, "admin_only"),
        ("read B's log", Method::GET, format!("/v1/log?agent={}", b.id), None, 403, "admin_only"),
        ("read B's receipts", Method::GET, format!("/v1/receipts?agent={}", b.id), None, 403, "admin_only"),
        ("read B's spend", Method::GET, format!("/v1/spend?agent={}", b.id), None, 403, "admin_only"),
        ("read the reports", Method::GET, "/v1/reports".into(), None, 403, "admin_only"),
        (
            "raise B's cap",
            Method::PUT,
            format!("/v1/agents/{}/cap", b.id),
            Some(json!({ "cap_micros": 1 })),
            403,
            "admin_only",
        ),
        (
            "loosen B's controls",
            Method::PUT,
            format!("/v1/agents/{}/controls", b.id),
            Some(json!({ "per_payment_micros": null })),
            403,
            "admin_only",
        ),
        (
            "revoke B",
            Method::POST,
            format!("/v1/agents/{}/revoke", b.id),
            Some(json!({ "reason": "x" })),
            403,
            "admin_only",
        ),
        ("rotate B's token", Method::POST, format!("/v1/agents/{}/rotate-token", b.id), None, 403, "admin_only"),
        // The event stream refuses an agent token like every admin-side route.
        ("watch every event", Method::GET, "/v1/events".into(), None, 403, "admin_only"),
    ];
    for (what, method, path, body, status, code) in cases {
        let (got_status, got) = app.agent_call(&a.token, method, &path, body).await;
        assert_eq!(got_status, status, "{what}: {got}");
        if !code.is_empty() {
            assert_eq!(got["code"], code, "{what}: {got}");
        }
    }
    assert_eq!((state_of(&app, &a).await, state_of(&app, &b).await), before, "nothing changed for A or B");
    assert_eq!((providers.ap2.paid_cents(), providers.acp.charged_cents()), paid_before, "no provider was paid");
    // B's token still works: nothing A did revoked or rotated it.
    let (status, me) = app.agent_call(&b.token, Method::GET, "/v1/me", None).await;
    assert_eq!((status, me["agent_id"].as_str()), (200, Some(b.id.as_str())), "{me}");
}
