//! Keyed APIs: LLM and SaaS APIs paid with the owner's API key, metered against the agent's cap.
//!
//! The daemon holds a bound a call cannot exceed before forwarding it, and settles what the call
//! cost afterwards. This module owns the API-specific parts, without any I/O:
//!
//! - [`pricing`]: the pricing rules of a configured API (`per_request`, `openai_usage`,
//!   `anthropic_usage`, `response_header`) and the cost arithmetic (integer micro-USD, rounded up);
//! - [`request`]: reading an LLM request (model, stream flag, maximum output tokens) into the
//!   hold's bound, and the few changes the daemon makes to it (a default `max_tokens`, asking for
//!   usage in an OpenAI stream);
//! - [`usage`]: the token usage of a non-streaming answer, in each API's format;
//! - [`stream`]: an SSE tap that passes a stream through as it arrives while reading its usage.

pub mod pricing;
pub mod request;
pub mod stream;
pub mod usage;

pub use pricing::{ModelPrice, ModelTable, PerRequestRoute, Pricing, PricingError};
pub use request::{prepare, LlmCall, RequestError};
pub use stream::UsageTap;
pub use usage::{usage_of, Usage};

/// The two LLM API styles the daemon reads usage from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// OpenAI chat completions and responses (and the many APIs that copy them).
    OpenAi,
    /// Anthropic messages.
    Anthropic,
}
