//! Pricing rules of a keyed API, and the cost arithmetic. Prices are integers: micro-USD per call,
//! or micro-USD per million tokens. Costs are rounded up to the micro-USD, so a hold computed
//! from a bound is never below the cost of any call within that bound.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::usage::Usage;
use super::Style;
use crate::money::Micros;

const PER_MILLION: u128 = 1_000_000;

/// How a configured API is priced (`"kind"` in the configuration file).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pricing {
    /// A fixed price per call; the first route whose method and path match sets it, otherwise
    /// `price_micros`.
    PerRequest {
        price_micros: u64,
        #[serde(default)]
        routes: Vec<PerRequestRoute>,
    },
    /// OpenAI-style token usage (`usage.prompt_tokens` / `input_tokens`, ...).
    OpenaiUsage(ModelTable),
    /// Anthropic-style token usage (`usage.input_tokens`, `cache_read_input_tokens`, ...).
    AnthropicUsage(ModelTable),
    /// The upstream reports each call's cost in a response header; `max_micros` is held.
    ResponseHeader {
        header: String,
        max_micros: u64,
        /// `usd` (a decimal like `0.0042`, the default) or `micros` (an integer).
        #[serde(default)]
        unit: HeaderUnit,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderUnit {
    #[default]
    Usd,
    Micros,
}

/// One priced route of a `per_request` API.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerRequestRoute {
    /// The HTTP method; any when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// The path after the API's name, starting with `/`; `*` matches any run of characters.
    pub path: String,
    pub price_micros: u64,
}

/// A model price table: micro-USD per million tokens.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    pub models: BTreeMap<String, ModelPrice>,
    /// The price of a model not in `models`; without it such a call is refused.
    #[serde(default)]
    pub default: Option<ModelPrice>,
    /// The output limit applied (and sent upstream) when a request sets none; without it such a
    /// request is refused.
    #[serde(default)]
    pub default_max_output_tokens: Option<u64>,
    /// Tokens added to the request's size in the input bound: what the upstream bills that the
    /// body does not show (a provider's own system prompt for tools, content fetched from URLs).
    #[serde(default)]
    pub input_overhead_tokens: u64,
}

/// One model's prices in micro-USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: u64,
    /// Input read from the provider's prompt cache; `input` when absent.
    #[serde(default)]
    pub cached_input: Option<u64>,
    /// Input written to the prompt cache (Anthropic); `input` when absent.
    #[serde(default)]
    pub cache_write: Option<u64>,
    pub output: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("no price for model {0:?} and no default price")]
    UnknownModel(String),
    #[error("the cost is larger than any amount the ledger holds")]
    TooLarge,
}

impl PricingError {
    pub fn code(&self) -> &'static str {
        match self {
            PricingError::UnknownModel(_) => "api_unknown_model",
            PricingError::TooLarge => "api_bound_too_large",
        }
    }
}

impl Pricing {
    /// The LLM style whose usage settles the call, for the token-priced rules.
    pub fn style(&self) -> Option<Style> {
        match self {
            Pricing::OpenaiUsage(_) => Some(Style::OpenAi),
            Pricing::AnthropicUsage(_) => Some(Style::Anthropic),
            _ => None,
        }
    }

    /// The model table of a token-priced rule.
    pub fn models(&self) -> Option<&ModelTable> {
        match self {
            Pricing::OpenaiUsage(table) | Pricing::AnthropicUsage(table) => Some(table),
            _ => None,
        }
    }

    /// The price of one call to `method` `path`, for `per_request`.
    pub fn per_request_price(&self, method: &str, path: &str) -> Option<u64> {
        let Pricing::PerRequest { price_micros, routes } = self else { return None };
        let route = routes.iter().find(|route| {
            route.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method)) && glob(&route.path, path)
        });
        Some(route.map_or(*price_micros, |route| route.price_micros))
    }

    /// Checks the rule's numbers once, at start-up.
    pub fn check(&self) -> Result<(), String> {
        let limit = Micros::MAX.get();
        match self {
            Pricing::PerRequest { price_micros, routes } => {
                for price in std::iter::once(price_micros).chain(routes.iter().map(|r| &r.price_micros)) {
                    if *price > limit {
                        return Err("a price_micros is larger than the ledger's maximum amount".into());
                    }
                }
                if routes.iter().any(|r| !r.path.starts_with('/')) {
                    return Err("a route's path must start with '/'".into());
                }
                Ok(())
            }
            Pricing::OpenaiUsage(table) | Pricing::AnthropicUsage(table) => {
                if table.models.is_empty() && table.default.is_none() {
                    return Err("a model table needs at least one model or a default".into());
                }
                if table.default_max_output_tokens == Some(0) {
                    return Err("default_max_output_tokens must be at least 1".into());
                }
                Ok(())
            }
            Pricing::ResponseHeader { header, max_micros, .. } => {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(format!("{header:?} is not a header name"));
                }
                if *max_micros == 0 || *max_micros > limit {
                    return Err("max_micros must be positive and within the ledger's maximum amount".into());
                }
                Ok(())
            }
        }
    }
}

/// `*` matches any run of characters (including `/`); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl ModelTable {
    pub fn price(&self, model: &str) -> Result<ModelPrice, PricingError> {
        self.models
            .get(model)
            .or(self.default.as_ref())
            .copied()
            .ok_or_else(|| PricingError::UnknownModel(model.into()))
    }
}

fn to_micros(numerator: u128) -> Result<Micros, PricingError> {
    let micros = numerator.div_ceil(PER_MILLION);
    u64::try_from(micros).ok().and_then(|m| Micros::new(m).ok()).ok_or(PricingError::TooLarge)
}

impl ModelPrice {
    fn cached(&self) -> u64 {
        self.cached_input.unwrap_or(self.input)
    }

    fn cache_write(&self) -> u64 {
        self.cache_write.unwrap_or(self.input)
    }

    /// The most a call can cost with at most `input_tokens` in and `output_tokens` out: every
    /// input token at the dearest input price.
    pub fn bound(&self, input_tokens: u64, output_tokens: u64) -> Result<Micros, PricingError> {
        let input_price = self.input.max(self.cached()).max(self.cache_write());
        to_micros(
            u128::from(input_tokens) * u128::from(input_price) + u128::from(output_tokens) * u128::from(self.output),
        )
    }

    /// What a call with this usage costs.
    pub fn cost(&self, usage: &Usage) -> Result<Micros, PricingError> {
        let uncached = usage.input_tokens.saturating_sub(usage.cached_input_tokens + usage.cache_write_tokens);
        to_micros(
            u128::from(uncached) * u128::from(self.input)
                + u128::from(usage.cached_input_tokens) * u128::from(self.cached())
                + u128::from(usage.cache_write_tokens) * u128::from(self.cache_write())
                + u128::from(usage.output_tokens) * u128::from(self.output),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price() -> ModelPrice {
        ModelPrice { input: 2_500_000, cached_input: Some(1_250_000), cache_write: None, output: 10_000_000 }
    }

    #[test]
    fn costs_are_rounded_up_and_the_bound_covers_every_call_within_it() {
        let usage = Usage { input_tokens: 1000, cached_input_tokens: 400, cache_write_tokens: 0, output_tokens: 1 };
        // 600 × 2.5 + 400 × 1.25 + 1 × 10 = 1500 + 500 + 10 = 2010 micro-USD.
        assert_eq!(price().cost(&usage).map(Micros::get), Ok(2010));
        let one = Usage { input_tokens: 1, ..Usage::default() };
        assert_eq!(price().cost(&one).map(Micros::get), Ok(3), "2.5 micro-USD rounds up");
        assert_eq!(price().bound(1000, 1).map(Micros::get), Ok(2510));
        for cached in [0, 500, 1000] {
            let usage =
                Usage { input_tokens: 1000, cached_input_tokens: cached, cache_write_tokens: 0, output_tokens: 1 };
            assert!(price().cost(&usage).expect("cost") <= price().bound(1000, 1).expect("bound"));
        }
        assert_eq!(price().bound(u64::MAX, u64::MAX), Err(PricingError::TooLarge));
    }

    #[test]
    fn unknown_models_are_refused_unless_there_is_a_default() {
        let mut table = ModelTable {
            models: [("gpt-4o".to_owned(), price())].into(),
            default: None,
            default_max_output_tokens: None,
            input_overhead_tokens: 0,
        };
        assert_eq!(table.price("gpt-4o-mini").map_err(|e| e.code()), Err("api_unknown_model"));
        table.default = Some(ModelPrice { input: 1, cached_input: None, cache_write: None, output: 1 });
        assert_eq!(table.price("gpt-4o-mini").map(|p| p.input), Ok(1));
    }

    #[test]
    fn per_request_routes_match_by_method_and_glob() {
        let pricing: Pricing = serde_json::from_value(serde_json::json!({
            "kind": "per_request", "price_micros": 1000,
            "routes": [ { "method": "POST", "path": "/v1/scrape*", "price_micros": 5000 },
                        { "path": "/v1/search/*/deep", "price_micros": 3000 } ] }))
        .expect("parses");
        assert_eq!(pricing.per_request_price("POST", "/v1/scrape/batch"), Some(5000));
        assert_eq!(pricing.per_request_price("GET", "/v1/scrape"), Some(1000));
        assert_eq!(pricing.per_request_price("GET", "/v1/search/news/deep"), Some(3000));
        assert_eq!(pricing.per_request_price("GET", "/v1/search/news/deeper"), Some(1000));
        assert!(pricing.check().is_ok());
    }

    #[test]
    fn the_rules_parse_from_their_kind_and_bad_ones_are_refused() {
        let openai: Pricing = serde_json::from_value(serde_json::json!({
            "kind": "openai_usage", "default_max_output_tokens": 256,
            "models": { "gpt-4o-mini": { "input": 150000, "cached_input": 75000, "output": 600000 } } }))
        .expect("parses");
        assert_eq!(openai.style(), Some(Style::OpenAi));
        let unknown_field = serde_json::from_value::<Pricing>(serde_json::json!({
            "kind": "anthropic_usage", "models": {}, "surprise": 1 }));
        assert!(unknown_field.is_err());
        let empty: Pricing =
            serde_json::from_value(serde_json::json!({ "kind": "anthropic_usage", "models": {} })).expect("parses");
        assert!(empty.check().is_err());
        let header: Pricing = serde_json::from_value(
            serde_json::json!({ "kind": "response_header", "header": "x-cost", "max_micros": 0 }),
        )
        .expect("parses");
        assert!(header.check().is_err());
    }
}
