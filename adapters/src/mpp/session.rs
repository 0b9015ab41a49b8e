//! The `session` intent over the `tempo` method: a payment channel. The client deposits once
//! into the channel's escrow (`open`), then pays each request with an off-chain **voucher**: an
//! EIP-712 signature over `Voucher { bytes32 channelId; uint128 cumulativeAmount }` under the
//! domain `Tempo Stream Channel` v1 (chain id, escrow contract), whose amount is cumulative, so
//! the server redeems only the highest; `close` ends the channel with the last voucher.
//!
//! What is the crate's: the challenge's request ([`SessionRequest`]), the credential envelope
//! and its codecs, and the wire shape of the payloads (`SessionCredentialPayload` of the crate's
//! `tempo` feature, reproduced by [`SessionPayload`]). What is ours: the voucher's digest and
//! signature with the daemon's key (the crate's `sign_voucher` needs its `tempo` feature, which
//! pulls the whole `alloy` provider stack and `tempo-alloy`; the digest below is the same
//! `alloy-sol-types` EIP-712 hash, and the channel id the same `abi.encode` + keccak).
//!
//! The `open` action carries the deposit's `transaction`. A Tempo chain transaction (type 0x76)
//! is not built here: the daemon sends, in its place, `0x`, the deposit (16 bytes, big-endian)
//! and its EIP-712 signature over `Open { bytes32 channelId; uint128 deposit }` in the same
//! domain ([`open_transaction`], [`parse_open_transaction`], [`open_digest`]), which the
//! simulated session server verifies. Speaking to a real Tempo escrow needs the
//! transaction builder of the crate's `tempo` feature.

use alloy_primitives::{keccak256, Address, Signature, U256};
use alloy_sol_types::{sol, Eip712Domain, SolStruct, SolValue};
use serde::{Deserialize, Serialize};

pub use ::mpp::protocol::intents::SessionRequest;
pub use alloy_primitives::B256;

use super::{format_authorization, MppError, PaymentChallenge, PaymentCredential, CONFORMANCE_PROTOCOL};
use crate::conformance::ConformanceSink;
use crate::intent::{PaymentIntent, Protocol};
use crate::money::Micros;
use crate::x402::EvmSigner;

/// The EIP-712 domain name of voucher signing (the escrow contract's).
pub const DOMAIN_NAME: &str = "Tempo Stream Channel";
/// The EIP-712 domain version of voucher signing.
pub const DOMAIN_VERSION: &str = "1";
/// The method that speaks sessions.
pub const SESSION_METHOD: &str = "tempo";
/// pathUSD on Tempo: a USD stablecoin of 6 decimals, whose base unit is one micro-USD.
pub const PATH_USD: &str = "0x20c0000000000000000000000000000000000000";
/// Tempo's chain id.
pub const TEMPO_CHAIN_ID: u64 = 4217;

sol! {
    /// A cumulative voucher, as the escrow contract hashes it.
    struct Voucher {
        bytes32 channelId;
        uint128 cumulativeAmount;
    }

    /// The deposit of a channel the daemon opens (the stand-in for the open transaction).
    struct Open {
        bytes32 channelId;
        uint128 deposit;
    }
}

/// What the operator allows for sessions.
#[derive(Clone, Debug)]
pub struct SessionPolicy {
    /// Tokens that may be deposited: USD stablecoins of 6 decimals (base unit = micro-USD).
    pub tokens: Vec<Address>,
    /// Chains the daemon pays on.
    pub chain_ids: Vec<u64>,
    /// The largest price of one request.
    pub max_payment: Micros,
    /// The largest deposit of one channel (the agent's maximum lowers it).
    pub max_deposit: Micros,
    /// A deposit when the challenge suggests none: this many requests at the price.
    pub default_units: u64,
}

/// A `tempo` `session` challenge, decoded and priced.
#[derive(Clone, Debug)]
pub struct SessionChoice {
    pub challenge: PaymentChallenge,
    pub request: SessionRequest,
    /// The price of one request (the voucher's increment).
    pub price: Micros,
    /// What the channel deposits (and the ledger holds).
    pub deposit: Micros,
    pub token: Address,
    pub payee: Address,
    pub escrow: Address,
    pub chain_id: u64,
    /// The channel the server names, if it resumes one (`methodDetails.channelId`).
    pub channel_id: Option<B256>,
}

fn address(what: &str, text: &str) -> Result<Address, MppError> {
    text.parse().map_err(|_| MppError::Malformed(format!("{what} {text:?} is not an address")))
}

fn base_units(what: &str, text: &str) -> Result<u64, MppError> {
    text.parse().map_err(|_| MppError::Malformed(format!("{what} {text:?} is not a whole number of base units")))
}

/// Chooses the cheapest `tempo` `session` challenge the policy accepts.
pub fn choose_session(challenges: &[PaymentChallenge], policy: &SessionPolicy) -> Result<SessionChoice, MppError> {
    let mut reasons = Vec::new();
    let mut over = None;
    let mut best: Option<SessionChoice> = None;
    for challenge in challenges {
        match judge_session(challenge, policy) {
            Ok(choice) => {
                if best.as_ref().is_none_or(|b| choice.price < b.price) {
                    best = Some(choice);
                }
            }
            Err(err @ MppError::OverMaximum { .. }) => over = Some(err),
            Err(err) => reasons.push(format!("{} ({}/{}): {err}", challenge.id, challenge.method, challenge.intent)),
        }
    }
    best.ok_or_else(|| over.unwrap_or_else(|| MppError::NoAcceptable(reasons.join("; "))))
}

fn judge_session(challenge: &PaymentChallenge, policy: &SessionPolicy) -> Result<SessionChoice, MppError> {
    if challenge.method.as_str() != SESSION_METHOD || challenge.intent.as_str() != "session" {
        return Err(MppError::NoAcceptable("not a tempo session".to_owned()));
    }
    let request: SessionRequest = challenge.request.decode().map_err(|err| MppError::Malformed(err.to_string()))?;
    let token = address("currency", &request.currency)?;
    if !policy.tokens.contains(&token) {
        return Err(MppError::NoAcceptable(format!("token {token} is not allowed")));
    }
    let details = request.method_details.clone().unwrap_or_default();
    let escrow = address("escrowContract", details["escrowContract"].as_str().unwrap_or_default())?;
    let chain_id = details["chainId"].as_u64().unwrap_or(TEMPO_CHAIN_ID);
    if !policy.chain_ids.contains(&chain_id) {
        return Err(MppError::NoAcceptable(format!("chain {chain_id} is not allowed")));
    }
    let payee = address("recipient", request.recipient.as_deref().unwrap_or_default())?;
    let price = Micros::positive(base_units("amount", &request.amount)?)
        .map_err(|err| MppError::Malformed(format!("amount: {err}")))?;
    if price > policy.max_payment {
        return Err(MppError::OverMaximum { amount: price.get(), maximum: policy.max_payment.get() });
    }
    let suggested = match &request.suggested_deposit {
        Some(text) => base_units("suggestedDeposit", text)?,
        None => price.get().saturating_mul(policy.default_units),
    };
    let deposit = Micros::new(suggested.clamp(price.get(), policy.max_deposit.get().max(price.get())))
        .map_err(|err| MppError::Malformed(format!("suggestedDeposit: {err}")))?;
    if deposit > policy.max_deposit {
        return Err(MppError::OverMaximum { amount: deposit.get(), maximum: policy.max_deposit.get() });
    }
    let channel_id = match details["channelId"].as_str() {
        Some(text) => Some(text.parse().map_err(|_| MppError::Malformed(format!("channelId {text:?}")))?),
        None => None,
    };
    Ok(SessionChoice {
        challenge: challenge.clone(),
        request,
        price,
        deposit,
        token,
        payee,
        escrow,
        chain_id,
        channel_id,
    })
}

impl SessionChoice {
    /// The deposit as the ledger holds it.
    pub fn intent(&self, url: &str) -> PaymentIntent {
        let service = http::Uri::try_from(url)
            .ok()
            .and_then(|uri| uri.host().map(str::to_ascii_lowercase))
            .unwrap_or_else(|| self.challenge.realm.clone());
        let details = std::collections::BTreeMap::from([
            ("realm".to_owned(), self.challenge.realm.clone()),
            ("payee".to_owned(), self.payee.to_string()),
            ("method".to_owned(), SESSION_METHOD.to_owned()),
            ("intent".to_owned(), "session".to_owned()),
            ("token".to_owned(), self.token.to_string()),
            ("escrow".to_owned(), self.escrow.to_string()),
            ("chain_id".to_owned(), self.chain_id.to_string()),
            ("price".to_owned(), self.price.get().to_string()),
        ]);
        PaymentIntent { amount: self.deposit, service, protocol: Protocol::Mpp, details }
    }
}

fn domain(escrow: Address, chain_id: u64) -> Eip712Domain {
    Eip712Domain::new(
        Some(DOMAIN_NAME.into()),
        Some(DOMAIN_VERSION.into()),
        Some(U256::from(chain_id)),
        Some(escrow),
        None,
    )
}

/// The channel id: `keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, escrow,
/// chainId))`, as the escrow contract computes it.
pub fn channel_id(
    payer: Address,
    payee: Address,
    token: Address,
    salt: B256,
    authorized_signer: Address,
    escrow: Address,
    chain_id: u64,
) -> B256 {
    keccak256((payer, payee, token, salt, authorized_signer, escrow, U256::from(chain_id)).abi_encode())
}

/// The EIP-712 signing hash of a voucher.
pub fn voucher_digest(channel: B256, cumulative: u128, escrow: Address, chain_id: u64) -> B256 {
    Voucher { channelId: channel, cumulativeAmount: cumulative }.eip712_signing_hash(&domain(escrow, chain_id))
}

/// The EIP-712 signing hash of the daemon's deposit (the open's stand-in transaction).
pub fn open_digest(channel: B256, deposit: u128, escrow: Address, chain_id: u64) -> B256 {
    Open { channelId: channel, deposit }.eip712_signing_hash(&domain(escrow, chain_id))
}

/// The open's stand-in transaction: `0x` + the deposit (32 hex digits) + the signature.
pub fn open_transaction(deposit: u128, signature_hex: &str) -> String {
    format!("0x{deposit:032x}{}", signature_hex.trim_start_matches("0x"))
}

/// The deposit and the signature of an open's stand-in transaction.
pub fn parse_open_transaction(text: &str) -> Option<(u128, String)> {
    let hex = text.strip_prefix("0x")?;
    if hex.len() != 32 + 130 || !hex.is_ascii() {
        return None;
    }
    let deposit = u128::from_str_radix(&hex[..32], 16).ok()?;
    Some((deposit, format!("0x{}", &hex[32..])))
}

/// The address that signed `digest` (65 bytes r‖s‖v, hex with or without 0x), if any.
pub fn recover(digest: &B256, signature_hex: &str) -> Option<Address> {
    let bytes = hex::decode(signature_hex.trim_start_matches("0x")).ok()?;
    Signature::from_raw(&bytes).ok()?.recover_address_from_prehash(digest).ok()
}

/// A session credential's payload, discriminated on `action` (the wire shape of the crate's
/// `SessionCredentialPayload`). Amounts are base units, as decimal text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum SessionPayload {
    #[serde(rename = "open")]
    Open {
        #[serde(rename = "type")]
        payload_type: String,
        #[serde(rename = "channelId")]
        channel_id: String,
        transaction: String,
        #[serde(rename = "authorizedSigner")]
        authorized_signer: String,
        #[serde(rename = "cumulativeAmount")]
        cumulative_amount: String,
        signature: String,
    },
    #[serde(rename = "voucher")]
    Voucher {
        #[serde(rename = "channelId")]
        channel_id: String,
        #[serde(rename = "cumulativeAmount")]
        cumulative_amount: String,
        signature: String,
    },
    #[serde(rename = "close")]
    Close {
        #[serde(rename = "channelId")]
        channel_id: String,
        #[serde(rename = "cumulativeAmount")]
        cumulative_amount: String,
        signature: String,
    },
}

/// One channel the daemon pays from: everything a voucher needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    pub id: B256,
    pub payer: Address,
    pub payee: Address,
    pub token: Address,
    pub escrow: Address,
    pub chain_id: u64,
    pub deposit: u128,
}

impl Channel {
    /// A new channel of `signer` to the chosen payee, identified by `salt` (random per channel).
    pub fn open(choice: &SessionChoice, signer: &EvmSigner, salt: [u8; 32]) -> Channel {
        let (payer, salt) = (signer.address(), B256::from(salt));
        let id = channel_id(payer, choice.payee, choice.token, salt, payer, choice.escrow, choice.chain_id);
        Channel {
            id,
            payer,
            payee: choice.payee,
            token: choice.token,
            escrow: choice.escrow,
            chain_id: choice.chain_id,
            deposit: u128::from(choice.deposit.get()),
        }
    }

    fn sign(signer: &EvmSigner, digest: &B256) -> Result<String, MppError> {
        let signature = signer.sign_digest(digest).map_err(|err| MppError::Malformed(err.to_string()))?;
        Ok(format!("0x{}", hex::encode(signature)))
    }

    /// The payload of `action` (`open`, `voucher` or `close`) for the cumulative amount
    /// `cumulative`. Signing is deterministic (RFC 6979): the same cumulative amount gives the
    /// very same voucher, so a retry re-sends it byte for byte.
    pub fn payload(&self, action: Action, cumulative: u128, signer: &EvmSigner) -> Result<SessionPayload, MppError> {
        let signature = Channel::sign(signer, &voucher_digest(self.id, cumulative, self.escrow, self.chain_id))?;
        let (channel_id, cumulative_amount) = (self.id.to_string(), cumulative.to_string());
        Ok(match action {
            Action::Open => SessionPayload::Open {
                payload_type: "transaction".to_owned(),
                transaction: open_transaction(
                    self.deposit,
                    &Channel::sign(signer, &open_digest(self.id, self.deposit, self.escrow, self.chain_id))?,
                ),
                authorized_signer: self.payer.to_string(),
                channel_id,
                cumulative_amount,
                signature,
            },
            Action::Voucher => SessionPayload::Voucher { channel_id, cumulative_amount, signature },
            Action::Close => SessionPayload::Close { channel_id, cumulative_amount, signature },
        })
    }
}

/// What a session credential does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Open,
    Voucher,
    Close,
}

/// The `Authorization: Payment` value answering `challenge` with `payload`; recorded in the
/// conformance sink.
pub fn session_credential(
    challenge: &PaymentChallenge,
    payload: &SessionPayload,
    sink: &ConformanceSink,
) -> Result<String, MppError> {
    let credential = PaymentCredential::new(challenge.to_echo(), payload);
    let header = format_authorization(&credential).map_err(|err| MppError::Malformed(err.to_string()))?;
    if let Ok(mut recorded) = serde_json::to_value(&credential) {
        recorded["authorization_scheme"] = serde_json::Value::String("Payment".to_owned());
        sink.record(CONFORMANCE_PROTOCOL, "SessionCredential", &recorded);
    }
    Ok(header)
}

/// The highest cumulative amount a session receipt says the server accepted
/// (`acceptedCumulative`), if it says one.
pub fn accepted_cumulative(receipt: &super::Receipt) -> Option<u128> {
    receipt.extensions.get("acceptedCumulative")?.as_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    #[test]
    fn a_voucher_recovers_to_the_payer_and_signs_the_same_bytes_again() {
        let signer = EvmSigner::from_hex(KEY).expect("key");
        let escrow: Address = "0x1234567890abcdef1234567890abcdef12345678".parse().expect("address");
        let channel = Channel {
            id: B256::repeat_byte(7),
            payer: signer.address(),
            payee: Address::repeat_byte(2),
            token: PATH_USD.parse().expect("address"),
            escrow,
            chain_id: TEMPO_CHAIN_ID,
            deposit: 1_000,
        };
        let first = channel.payload(Action::Voucher, 300, &signer).expect("signs");
        assert_eq!(first, channel.payload(Action::Voucher, 300, &signer).expect("signs"));
        let SessionPayload::Voucher { signature, cumulative_amount, .. } = first else { panic!("a voucher") };
        assert_eq!(cumulative_amount, "300");
        let digest = voucher_digest(channel.id, 300, escrow, TEMPO_CHAIN_ID);
        assert_eq!(recover(&digest, &signature), Some(signer.address()));
        // Another amount, chain or escrow is another digest.
        assert_ne!(digest, voucher_digest(channel.id, 301, escrow, TEMPO_CHAIN_ID));
        assert_ne!(digest, voucher_digest(channel.id, 300, escrow, 1));
        assert_ne!(
            recover(&voucher_digest(channel.id, 301, escrow, TEMPO_CHAIN_ID), &signature),
            Some(signer.address())
        );
    }

    #[test]
    fn the_payload_has_the_wire_shape_of_the_crate() {
        let payload = SessionPayload::Voucher {
            channel_id: "0xabc".to_owned(),
            cumulative_amount: "5000".to_owned(),
            signature: "0xdef".to_owned(),
        };
        let json = serde_json::to_value(&payload).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"action":"voucher","channelId":"0xabc","cumulativeAmount":"5000","signature":"0xdef"})
        );
    }
}
