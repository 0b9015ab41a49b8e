//! The `upto` scheme on EVM (x402 v2): the client authorises a **maximum** with a Permit2
//! `permitWitnessTransferFrom` signature whose witness names the payee, the facilitator allowed to
//! settle it and `validAfter`; the server settles the amount actually used (≤ the maximum) and
//! reports it in the settlement's `amount`.
//!
//! As the official SDKs sign it (x402 2.25, `mechanisms/evm/upto`): EIP-712 domain
//! `{name: "Permit2", chainId, verifyingContract: PERMIT2}` (no version); `spender` is the
//! `x402UptoPermit2Proxy`; `nonce` a uint256 written in decimal; `deadline = now + timeout`;
//! `validAfter = 0`; `permitted.amount` equals the requirement's `amount`.

use alloy_primitives::{address, Address, B256, U256};
use alloy_sol_types::{sol, Eip712Domain, SolStruct};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{clip, X402Error};
use super::policy::{atomic_to_micros, parse_address};
use super::sign::{EvmSigner, Nonce};
use super::wire::{PaymentRequirementsV2, ResourceInfo, SettlementResponse, V2};
use crate::money::{AmountError, Micros};

/// The scheme's name in requirements and payments.
pub const UPTO: &str = "upto";
/// The canonical Permit2 contract (same address on every chain).
pub const PERMIT2_ADDRESS: Address = address!("000000000022D473030F116dDEE9F6B43aC78BA3");
/// The `x402UptoPermit2Proxy` contract: the `spender` of every upto permit.
pub const UPTO_PERMIT2_PROXY_ADDRESS: Address = address!("4020A4f3b7b90ccA423B9fabCc0CE57C6C240002");

sol! {
    /// Permit2's token and maximum amount.
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    /// The upto witness: who is paid, which facilitator may settle, from when.
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// Permit2's `PermitWitnessTransferFrom` with the upto witness.
    struct PermitWitnessTransferFrom {
        TokenPermissions permitted;
        address spender;
        uint256 nonce;
        uint256 deadline;
        Witness witness;
    }
}

/// `permit2Authorization.permitted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UptoPermitted {
    pub token: String,
    /// The maximum, in atomic units (decimal string).
    pub amount: String,
}

/// `permit2Authorization.witness`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoWitness {
    pub to: String,
    pub facilitator: String,
    pub valid_after: String,
}

/// The parameters of the signed permit, as they travel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoPermit2Authorization {
    pub from: String,
    pub permitted: UptoPermitted,
    pub spender: String,
    /// uint256, decimal.
    pub nonce: String,
    /// Unix seconds, decimal: the permit is dead after it.
    pub deadline: String,
    pub witness: UptoWitness,
}

/// The `payload` of an upto payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoPermit2Payload {
    /// 65 bytes r‖s‖v, 0x-hex.
    pub signature: String,
    pub permit2_authorization: UptoPermit2Authorization,
}

/// A v2 payment in the upto scheme (`PAYMENT-SIGNATURE`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UptoPaymentPayloadV2 {
    pub x402_version: V2,
    pub accepted: PaymentRequirementsV2,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub payload: UptoPermit2Payload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// The EIP-712 domain of Permit2 on a chain.
fn permit2_domain(chain_id: u64) -> Eip712Domain {
    Eip712Domain::new(
        Some(std::borrow::Cow::Borrowed("Permit2")),
        None,
        Some(U256::from(chain_id)),
        Some(PERMIT2_ADDRESS),
        None,
    )
}

fn uint(field: &'static str, text: &str) -> Result<U256, X402Error> {
    U256::from_str_radix(text, 10).map_err(|_| X402Error::BadField {
        what: "permit2Authorization",
        detail: format!("`{field}` is not a decimal uint256: {:?}", clip(text)),
    })
}

/// The EIP-712 signing hash of an upto permit on `chain_id`.
pub fn upto_digest(authorization: &UptoPermit2Authorization, chain_id: u64) -> Result<B256, X402Error> {
    let message = PermitWitnessTransferFrom {
        permitted: TokenPermissions {
            token: parse_address("permitted.token", &authorization.permitted.token)?,
            amount: uint("permitted.amount", &authorization.permitted.amount)?,
        },
        spender: parse_address("spender", &authorization.spender)?,
        nonce: uint("nonce", &authorization.nonce)?,
        deadline: uint("deadline", &authorization.deadline)?,
        witness: Witness {
            to: parse_address("witness.to", &authorization.witness.to)?,
            facilitator: parse_address("witness.facilitator", &authorization.witness.facilitator)?,
            validAfter: uint("witness.validAfter", &authorization.witness.valid_after)?,
        },
    };
    Ok(message.eip712_signing_hash(&permit2_domain(chain_id)))
}

/// Signs an upto permit with the daemon's key.
pub fn sign_upto(
    authorization: UptoPermit2Authorization,
    chain_id: u64,
    signer: &EvmSigner,
) -> Result<UptoPermit2Payload, X402Error> {
    let digest = upto_digest(&authorization, chain_id)?;
    let signature = signer.sign_digest(&digest)?;
    Ok(UptoPermit2Payload {
        signature: format!("0x{}", ::hex::encode(signature)),
        permit2_authorization: authorization,
    })
}

/// The address whose key signed an upto permit on `chain_id` (what a facilitator checks).
pub fn recover_upto_signer(payload: &UptoPermit2Payload, chain_id: u64) -> Result<Address, X402Error> {
    let digest = upto_digest(&payload.permit2_authorization, chain_id)?;
    let hex = payload.signature.strip_prefix("0x").unwrap_or(&payload.signature);
    let bytes = ::hex::decode(hex).map_err(|_| X402Error::BadSignature { detail: "not hex".to_owned() })?;
    let signature = alloy_primitives::Signature::from_raw(&bytes)
        .map_err(|err| X402Error::BadSignature { detail: err.to_string() })?;
    signature.recover_address_from_prehash(&digest).map_err(|err| X402Error::BadSignature { detail: err.to_string() })
}

/// A 32-byte nonce as Permit2's uint256, in decimal.
pub fn nonce_decimal(nonce: &Nonce) -> String {
    U256::from_be_bytes(*nonce.as_bytes()).to_string()
}

/// Reads a decimal uint256 Permit2 nonce back into its 32 bytes.
pub fn nonce_from_decimal(text: &str) -> Result<Nonce, X402Error> {
    let value = U256::from_str_radix(text, 10).map_err(|_| X402Error::BadNonce { value: clip(text) })?;
    format!("0x{}", ::hex::encode(value.to_be_bytes::<32>())).parse()
}

/// What the server says it settled for an upto payment, judged against the authorised maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UptoSettled {
    /// The reported amount, within the maximum (zero included).
    Within(Micros),
    /// The report names more than was authorised: the permit cannot move more than the maximum,
    /// so the maximum is what may have moved. An incident.
    AboveMaximum { reported: Micros },
    /// The report has no readable `amount` (the scheme requires one): up to the maximum may have
    /// moved. An incident.
    Unreadable,
}

/// Reads the settled amount of an upto settlement report, in the token's `decimals`.
pub fn upto_settled_amount(settlement: &SettlementResponse, decimals: u32, maximum: Micros) -> UptoSettled {
    let Some(text) = settlement.amount.as_deref() else {
        return UptoSettled::Unreadable;
    };
    match atomic_to_micros(text, decimals) {
        Ok(amount) if amount <= maximum => UptoSettled::Within(amount),
        Ok(amount) => UptoSettled::AboveMaximum { reported: amount },
        Err(AmountError::Zero) => UptoSettled::Within(Micros::ZERO),
        Err(AmountError::TooLarge) => UptoSettled::AboveMaximum { reported: Micros::MAX },
        Err(_) => UptoSettled::Unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    /// A permit signed with the public test key (specs/README.md's key, payee and token; the
    /// exact vector's nonce as a uint256; Anvil's second account as facilitator).
    fn vector() -> UptoPermit2Authorization {
        UptoPermit2Authorization {
            from: "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266".to_owned(),
            permitted: UptoPermitted {
                token: "0x036CbD53842c5426634e7929541eC2318f3dCF7e".to_owned(),
                amount: "5000000".to_owned(),
            },
            spender: "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002".to_owned(),
            nonce: "110117680976134290040645500446194905769275902069351365960831693135107775870080".to_owned(),
            deadline: "1740672154".to_owned(),
            witness: UptoWitness {
                to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C".to_owned(),
                facilitator: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".to_owned(),
                valid_after: "0".to_owned(),
            },
        }
    }

    /// Digest and signature as the official x402 Python package 2.25 makes them: its
    /// `upto.client._build_upto_permit2_typed_data` for this permit, signed by `eth_account`.
    #[test]
    fn the_official_sdks_digest_and_signature_reproduce_byte_for_byte() {
        let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
        let digest = upto_digest(&vector(), 84532).expect("valid permit");
        assert_eq!(format!("{digest}"), "0x3a3fa81c2e644ecd8adbde9caf3e955debe06c3bdbbe3bcd53dd3370766faf70");
        let payload = sign_upto(vector(), 84532, &signer).expect("signs");
        assert_eq!(
            payload.signature,
            "0xced032f3da2ae9ec21b649b1662bb3d4e5deae206d4fb4654f669aa1afdcd37f\
             297af77b4162d64878ebecc5a83602197b8874be3294a5432ce6532a366ed1d01b"
        );
    }

    #[test]
    fn nonces_round_trip_between_hex_and_decimal() {
        let nonce: Nonce = "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480".parse().expect("valid");
        let decimal = nonce_decimal(&nonce);
        assert_eq!(decimal, vector().nonce);
        assert_eq!(nonce_from_decimal(&decimal).expect("valid"), nonce);
        assert_eq!(nonce_from_decimal("x").map_err(|e| e.code()), Err("x402_bad_nonce"));
    }

    #[test]
    fn the_signature_recovers_to_the_signer_and_not_after_tampering() {
        let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
        let payload = sign_upto(vector(), 84532, &signer).expect("signs");
        assert_eq!(recover_upto_signer(&payload, 84532).expect("recovers"), signer.address());
        assert_ne!(recover_upto_signer(&payload, 8453).expect("recovers some address"), signer.address());
        let mut raised = payload.clone();
        raised.permit2_authorization.permitted.amount = "5000001".to_owned();
        assert_ne!(recover_upto_signer(&raised, 84532).expect("recovers some address"), signer.address());
        let mut other_facilitator = payload;
        other_facilitator.permit2_authorization.witness.facilitator =
            "0x209693Bc6afc0C5328bA36FaF03C514EF312287C".into();
        assert_ne!(recover_upto_signer(&other_facilitator, 84532).expect("recovers some address"), signer.address());
    }

    #[test]
    fn settled_amounts_are_judged_against_the_maximum() {
        let maximum = Micros::new(5_000_000).expect("valid");
        let report = |amount: Option<&str>| SettlementResponse {
            success: true,
            error_reason: None,
            error_message: None,
            payer: None,
            transaction: "0x1".to_owned(),
            network: "eip155:84532".to_owned(),
            amount: amount.map(str::to_owned),
        };
        let micros = |n| Micros::new(n).expect("valid");
        assert_eq!(upto_settled_amount(&report(Some("2350000")), 6, maximum), UptoSettled::Within(micros(2_350_000)));
        assert_eq!(upto_settled_amount(&report(Some("5000000")), 6, maximum), UptoSettled::Within(maximum));
        assert_eq!(upto_settled_amount(&report(Some("0")), 6, maximum), UptoSettled::Within(Micros::ZERO));
        assert_eq!(
            upto_settled_amount(&report(Some("5000001")), 6, maximum),
            UptoSettled::AboveMaximum { reported: micros(5_000_001) }
        );
        assert_eq!(
            upto_settled_amount(&report(Some(&"9".repeat(40))), 6, maximum),
            UptoSettled::AboveMaximum { reported: Micros::MAX }
        );
        assert_eq!(upto_settled_amount(&report(None), 6, maximum), UptoSettled::Unreadable);
        assert_eq!(upto_settled_amount(&report(Some("-1")), 6, maximum), UptoSettled::Unreadable);
    }
}
