//! `spendcap demo`: the daemon on the in-process ledger, simulated x402, ACP and AP2 providers
//! ([`crate::sim`]), a small fleet run through a scenario over the real HTTP API, the cost
//! report printed, and the dashboard left up until Ctrl-C.
//!
//! - `research` ($5.00 cap, $1.50 per task) finishes three research tasks: searches and papers
//!   bought over x402, a dataset and a report bought from an ACP merchant;
//! - `enrichment` ($1.00 cap) buys company profiles through AP2 under a user's open mandate
//!   ($5.00 budget) until a payment is refused at its own cap;
//! - `looper` polls the same x402 search again and again (same service, same price) until its runaway-loop breaker suspends
//!   it; its polling task is abandoned, the operator revokes it (`runaway_loop`) and its next
//!   payment is refused.
//!
//! Every task outcome the scenario reports is also counted in [`Outcome::tasks`], and the story's
//! lines are written from those counts, so the printed story and the report (which counts the
//! same outcomes from the log) cannot disagree.

use reqwest::Method;
use serde_json::{json, Value};

use crate::human::usd;
use crate::sim::{ap2::MandateTerms, Providers};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Unexpected(String),
}

/// What the scenario saw, for the summary and the tests.
#[derive(Debug, Default)]
pub struct Outcome {
    pub research_spent_micros: u64,
    /// Payments made by protocol: (x402, ACP, AP2).
    pub payments: (u32, u32, u32),
    pub enrichment_refusal: String,
    pub looper_suspension: String,
    pub looper_after_revoke: String,
    /// Task outcomes reported, by task type: (succeeded, failed, abandoned).
    pub tasks: std::collections::BTreeMap<String, (u64, u64, u64)>,
    pub lines: Vec<String>,
}

impl Outcome {
    fn count(&mut self, task_type: &str, outcome: &str) {
        let counts = self.tasks.entry(task_type.to_owned()).or_default();
        match outcome {
            "success" => counts.0 += 1,
            "failed" => counts.1 += 1,
            _ => counts.2 += 1,
        }
    }
}

/// One purchase an agent makes.
#[derive(Clone, Copy)]
enum Purchase {
    /// A paid x402 resource, by path.
    X402(&'static str),
    /// An ACP checkout of one catalog item.
    Acp(&'static str),
}

struct Api<'a> {
    http: reqwest::Client,
    base: String,
    admin: String,
    providers: &'a Providers,
}

impl Api<'_> {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), DemoError> {
        let mut request = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn create(&self, body: Value) -> Result<(String, String), DemoError> {
        let (status, created) = self.call(&self.admin, Method::POST, "/v1/agents", Some(body)).await?;
        if status != 201 {
            return Err(DemoError::Unexpected(format!("creating an agent: {status} {created}")));
        }
        let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_default();
        Ok((text(&created["agent"]["id"]), text(&created["token"])))
    }

    /// Sends a payment request; `Ok(amount paid)`, or `Err(code)` when spendcap refused it.
    async fn paid(&self, token: &str, path: &str, body: Value, amount: &str) -> Result<Result<u64, String>, DemoError> {
        let (status, answer) = self.call(token, Method::POST, path, Some(body)).await?;
        match status {
            200 | 201 => answer
                .pointer(amount)
                .and_then(Value::as_u64)
                .map(Ok)
                .ok_or_else(|| DemoError::Unexpected(format!("{path}: no amount paid in {answer}"))),
            402 => Ok(Err(answer["code"].as_str().unwrap_or("refused").to_owned())),
            _ => Err(DemoError::Unexpected(format!("{path}: {status} {answer}"))),
        }
    }

    async fn buy(&self, token: &str, purchase: Purchase, task: &str) -> Result<Result<u64, String>, DemoError> {
        match purchase {
            Purchase::X402(path) => self.x402(token, path, task).await,
            Purchase::Acp(item) => {
                let body = json!({ "merchant": crate::sim::ACP_MERCHANT, "items": [{ "id": item }], "task": task });
                self.paid(token, "/v1/acp/checkouts", body, "/amount_micros").await
            }
        }
    }

    /// Fetches a paid x402 resource (`path` may carry a query). The same request in the same
    /// task is the same purchase (spendcap answers a repeat from the first one), so a new
    /// purchase of the same resource differs somewhere, as a poll's or a page's query does.
    async fn x402(&self, token: &str, path: &str, task: &str) -> Result<Result<u64, String>, DemoError> {
        let body = json!({ "url": format!("{}{path}", self.providers.x402.base()), "task": task });
        self.paid(token, "/v1/x402/fetch", body, "/payment/amount_micros").await
    }

    /// Reports a task's outcome to spendcap and counts it for the story.
    async fn outcome(
        &self,
        out: &mut Outcome,
        token: &str,
        task: &str,
        task_type: &str,
        outcome: &str,
    ) -> Result<(), DemoError> {
        let body = json!({ "outcome": outcome, "task_type": task_type });
        let (status, answer) = self.call(token, Method::POST, &format!("/v1/tasks/{task}/outcome"), Some(body)).await?;
        if status != 200 {
            return Err(DemoError::Unexpected(format!("outcome: {status} {answer}")));
        }
        out.count(task_type, outcome);
        Ok(())
    }
}

/// Runs the three-agent scenario against the daemon at `base`, which must be configured for
/// `providers` ([`Providers::protocol_config`]).
pub async fn scenario(base: &str, admin_token: &str, providers: &Providers) -> Result<Outcome, DemoError> {
    let api = Api {
        http: reqwest::Client::new(),
        base: base.trim_end_matches('/').to_owned(),
        admin: admin_token.to_owned(),
        providers,
    };
    let mut out = Outcome::default();
    research(&api, &mut out).await?;
    enrichment(&api, &mut out).await?;
    looper(&api, &mut out).await?;
    Ok(out)
}

async fn research(api: &Api<'_>, out: &mut Outcome) -> Result<(), DemoError> {
    let (_, token) = api
        .create(json!({ "handle": "research", "cap_micros": 5_000_000, "controls": { "task_cap_micros": 1_500_000 } }))
        .await?;
    use Purchase::{Acp, X402};
    let tasks: [&[Purchase]; 3] = [
        &[X402("/search"), X402("/papers/attention"), Acp("dataset_climate")],
        // A metered summary (x402 `upto`): $0.30 authorised and held, $0.12 used and settled.
        &[X402("/search"), X402("/papers/scaling"), X402("/summarise?used=120000")],
        &[X402("/search"), X402("/papers/retrieval"), Acp("report_market")],
    ];
    for (i, purchases) in tasks.iter().enumerate() {
        let task = format!("research-{}", i + 1);
        for purchase in purchases.iter() {
            match api.buy(&token, *purchase, &task).await? {
                Ok(amount) => out.research_spent_micros += amount,
                Err(code) => return Err(DemoError::Unexpected(format!("research was refused: {code}"))),
            }
            match purchase {
                X402(_) => out.payments.0 += 1,
                Acp(_) => out.payments.1 += 1,
            }
        }
        api.outcome(out, &token, &task, "research", "success").await?;
    }
    let succeeded = out.tasks.get("research").map_or(0, |c| c.0);
    out.lines.push(format!(
        "research: {succeeded} research tasks succeeded (x402 searches and papers, ACP dataset and report), {} of \
         its $5.00 cap spent",
        usd(out.research_spent_micros)
    ));
    Ok(())
}

async fn enrichment(api: &Api<'_>, out: &mut Outcome) -> Result<(), DemoError> {
    let (_, token) = api.create(json!({ "handle": "enrichment", "cap_micros": 1_000_000 })).await?;
    let (status, key) = api.call(&token, Method::GET, "/v1/ap2/key", None).await?;
    let jwk = serde_json::from_value(key["jwk"].clone())
        .map_err(|e| DemoError::Unexpected(format!("the agent's AP2 key: {status} {key} ({e})")))?;
    let sku = crate::sim::AP2_CATALOG[0].0;
    let terms = MandateTerms { items: &[sku], budget_cents: 500, max_payment_cents: 100, valid_secs: 3600 };
    let mandates = api.providers.ap2.issue_mandates(&jwk, &terms).map_err(DemoError::Unexpected)?;
    for n in 1..=10 {
        let task = format!("enrich-{n}");
        // The merchant's agent hands out a signed cart for one company profile.
        let cart: Value = api
            .http
            .post(format!("{}/checkouts", api.providers.ap2.merchant_base()))
            .json(&json!({ "items": [sku] }))
            .send()
            .await?
            .json()
            .await?;
        let body = json!({ "checkout_jwt": cart["checkout_jwt"], "open_checkout_mandate": mandates.checkout,
                          "open_payment_mandate": mandates.payment, "task": task });
        match api.paid(&token, "/v1/ap2/payments", body, "/amount_micros").await? {
            Ok(_) => {
                out.payments.2 += 1;
                api.outcome(out, &token, &task, "enrichment", "success").await?;
            }
            Err(code) => {
                api.outcome(out, &token, &task, "enrichment", "failed").await?;
                let (succeeded, failed, _) = out.tasks.get("enrichment").copied().unwrap_or_default();
                out.lines.push(format!(
                    "enrichment: {succeeded} enrichment tasks succeeded (one AP2 purchase each, under a $5.00 \
                     mandate budget); payment {n} was refused at its $1.00 cap ({code}), so {failed} task failed \
                     ({task})"
                ));
                out.enrichment_refusal = code;
                break;
            }
        }
    }
    Ok(())
}

async fn looper(api: &Api<'_>, out: &mut Outcome) -> Result<(), DemoError> {
    let (looper_id, token) = api
        .create(json!({ "handle": "looper", "cap_micros": 10_000_000,
                        "controls": { "breaker": { "max_holds": 600, "window_secs": 60, "max_repeats": 5 } } }))
        .await?;
    for n in 1..=20 {
        // A stuck agent polling the same search: the same service and price every time.
        match api.x402(&token, &format!("/search?q=order+status&poll={n}"), "loop-1").await? {
            Ok(_) => out.payments.0 += 1,
            Err(code) => {
                out.lines.push(format!(
                    "looper: x402 search {n} refused ({code}): the runaway-loop breaker tripped after {} identical \
                     payments",
                    n - 1
                ));
                out.looper_suspension = code;
                break;
            }
        }
    }
    // The looper's job is polling an order's status, not research: typed so, its abandoned run
    // is reported apart from the research tasks.
    api.outcome(out, &token, "loop-1", "polling", "abandoned").await?;
    let path = format!("/v1/agents/{looper_id}/revoke");
    let (status, answer) = api.call(&api.admin, Method::POST, &path, Some(json!({ "reason": "runaway_loop" }))).await?;
    if status != 200 {
        return Err(DemoError::Unexpected(format!("revoke: {status} {answer}")));
    }
    out.looper_after_revoke = match api.x402(&token, "/search?q=order+status", "loop-2").await? {
        Ok(_) => return Err(DemoError::Unexpected("a revoked agent paid".into())),
        Err(code) => code,
    };
    let abandoned = out.tasks.get("polling").map_or(0, |c| c.2);
    out.lines.push(format!(
        "looper: {abandoned} polling task abandoned (loop-1); revoked (runaway_loop), its next payment was refused ({})",
        out.looper_after_revoke
    ));
    Ok(())
}
