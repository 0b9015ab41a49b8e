//! Protocol adapters for spendcap.
//!
//! This crate owns everything that is specific to a payment protocol — wire types, parsing of a
//! provider's payment request, signing, provider HTTP clients — and turns it into the
//! protocol-neutral [`PaymentIntent`] that the daemon's ledger understands. It also owns the money
//! type, [`Micros`], because every protocol converts its own amounts into it.
//!
//! Architecture invariant: this crate never depends on Redis or axum. The daemon decides whether
//! a payment may happen; an adapter only says what the payment is.

pub mod acp;
pub mod ap2;
pub mod api;
pub mod conformance;
pub mod intent;
pub mod money;
pub mod mpp;
pub mod net;
pub mod x402;

pub use intent::{PaymentIntent, Protocol};
pub use money::{AmountError, Micros};
