//! Fleet as code: `spendcap apply -f fleet.yaml` makes the daemon's agents what a YAML file says,
//! through the admin HTTP API (the CLI is a client of the daemon; nothing here talks to Redis).
//!
//! The file lists agents by handle. [`plan`] compares each with the daemon's view and says what
//! would change — create, update (with a diff per field), archive, unchanged — without changing
//! anything; [`apply`] then carries the plan out in file order (parents before their children).
//! Applying the same file twice changes nothing the second time: every compared field is one the
//! daemon reports back exactly.
//!
//! What is compared: `cap` (exact, in micro-USD), `parent`, `labels`, `expires_at` (when given)
//! and each key given under `controls` (the body of `PUT /v1/agents/{agent}/controls`; an update
//! replaces the whole set, as that call does). An agent's parent and labels are fixed at creation:
//! a file that changes them is refused with the reason, before anything is applied.

use std::collections::BTreeMap;

use adapters::Micros;
use serde::Deserialize;
use serde_json::{json, Value};

/// A fleet file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    pub agents: Vec<AgentSpec>,
}

/// One agent as the file describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub handle: String,
    /// USD as an exact decimal string (`"5.00"`) or whole dollars (`5`); a YAML float is refused
    /// (it is not exact).
    #[serde(default)]
    pub cap: Option<Value>,
    /// The parent's handle: the agent joins its budget tree.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The body of `PUT /v1/agents/{agent}/controls` (money in micro-USD).
    #[serde(default)]
    pub controls: Option<serde_json::Map<String, Value>>,
    /// A UTC date (`2027-01-01`) or an RFC 3339 time; `never` for no expiry.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Archived: revoked for good, its handle free for a new agent, its history kept.
    #[serde(default)]
    pub archived: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Invalid(String),
}

/// What applying the file does to one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `POST /v1/agents` with this body.
    Create {
        body: Value,
    },
    /// The calls that make it so, and a line per changed field.
    Update {
        agent_id: String,
        calls: Vec<(String, String, Value)>,
        diffs: Vec<String>,
    },
    Archive {
        agent_id: String,
    },
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub handle: String,
    pub action: Action,
}

/// Reads a fleet file's text.
pub fn parse(text: &str) -> Result<FleetFile, FleetError> {
    let file: FleetFile = serde_norway::from_str(text).map_err(|e| FleetError::Invalid(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    for agent in &file.agents {
        if !seen.insert(agent.handle.as_str()) {
            return Err(FleetError::Invalid(format!("agent {} is listed twice", agent.handle)));
        }
        // A parent listed in the file comes first; one that is not must exist in the daemon
        // (checked by `plan`).
        if let Some(parent) = &agent.parent {
            if !seen.contains(parent.as_str()) && file.agents.iter().any(|a| &a.handle == parent) {
                return Err(FleetError::Invalid(format!(
                    "agent {} is listed before its parent {parent}: list parents first",
                    agent.handle
                )));
            }
        }
        if !agent.archived && agent.cap.is_none() {
            return Err(FleetError::Invalid(format!("agent {}: cap is required", agent.handle)));
        }
    }
    Ok(file)
}

fn cap_micros(spec: &AgentSpec) -> Result<Option<u64>, FleetError> {
    let bad = |why: &str| FleetError::Invalid(format!("agent {}: cap {why}", spec.handle));
    match &spec.cap {
        None => Ok(None),
        Some(Value::String(text)) => {
            Micros::from_decimal_str(text, 6).map(|m| Some(m.get())).map_err(|e| bad(&format!("{text:?}: {e}")))
        }
        Some(Value::Number(n)) => match n.as_u64().and_then(|d| d.checked_mul(1_000_000)) {
            Some(micros) => Micros::new(micros).map(|m| Some(m.get())).map_err(|e| bad(&e.to_string())),
            None => Err(bad(&format!("{n} is not exact: write it as a string, e.g. cap: \"5.00\""))),
        },
        Some(other) => Err(bad(&format!("{other} is not an amount"))),
    }
}

/// `expires_at` as ms since the epoch; `Some(None)` for `never`.
fn expiry(spec: &AgentSpec) -> Result<Option<Option<u64>>, FleetError> {
    match spec.expires_at.as_deref() {
        None => Ok(None),
        Some("never") => Ok(Some(None)),
        Some(text) => crate::human::parse_instant(text)
            .map(|ms| Some(Some(ms)))
            .map_err(|e| FleetError::Invalid(format!("agent {}: expires_at {e}", spec.handle))),
    }
}

fn usd(micros: u64) -> String {
    crate::human::usd(micros)
}

/// The daemon's current controls, in the shape the file gives them, for the keys the file gives.
fn controls_diffs(wanted: &serde_json::Map<String, Value>, current: &Value) -> Vec<String> {
    let list = |v: &Value| {
        json!({
            "allow": v.get("allow").cloned().unwrap_or_else(|| json!([])),
            "deny": v.get("deny").cloned().unwrap_or_else(|| json!([])),
        })
    };
    let without_nulls = |v: &Value| match v {
        Value::Object(map) => {
            Value::Object(map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        other => other.clone(),
    };
    let mut diffs = Vec::new();
    for (key, want) in wanted {
        let have = &current[key.as_str()];
        let (want, have) = match key.as_str() {
            "services" | "protocols" => (list(want), list(have)),
            "breaker" => (without_nulls(want), without_nulls(have)),
            "alerts" => (if want.is_null() { json!([]) } else { want.clone() }, have.clone()),
            "limits" => (want.clone(), if have.is_null() { json!({}) } else { have.clone() }),
            _ => (want.clone(), have.clone()),
        };
        if want != have {
            diffs.push(format!("controls.{key}: {have} → {want}"));
        }
    }
    diffs
}

/// Compares the file with the daemon's agents (`current`, by handle, as `GET /v1/agents` lists
/// them) and their controls (`controls_of`, asked only for agents whose file gives controls).
pub async fn plan<F, Fut>(
    file: &FleetFile,
    current: &BTreeMap<String, Value>,
    mut controls_of: F,
) -> Result<Vec<Step>, FleetError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Value, FleetError>>,
{
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    for spec in &file.agents {
        let have = current.get(&spec.handle);
        let action = match (have, spec.archived) {
            (None, true) => Action::Unchanged,
            (Some(agent), true) => Action::Archive { agent_id: text(&agent["id"]) },
            (None, false) => {
                if let Some(parent) = &spec.parent {
                    if !current.contains_key(parent) && !file.agents.iter().any(|a| &a.handle == parent && !a.archived)
                    {
                        problems
                            .push(format!("{}: parent {parent} is neither in the file nor in the daemon", spec.handle));
                    }
                }
                let mut body = json!({
                    "handle": spec.handle,
                    "cap_micros": cap_micros(spec)?,
                    "parent": spec.parent,
                    "labels": spec.labels,
                });
                if let Some(controls) = &spec.controls {
                    body["controls"] = Value::Object(controls.clone());
                }
                if let Some(Some(at)) = expiry(spec)? {
                    body["expires_at_ms"] = json!(at);
                }
                Action::Create { body }
            }
            (Some(agent), false) => {
                let agent_id = text(&agent["id"]);
                let path = format!("/v1/agents/{agent_id}");
                let mut calls = Vec::new();
                let mut diffs = Vec::new();
                let parent_handle = agent["parent"]
                    .as_str()
                    .and_then(|p| current.values().find(|a| a["id"] == p))
                    .map(|a| text(&a["handle"]));
                if spec.parent != parent_handle {
                    problems.push(format!(
                        "{}: its parent is {} and cannot change (archive it and create it again)",
                        spec.handle,
                        parent_handle.as_deref().unwrap_or("none")
                    ));
                }
                let labels: BTreeMap<String, String> =
                    serde_json::from_value(agent["labels"].clone()).unwrap_or_default();
                if labels != spec.labels {
                    problems.push(format!(
                        "{}: labels are set at creation and cannot change ({} → {})",
                        spec.handle,
                        json!(labels),
                        json!(spec.labels)
                    ));
                }
                if let Some(cap) = cap_micros(spec)? {
                    let have = agent["cap_micros"].as_u64().unwrap_or(0);
                    if have != cap {
                        diffs.push(format!("cap: {} → {}", usd(have), usd(cap)));
                        calls.push(("PUT".into(), format!("{path}/cap"), json!({ "cap_micros": cap })));
                    }
                }
                if let Some(want) = expiry(spec)? {
                    let have = agent["expires_at_ms"].as_u64();
                    if have != want {
                        let show = |v: Option<u64>| v.map(crate::human::time).unwrap_or_else(|| "never".into());
                        diffs.push(format!("expires_at: {} → {}", show(have), show(want)));
                        let body = match want {
                            Some(at) => json!({ "expires_at_ms": at }),
                            None => json!({ "never": true }),
                        };
                        calls.push(("PUT".into(), format!("{path}/expiry"), body));
                    }
                }
                if let Some(controls) = &spec.controls {
                    let current_controls = controls_of(agent_id.clone()).await?;
                    let changed = controls_diffs(controls, &current_controls);
                    if !changed.is_empty() {
                        diffs.extend(changed);
                        calls.push(("PUT".into(), format!("{path}/controls"), Value::Object(controls.clone())));
                    }
                }
                if calls.is_empty() {
                    Action::Unchanged
                } else {
                    Action::Update { agent_id, calls, diffs }
                }
            }
        };
        steps.push(Step { handle: spec.handle.clone(), action });
    }
    if !problems.is_empty() {
        return Err(FleetError::Invalid(format!("the file cannot be applied:\n  {}", problems.join("\n  "))));
    }
    Ok(steps)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The plan for people: one line per agent, and the diffs of updates under it.
pub fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match &step.action {
            Action::Create { body } => {
                let mut what = vec![format!("cap {}", usd(body["cap_micros"].as_u64().unwrap_or(0)))];
                if let Some(parent) = body["parent"].as_str() {
                    what.push(format!("parent {parent}"));
                }
                if body["labels"].as_object().is_some_and(|l| !l.is_empty()) {
                    what.push(format!("labels {}", body["labels"]));
                }
                if !body["controls"].is_null() {
                    what.push(format!("controls {}", body["controls"]));
                }
                if let Some(at) = body["expires_at_ms"].as_u64() {
                    what.push(format!("expires {}", crate::human::time(at)));
                }
                out.push_str(&format!("create     {}: {}\n", step.handle, what.join(", ")));
            }
            Action::Update { diffs, .. } => {
                out.push_str(&format!("update     {}\n", step.handle));
                for diff in diffs {
                    out.push_str(&format!("             {diff}\n"));
                }
            }
            Action::Archive { agent_id } => out.push_str(&format!("archive    {} ({agent_id})\n", step.handle)),
            Action::Unchanged => out.push_str(&format!("unchanged  {}\n", step.handle)),
        }
    }
    let count = |f: fn(&Action) -> bool| steps.iter().filter(|s| f(&s.action)).count();
    out.push_str(&format!(
        "plan: {} to create, {} to update, {} to archive, {} unchanged\n",
        count(|a| matches!(a, Action::Create { .. })),
        count(|a| matches!(a, Action::Update { .. })),
        count(|a| matches!(a, Action::Archive { .. })),
        count(|a| matches!(a, Action::Unchanged)),
    ));
    out
}
