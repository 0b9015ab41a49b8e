//! `spendcap demo`: the daemon on the in-process ledger, a small fleet run through a scenario
//! over the real HTTP API, the cost report printed, and the dashboard left up until Ctrl-C.
//!
//! The fleet pays through the generic budget authority (hold → settle), labelling services the
//! way x402, ACP and AP2 payments would name them; it does not run simulated protocol providers.
//! - `research` finishes three research tasks under its $5.00 cap (per-task cap $1.50);
//! - `enrichment` ($1.00 cap) buys lookups until a payment is refused at its cap;
//! - `looper` pays the same thing again and again until its runaway-loop breaker suspends it;
//!   the operator then revokes it (`runaway_loop`) and its next payment is refused.

use reqwest::Method;
use serde_json::{json, Value};

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
    pub enrichment_refusal: String,
    pub looper_suspension: String,
    pub looper_after_revoke: String,
    pub lines: Vec<String>,
}

struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
}

impl Api {
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

    /// Holds and settles `amount`; `Err(code)` when the hold is refused.
    async fn pay(&self, token: &str, service: &str, task: &str, amount: u64) -> Result<Result<(), String>, DemoError> {
        let body = json!({ "amount_micros": amount, "service": service, "task": task });
        let (status, hold) = self.call(token, Method::POST, "/v1/holds", Some(body)).await?;
        if status == 402 {
            return Ok(Err(hold["code"].as_str().unwrap_or("refused").to_owned()));
        }
        let hold_id =
            hold["hold_id"].as_str().ok_or_else(|| DemoError::Unexpected(format!("hold: {status} {hold}")))?;
        let (status, settled) = self
            .call(token, Method::POST, &format!("/v1/holds/{hold_id}/settle"), Some(json!({ "amount_micros": amount })))
            .await?;
        if status != 200 {
            return Err(DemoError::Unexpected(format!("settle: {status} {settled}")));
        }
        Ok(Ok(()))
    }

    async fn outcome(&self, token: &str, task: &str, task_type: &str, outcome: &str) -> Result<(), DemoError> {
        let body = json!({ "outcome": outcome, "task_type": task_type });
        let (status, answer) = self.call(token, Method::POST, &format!("/v1/tasks/{task}/outcome"), Some(body)).await?;
        if status != 200 {
            return Err(DemoError::Unexpected(format!("outcome: {status} {answer}")));
        }
        Ok(())
    }
}

/// Runs the three-agent scenario against the daemon at `base`.
pub async fn scenario(base: &str, admin_token: &str) -> Result<Outcome, DemoError> {
    let api = Api {
        http: reqwest::Client::new(),
        base: base.trim_end_matches('/').to_owned(),
        admin: admin_token.to_owned(),
    };
    let mut out = Outcome::default();

    let (_, research) = api
        .create(json!({ "handle": "research", "cap_micros": 5_000_000, "controls": { "task_cap_micros": 1_500_000 } }))
        .await?;
    let costs: [&[(&str, u64)]; 3] = [
        &[("api.openai.com", 420_000), ("x402:0x209693bc6afc0c5328ba36faf03c514ef312287c", 100_000)],
        &[("api.openai.com", 380_000), ("serpapi.com", 150_000)],
        &[("api.openai.com", 510_000), ("acp:merchant_books", 250_000), ("ap2:travel.example", 90_000)],
    ];
    for (i, payments) in costs.iter().enumerate() {
        let task = format!("research-{}", i + 1);
        for (service, amount) in payments.iter() {
            if let Err(code) = api.pay(&research, service, &task, *amount).await? {
                return Err(DemoError::Unexpected(format!("research was refused: {code}")));
            }
            out.research_spent_micros += amount;
        }
        api.outcome(&research, &task, "research", "success").await?;
    }
    out.lines.push(format!(
        "research: 3 tasks succeeded, ${} of its $5.00 cap spent",
        adapters::Micros::new(out.research_spent_micros).map(|m| m.to_usd_string()).unwrap_or_default()
    ));

    let (_, enrichment) = api.create(json!({ "handle": "enrichment", "cap_micros": 1_000_000 })).await?;
    for n in 1..=10 {
        let task = format!("enrich-{}", (n + 1) / 2);
        match api.pay(&enrichment, "api.clearbit.example", &task, 300_000).await? {
            Ok(()) if n % 2 == 0 => api.outcome(&enrichment, &task, "enrichment", "success").await?,
            Ok(()) => {}
            Err(code) => {
                api.outcome(&enrichment, &task, "enrichment", "failed").await?;
                out.lines
                    .push(format!("enrichment: payment {n} refused at its $1.00 cap ({code}); task {task} failed"));
                out.enrichment_refusal = code;
                break;
            }
        }
    }

    let (looper_id, looper) = api
        .create(json!({ "handle": "looper", "cap_micros": 10_000_000,
                        "controls": { "breaker": { "max_holds": 600, "window_secs": 60, "max_repeats": 5 } } }))
        .await?;
    for n in 1..=20 {
        if let Err(code) = api.pay(&looper, "api.openai.com", "loop-1", 50_000).await? {
            out.lines.push(format!("looper: payment {n} refused ({code}): the runaway-loop breaker tripped"));
            out.looper_suspension = code;
            break;
        }
    }
    api.outcome(&looper, "loop-1", "research", "abandoned").await?;
    let (status, answer) = api
        .call(
            admin_token,
            Method::POST,
            &format!("/v1/agents/{looper_id}/revoke"),
            Some(json!({ "reason": "runaway_loop" })),
        )
        .await?;
    if status != 200 {
        return Err(DemoError::Unexpected(format!("revoke: {status} {answer}")));
    }
    out.looper_after_revoke = match api.pay(&looper, "api.openai.com", "loop-2", 50_000).await? {
        Ok(()) => return Err(DemoError::Unexpected("a revoked agent paid".into())),
        Err(code) => code,
    };
    out.lines
        .push(format!("looper: revoked (runaway_loop); its next payment was refused ({})", out.looper_after_revoke));
    Ok(out)
}
