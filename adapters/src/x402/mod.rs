//! x402: HTTP 402 payments answered with EIP-3009 USDC authorizations, protocol v1 and v2.
//!
//! The daemon's flow, and the function of this module for each step:
//!
//! 1. A fetch answers 402: [`parse_payment_required`] reads the v2 `PAYMENT-REQUIRED` header or
//!    the v1 JSON body.
//! 2. [`choose`] picks the cheapest requirement the [`Policy`] allows (allow-listed chain and
//!    token, the token's real EIP-712 domain, under the per-payment maximum); the [`Choice`] gives
//!    the ledger its [`PaymentIntent`](crate::PaymentIntent) through [`Choice::intent`].
//! 3. Once the ledger holds the amount, [`sign_payment`] signs the authorization with the
//!    [`EvmSigner`] and [`PaymentPayload::to_header`] gives the header to retry with. A retry of
//!    the same purchase passes the same [`Nonce`], so that at most one authorization can settle.
//! 4. [`parse_settlement`] reads the server's settlement report from the paid response.
//!
//! Nothing here reads the clock, talks to the network or knows about the ledger.

mod conformance;
mod error;
mod mcp;
mod payment_identifier;
mod policy;
mod sign;
mod transport;
mod upto;
mod wire;

#[cfg(test)]
mod fixture_tests;

pub use alloy_primitives::Address;
pub use conformance::record_payment;
pub use error::X402Error;
pub use mcp::{
    http_answer_of_tool_result, meta_with_payment, payment_required_of_tool_result, settlement_of_tool_result,
    tool_result_of_http_body, McpPaymentBinding, MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY,
};
pub use payment_identifier::{PaymentId, PAYMENT_IDENTIFIER};
pub use policy::{
    chain_id_of_network, choose, parse_address, AllowedAsset, Choice, ChosenRequirement, PaymentScheme, Policy,
};
pub use sign::{
    authorization_digest, recover_signer, sign_authorization, sign_payment, EvmSigner, Nonce, PaymentTerms, TokenDomain,
};
pub use transport::{
    decode_settlement_json, encode_header, parse_payment_header, parse_payment_required, parse_settlement,
    PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE, X_PAYMENT, X_PAYMENT_RESPONSE,
};
pub use upto::{
    nonce_decimal, recover_upto_signer, sign_upto, upto_digest, upto_settled_amount, UptoPaymentPayloadV2,
    UptoPermit2Authorization, UptoPermit2Payload, UptoPermitted, UptoSettled, UptoWitness, PERMIT2_ADDRESS, UPTO,
    UPTO_PERMIT2_PROXY_ADDRESS,
};
pub use wire::{
    ExactEvmAuthorization, ExactEvmPayload, PaymentPayload, PaymentPayloadV1, PaymentPayloadV2, PaymentRequired,
    PaymentRequiredV1, PaymentRequiredV2, PaymentRequirementsV1, PaymentRequirementsV2, ResourceInfo,
    SettlementResponse, Version, X402Version, V1, V2,
};
