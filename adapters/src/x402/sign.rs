//! EIP-3009 `TransferWithAuthorization` signing (EIP-712) with the daemon's EVM key.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use alloy_primitives::{Address, Signature, B256, U256};
use alloy_sol_types::{sol, Eip712Domain, SolStruct};
use k256::ecdsa::SigningKey;
use zeroize::Zeroizing;

use super::error::{clip, X402Error};
use super::payment_identifier::{payment_extensions, PaymentId};
use super::policy::{parse_address, Choice, ChosenRequirement, PaymentScheme};
use super::upto::{
    nonce_decimal, sign_upto, UptoPaymentPayloadV2, UptoPermit2Authorization, UptoPermitted, UptoWitness,
    UPTO_PERMIT2_PROXY_ADDRESS,
};
use super::wire::{
    ExactEvmAuthorization, ExactEvmPayload, PaymentPayload, PaymentPayloadV1, PaymentPayloadV2, Version,
};

sol! {
    /// The EIP-3009 typed struct, as USDC's contract hashes it.
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// v1 clients backdate `validAfter` by this much, to absorb clock skew with the facilitator.
const V1_VALID_AFTER_SKEW_SECS: u64 = 600;

/// The EIP-712 domain of a token contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDomain {
    pub name: String,
    pub version: String,
    pub chain_id: u64,
    pub verifying_contract: Address,
}

impl TokenDomain {
    fn eip712(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some(Cow::Owned(self.name.clone())),
            Some(Cow::Owned(self.version.clone())),
            Some(U256::from(self.chain_id)),
            Some(self.verifying_contract),
            None,
        )
    }
}

/// The master EVM key. Its `Debug` and `Display` show the address only, never the key.
#[derive(Clone)]
pub struct EvmSigner {
    key: SigningKey,
    address: Address,
}

impl EvmSigner {
    /// Reads a private key: 64 hex digits, with or without `0x`. The error never quotes the input.
    pub fn from_hex(text: &str) -> Result<EvmSigner, X402Error> {
        let text = text.trim();
        let hex = text.strip_prefix("0x").unwrap_or(text);
        // The buffer is wiped when dropped; the SigningKey wipes its own copy too.
        let mut bytes = Zeroizing::new([0u8; 32]);
        ::hex::decode_to_slice(hex, bytes.as_mut_slice()).map_err(|_| X402Error::BadPrivateKey)?;
        let key = SigningKey::from_slice(bytes.as_slice()).map_err(|_| X402Error::BadPrivateKey)?;
        let address = Address::from_private_key(&key);
        Ok(EvmSigner { key, address })
    }

    /// The address that pays, i.e. the `from` of every authorization.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Signs an EIP-712 digest: 65 bytes r‖s‖v with v = 27 or 28 (low-s, RFC 6979 deterministic).
    pub fn sign_digest(&self, digest: &B256) -> Result<[u8; 65], X402Error> {
        let (signature, recovery) = self
            .key
            .sign_prehash_recoverable(digest.as_slice())
            .map_err(|err| X402Error::SigningFailed { detail: err.to_string() })?;
        if recovery.is_x_reduced() {
            // Happens with probability ~2^-128; Ethereum's v cannot express it.
            return Err(X402Error::SigningFailed { detail: "x-reduced recovery id".to_owned() });
        }
        let signature = Signature::from_bytes_and_parity(&signature.to_bytes(), recovery.is_y_odd());
        Ok(signature.as_bytes())
    }
}

impl fmt::Debug for EvmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EvmSigner")
            .field("address", &format_args!("{}", self.address))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for EvmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EVM signer {} (key redacted)", self.address)
    }
}

/// An EIP-3009 nonce: 32 bytes, written 0x + 64 hex digits. Random for a new purchase; the same
/// one again for a retry of the same purchase, so that at most one authorization can settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nonce(B256);

impl Nonce {
    pub fn random() -> Nonce {
        Nonce(B256::from(rand::random::<[u8; 32]>()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0 .0
    }
}

impl FromStr for Nonce {
    type Err = X402Error;

    fn from_str(text: &str) -> Result<Nonce, X402Error> {
        let bad = || X402Error::BadNonce { value: clip(text) };
        let hex = text.strip_prefix("0x").ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        ::hex::decode_to_slice(hex, &mut bytes).map_err(|_| bad())?;
        Ok(Nonce(B256::from(bytes)))
    }
}

impl fmt::Display for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", ::hex::encode(self.0))
    }
}

/// The EIP-712 signing hash of an authorization under a token's domain.
pub fn authorization_digest(authorization: &ExactEvmAuthorization, domain: &TokenDomain) -> Result<B256, X402Error> {
    let uint = |field: &'static str, text: &str| {
        U256::from_str_radix(text, 10).map_err(|_| X402Error::BadField {
            what: "authorization",
            detail: format!("`{field}` is not a decimal uint256: {:?}", clip(text)),
        })
    };
    let nonce: Nonce = authorization.nonce.parse()?;
    let message = TransferWithAuthorization {
        from: parse_address("from", &authorization.from)?,
        to: parse_address("to", &authorization.to)?,
        value: uint("value", &authorization.value)?,
        validAfter: uint("validAfter", &authorization.valid_after)?,
        validBefore: uint("validBefore", &authorization.valid_before)?,
        nonce: nonce.0,
    };
    Ok(message.eip712_signing_hash(&domain.eip712()))
}

/// Signs an authorization and returns the payload that carries it.
pub fn sign_authorization(
    authorization: ExactEvmAuthorization,
    domain: &TokenDomain,
    signer: &EvmSigner,
) -> Result<ExactEvmPayload, X402Error> {
    let digest = authorization_digest(&authorization, domain)?;
    let signature = signer.sign_digest(&digest)?;
    Ok(ExactEvmPayload { signature: format!("0x{}", ::hex::encode(signature)), authorization })
}

/// The address whose key signed this payload under `domain` (for tests and for checking what a
/// server echoes back). Accepts v = 27/28 or 0/1.
pub fn recover_signer(payload: &ExactEvmPayload, domain: &TokenDomain) -> Result<Address, X402Error> {
    let digest = authorization_digest(&payload.authorization, domain)?;
    let hex = payload.signature.strip_prefix("0x").unwrap_or(&payload.signature);
    let bytes = ::hex::decode(hex).map_err(|_| X402Error::BadSignature { detail: "not hex".to_owned() })?;
    let signature = Signature::from_raw(&bytes).map_err(|err| X402Error::BadSignature { detail: err.to_string() })?;
    signature.recover_address_from_prehash(&digest).map_err(|err| X402Error::BadSignature { detail: err.to_string() })
}

/// What varies between two signatures of the same choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentTerms {
    /// A fresh [`Nonce::random`] for a new purchase, the stored one for a retry.
    pub nonce: Nonce,
    /// Unix seconds; never read from the clock in here.
    pub now_secs: u64,
    /// The `payment-identifier` id (v2), sent when the server declares the extension.
    pub payment_id: Option<PaymentId>,
}

/// Signs the chosen requirement: the EIP-3009 authorization of exactly the required amount to
/// `payTo`, wrapped in the PaymentPayload of the requirement's version.
///
/// v2 authorizations are valid from 0 until `now + timeout`; v1 ones from `now - 600` (as the
/// reference v1 clients sign) until `now + timeout`.
pub fn sign_payment(choice: &Choice, signer: &EvmSigner, terms: &PaymentTerms) -> Result<PaymentPayload, X402Error> {
    if let (PaymentScheme::Upto { facilitator }, ChosenRequirement::V2(requirement)) =
        (choice.scheme(), choice.requirement())
    {
        // As the official client signs it: the maximum, to the upto proxy, valid from 0 until
        // now + timeout, only for the payee and the facilitator the server named.
        let authorization = UptoPermit2Authorization {
            from: signer.address().to_string(),
            permitted: UptoPermitted { token: choice.asset().to_string(), amount: choice.atomic_amount().to_owned() },
            spender: UPTO_PERMIT2_PROXY_ADDRESS.to_string(),
            nonce: nonce_decimal(&terms.nonce),
            deadline: choice.valid_before(terms.now_secs).to_string(),
            witness: UptoWitness {
                to: choice.pay_to().to_string(),
                facilitator: facilitator.to_string(),
                valid_after: "0".to_owned(),
            },
        };
        return Ok(PaymentPayload::UptoV2(UptoPaymentPayloadV2 {
            x402_version: Version,
            accepted: requirement.clone(),
            resource: choice.resource().cloned(),
            payload: sign_upto(authorization, choice.chain_id(), signer)?,
            extensions: payment_extensions(choice.extensions(), terms.payment_id.as_ref())?,
        }));
    }
    let valid_after = match choice.requirement() {
        ChosenRequirement::V1(_) => terms.now_secs.saturating_sub(V1_VALID_AFTER_SKEW_SECS),
        ChosenRequirement::V2(_) => 0,
    };
    let authorization = ExactEvmAuthorization {
        from: signer.address().to_string(),
        to: choice.pay_to().to_string(),
        value: choice.atomic_amount().to_owned(),
        valid_after: valid_after.to_string(),
        valid_before: choice.valid_before(terms.now_secs).to_string(),
        nonce: terms.nonce.to_string(),
    };
    let payload = sign_authorization(authorization, choice.domain(), signer)?;
    Ok(match choice.requirement() {
        ChosenRequirement::V1(requirement) => PaymentPayload::V1(PaymentPayloadV1 {
            x402_version: Version,
            scheme: requirement.scheme.clone(),
            network: requirement.network.clone(),
            payload,
        }),
        ChosenRequirement::V2(requirement) => PaymentPayload::V2(PaymentPayloadV2 {
            x402_version: Version,
            accepted: requirement.clone(),
            resource: choice.resource().cloned(),
            payload,
            extensions: payment_extensions(choice.extensions(), terms.payment_id.as_ref())?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::address;

    /// The public test vector of specs/README.md (also reproduced by the official SDKs).
    const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    fn vector() -> (ExactEvmAuthorization, TokenDomain) {
        let authorization = ExactEvmAuthorization {
            from: "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266".to_owned(),
            to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C".to_owned(),
            value: "10000".to_owned(),
            valid_after: "1740672089".to_owned(),
            valid_before: "1740672154".to_owned(),
            nonce: "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480".to_owned(),
        };
        let domain = TokenDomain {
            name: "USDC".to_owned(),
            version: "2".to_owned(),
            chain_id: 84532,
            verifying_contract: address!("036CbD53842c5426634e7929541eC2318f3dCF7e"),
        };
        (authorization, domain)
    }

    #[test]
    fn test_vector_digest_and_signature_reproduce_byte_for_byte() {
        let (authorization, domain) = vector();
        let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
        assert_eq!(signer.address(), address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266"));
        let digest = authorization_digest(&authorization, &domain).expect("valid authorization");
        assert_eq!(format!("{digest}"), "0x50708d3bf7216e1aeabe7bf22081b9f36c7c287530f92510318f13a03d89dc86");
        let payload = sign_authorization(authorization, &domain, &signer).expect("signs");
        assert_eq!(
            payload.signature,
            "0xdc53a4a579de989368a0fae2ef2172ff2f474b4297013f865d171239f17ef4c3\
             157b4b4030f1bebc53d55ace15c2377dff501a60e1e56c291f1000d6e78f082f1b"
        );
        assert_eq!(recover_signer(&payload, &domain).expect("recovers"), signer.address());
    }

    #[test]
    fn a_signature_does_not_recover_to_the_signer_under_another_domain() {
        let (authorization, domain) = vector();
        let signer = EvmSigner::from_hex(TEST_KEY).expect("valid key");
        let payload = sign_authorization(authorization, &domain, &signer).expect("signs");
        let other = TokenDomain { name: "USD Coin".to_owned(), ..domain.clone() };
        assert_ne!(recover_signer(&payload, &other).expect("recovers some address"), signer.address());
        let mut tampered = payload.clone();
        tampered.authorization.value = "10001".to_owned();
        assert_ne!(recover_signer(&tampered, &domain).expect("recovers some address"), signer.address());
        let mut truncated = payload;
        truncated.signature.truncate(20);
        assert_eq!(recover_signer(&truncated, &domain).map_err(|e| e.code()), Err("x402_bad_signature"));
    }

    #[test]
    fn the_key_never_shows_in_debug_or_display() {
        let signer = EvmSigner::from_hex(&format!("  {}\n", TEST_KEY.trim_start_matches("0x"))).expect("valid key");
        let key_hex = TEST_KEY.trim_start_matches("0x");
        for shown in [format!("{signer:?}"), format!("{signer}"), format!("{signer:#?}")] {
            assert!(!shown.contains(key_hex), "{shown}");
            assert!(!shown.contains(&key_hex[..16]), "{shown}");
            assert!(shown.contains("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"), "{shown}");
        }
        for bad in ["", "0x1234", "zz", &"0".repeat(64), &"f".repeat(64)] {
            let err = EvmSigner::from_hex(bad).expect_err("invalid key");
            assert_eq!(err.code(), "x402_bad_private_key");
        }
    }

    #[test]
    fn nonces_are_32_bytes_of_hex() {
        let text = "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480";
        assert_eq!(text.parse::<Nonce>().expect("valid").to_string(), text);
        assert_eq!(text.to_uppercase().replacen("0X", "0x", 1).parse::<Nonce>().expect("valid").to_string(), text);
        for bad in ["", "0x", "f3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480", "0x1234"] {
            assert_eq!(bad.parse::<Nonce>().map_err(|e| e.code()), Err("x402_bad_nonce"), "{bad:?}");
        }
        let (a, b) = (Nonce::random(), Nonce::random());
        assert_ne!(a, b);
        let shown = a.to_string();
        assert_eq!(shown.len(), 66);
        assert!(shown.starts_with("0x") && shown[2..].bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
