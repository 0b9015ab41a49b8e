//! The keyed-APIs configuration file (`SPENDCAP_APIS_CONFIG`): each upstream API's name, base URL,
//! the owner's credential and its pricing rule.
//!
//! ```json
//! { "allow_private": ["127.0.0.1"],
//!   "apis": [
//!     { "name": "openai", "base_url": "https://api.openai.com",
//!       "credential": { "header": "authorization", "scheme": "Bearer", "env": "OPENAI_API_KEY" },
//!       "pricing": { "kind": "openai_usage", "default_max_output_tokens": 4096,
//!                    "models": { "gpt-4o-mini": { "input": 150000, "cached_input": 75000, "output": 600000 } } } } ] }
//! ```
//!
//! The credential's value comes from `value`, `file` or `env` (exactly one). It is read once at
//! start-up into a [`Credential`], whose `Debug` redacts it; it is never logged or returned, and a
//! parse error never repeats a value from the file.

use std::collections::BTreeSet;
use std::fmt;

use adapters::api::Pricing;
use axum::http::{HeaderName, HeaderValue};
use reqwest::Url;
use serde::Deserialize;

use crate::protocols::x402::destination::AddressRange;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    allow_private: Vec<String>,
    apis: Vec<ApiText>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiText {
    name: String,
    base_url: String,
    credential: CredentialText,
    pricing: Pricing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialText {
    header: String,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    file: Option<std::path::PathBuf>,
    #[serde(default)]
    env: Option<String>,
}

/// The owner's credential for one API: the header it goes in and its value (redacted in `Debug`).
#[derive(Clone)]
pub struct Credential {
    pub header: HeaderName,
    pub value: HeaderValue,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential {{ header: {}, value: <redacted> }}", self.header)
    }
}

/// One configured API.
#[derive(Clone, Debug)]
pub struct KeyedApi {
    /// The service in the log and the `{name}` in `/v1/apis/{name}/...`.
    pub name: String,
    /// Where the path after the name is appended (no trailing `/`).
    pub base_url: Url,
    pub credential: Credential,
    pub pricing: Pricing,
}

/// The parsed file.
#[derive(Clone, Debug)]
pub struct ApisFile {
    pub allow_private: Vec<AddressRange>,
    pub apis: Vec<KeyedApi>,
}

impl ApisFile {
    /// Parses the file's text, reading credentials from files and the environment. `env` looks
    /// a variable up (the process environment in production).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ApisFile, String> {
        let file: FileText = serde_json::from_str(text).map_err(|error| describe(&error))?;
        let allow_private = file
            .allow_private
            .iter()
            .map(|range| range.parse::<AddressRange>().map_err(|err| format!("allow_private: {err}")))
            .collect::<Result<Vec<_>, _>>()?;
        if file.apis.is_empty() {
            return Err("apis must name at least one API".into());
        }
        let mut seen = BTreeSet::new();
        let mut apis = Vec::new();
        for api in file.apis {
            check_name(&api.name)?;
            if !seen.insert(api.name.clone()) {
                return Err(format!("API {:?} is configured twice", api.name));
            }
            let what = format!("API {:?}", api.name);
            let base_url = Url::parse(api.base_url.trim_end_matches('/'))
                .map_err(|err| format!("{what}: base_url is not a URL: {err}"))?;
            if !matches!(base_url.scheme(), "http" | "https")
                || base_url.query().is_some()
                || !base_url.username().is_empty()
                || base_url.password().is_some()
            {
                return Err(format!("{what}: base_url must be http(s), without a query or credentials"));
            }
            api.pricing.check().map_err(|reason| format!("{what}: pricing: {reason}"))?;
            let credential =
                credential(&api.credential, env).map_err(|reason| format!("{what}: credential: {reason}"))?;
            apis.push(KeyedApi { name: api.name, base_url, credential, pricing: api.pricing });
        }
        Ok(ApisFile { allow_private, apis })
    }
}

fn credential(text: &CredentialText, env: &dyn Fn(&str) -> Option<String>) -> Result<Credential, String> {
    let header =
        HeaderName::from_bytes(text.header.as_bytes()).map_err(|_| "header is not a header name".to_owned())?;
    let secret = match (&text.value, &text.file, &text.env) {
        (Some(value), None, None) => value.clone(),
        (None, Some(path), None) => std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {}", path.display(), err.kind()))?
            .trim()
            .to_owned(),
        (None, None, Some(name)) => env(name).ok_or_else(|| format!("the environment variable {name} is not set"))?,
        _ => return Err("set exactly one of value, file and env".into()),
    };
    if secret.is_empty() {
        return Err("the credential is empty".into());
    }
    let full = match &text.scheme {
        Some(scheme) => format!("{scheme} {secret}"),
        None => secret,
    };
    let mut value =
        HeaderValue::from_str(&full).map_err(|_| "the credential is not a valid header value".to_owned())?;
    value.set_sensitive(true);
    Ok(Credential { header, value })
}

/// API names are path segments and the service in the log: short, lowercase, no separators.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("API name {name:?} must be 1 to 64 characters of a-z, 0-9, '.', '-', '_'"))
    }
}

/// A serde error that cannot carry a configured value (a credential written in the wrong place
/// would otherwise be quoted by "invalid type: string ...").
fn describe(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let safe = ["missing field", "unknown field", "duplicate field", "unknown variant"];
    let what = if safe.iter().any(|prefix| text.starts_with(prefix)) {
        text.split(" at line ").next().unwrap_or_default().to_owned()
    } else if error.is_syntax() || error.is_eof() {
        "the file is not valid JSON".to_owned()
    } else {
        "a value has the wrong type or form".to_owned()
    };
    format!("{what} at line {} column {}", error.line(), error.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-owner-secret-0123456789";

    fn file(credential: &str) -> String {
        format!(
            r#"{{ "allow_private": ["127.0.0.1"], "apis": [ {{ "name": "openai", "base_url": "http://127.0.0.1:9/",
               "credential": {credential},
               "pricing": {{ "kind": "per_request", "price_micros": 10 }} }} ] }}"#
        )
    }

    #[test]
    fn the_credential_is_read_from_the_environment_and_never_shown() {
        let env = |name: &str| (name == "OWNER_KEY").then(|| SECRET.to_owned());
        let parsed =
            ApisFile::parse(&file(r#"{ "header": "authorization", "scheme": "Bearer", "env": "OWNER_KEY" }"#), &env)
                .expect("valid");
        let api = &parsed.apis[0];
        assert_eq!(api.credential.value.to_str().ok(), Some(format!("Bearer {SECRET}").as_str()));
        assert_eq!(api.base_url.as_str(), "http://127.0.0.1:9/");
        assert!(!format!("{parsed:?}").contains(SECRET));
        let missing =
            ApisFile::parse(&file(r#"{ "header": "authorization", "env": "ABSENT" }"#), &env).expect_err("unset");
        assert!(missing.contains("ABSENT"), "{missing}");
    }

    #[test]
    fn errors_never_quote_a_value() {
        let none = |_: &str| None;
        let both =
            ApisFile::parse(&file(&format!(r#"{{ "header": "x-api-key", "value": "{SECRET}", "env": "X" }}"#)), &none)
                .expect_err("two sources");
        assert!(both.contains("exactly one"), "{both}");
        let misplaced = format!(
            r#"{{ "apis": [ {{ "name": "a", "base_url": 5, "credential": {{ "header": "x", "value": "{SECRET}" }}, "pricing": {{ "kind": "per_request", "price_micros": "{SECRET}" }} }} ] }}"#
        );
        let err = ApisFile::parse(&misplaced, &none).expect_err("wrong types");
        assert!(!err.contains(SECRET), "{err}");
        let bad_name =
            ApisFile::parse(&file(r#"{ "header": "x-api-key", "value": "v" }"#).replace("openai", "Open AI"), &none);
        assert!(bad_name.is_err());
    }
}
