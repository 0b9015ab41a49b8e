//! Which x402 requirement the daemon is willing to pay, and the [`Choice`] it makes.
//!
//! Only the `exact` scheme over EIP-3009 is paid, only on allow-listed (chain, token) pairs, and
//! only when the server names the token's real EIP-712 domain: a wrong `extra.name` would make the
//! daemon sign for another contract's domain, which at best fails and at worst is a phishing
//! attempt, so it is refused rather than corrected.

use std::collections::BTreeMap;
use std::str::FromStr;

use alloy_primitives::{address, Address};
use serde_json::{Map, Value};

use super::error::{clip, X402Error};
use super::sign::TokenDomain;
use super::wire::{
    PaymentRequired, PaymentRequiredV2, PaymentRequirementsV1, PaymentRequirementsV2, ResourceInfo, X402Version,
};
use crate::intent::{PaymentIntent, Protocol};
use crate::money::{AmountError, Micros};

/// v1 network names and their EVM chain ids. v2 names networks by CAIP-2 id (`eip155:<chain id>`).
const V1_NETWORKS: [(&str, u64); 7] = [
    ("base", 8453),
    ("base-sepolia", 84532),
    ("ethereum", 1),
    ("polygon", 137),
    ("polygon-amoy", 80002),
    ("avalanche", 43114),
    ("avalanche-fuji", 43113),
];

/// The chain id a requirement's `network` names, in the spelling of its protocol version.
pub fn chain_id_of_network(network: &str, version: X402Version) -> Option<u64> {
    match version {
        X402Version::V1 => V1_NETWORKS.iter().find(|(name, _)| *name == network).map(|(_, id)| *id),
        X402Version::V2 => {
            let digits = network.strip_prefix("eip155:")?;
            // One spelling per chain: no sign, no leading zero.
            if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        }
    }
}

/// One token the daemon may pay with, and the EIP-712 domain its contract uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedAsset {
    pub chain_id: u64,
    /// The token contract (the EIP-712 `verifyingContract`).
    pub asset: Address,
    /// EIP-712 domain `name`, e.g. "USD Coin" on Base mainnet but "USDC" on Base Sepolia.
    pub name: String,
    /// EIP-712 domain `version`.
    pub version: String,
    /// How many decimals the token's atomic unit has; a USD stablecoin only (1 token = 1 USD).
    pub decimals: u32,
}

impl AllowedAsset {
    /// The EIP-712 domain authorizations for this token are signed under.
    pub fn domain(&self) -> TokenDomain {
        TokenDomain {
            name: self.name.clone(),
            version: self.version.clone(),
            chain_id: self.chain_id,
            verifying_contract: self.asset,
        }
    }

    /// Circle's USDC on Base, Base Sepolia and Ethereum mainnet.
    pub fn default_usdc() -> Vec<AllowedAsset> {
        let usdc = |chain_id, asset, name: &str| AllowedAsset {
            chain_id,
            asset,
            name: name.to_owned(),
            version: "2".to_owned(),
            decimals: 6,
        };
        vec![
            usdc(8453, address!("833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"), "USD Coin"),
            usdc(84532, address!("036CbD53842c5426634e7929541eC2318f3dCF7e"), "USDC"),
            usdc(1, address!("A0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"), "USD Coin"),
        ]
    }
}

/// What the daemon is willing to pay over x402.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub assets: Vec<AllowedAsset>,
    /// No single payment above this, whatever the agent's budget.
    pub max_payment: Micros,
    /// The longest an authorization may stay valid: `validBefore` is at most now + this, so that a
    /// hold on an unsettled authorization ends soon.
    pub max_validity_secs: u64,
}

impl Policy {
    /// The default allow-list ([`AllowedAsset::default_usdc`]) with the given limits.
    pub fn with_default_assets(max_payment: Micros, max_validity_secs: u64) -> Policy {
        Policy { assets: AllowedAsset::default_usdc(), max_payment, max_validity_secs }
    }
}

/// The requirement the daemon decided to pay, with everything needed to sign and account for it.
///
/// Only [`choose`] makes one, so every `Choice` passed the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    requirement: ChosenRequirement,
    /// v2: the `resource` of the PaymentRequired, echoed in the payment.
    resource: Option<ResourceInfo>,
    /// v2: the extensions the server declared, echoed in the payment.
    extensions: Option<Map<String, Value>>,
    amount: Micros,
    atomic_amount: String,
    pay_to: Address,
    asset: Address,
    chain_id: u64,
    timeout_secs: u64,
    domain: TokenDomain,
    scheme: PaymentScheme,
    decimals: u32,
}

/// How the chosen requirement is paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaymentScheme {
    /// `exact`: an EIP-3009 authorization of exactly the amount.
    Exact,
    /// `upto` (v2): a Permit2 authorization of the amount as a maximum, settleable only by
    /// `facilitator`; the server settles what was used.
    Upto { facilitator: Address },
}

/// The chosen requirement, exactly as the server sent it.
#[derive(Clone, Debug, PartialEq)]
pub enum ChosenRequirement {
    V1(PaymentRequirementsV1),
    V2(PaymentRequirementsV2),
}

impl Choice {
    pub fn version(&self) -> X402Version {
        match self.requirement {
            ChosenRequirement::V1(_) => X402Version::V1,
            ChosenRequirement::V2(_) => X402Version::V2,
        }
    }

    pub fn requirement(&self) -> &ChosenRequirement {
        &self.requirement
    }

    /// How the payment is signed and settled.
    pub fn scheme(&self) -> PaymentScheme {
        self.scheme
    }

    /// How many decimals the token's atomic unit has (to read a settled amount).
    pub fn decimals(&self) -> u32 {
        self.decimals
    }

    /// What the payment costs (`exact`), or the most it can cost (`upto`): what is held.
    pub fn amount(&self) -> Micros {
        self.amount
    }

    /// The amount in the token's atomic units, canonical decimal (what `value` is signed as).
    pub fn atomic_amount(&self) -> &str {
        &self.atomic_amount
    }

    pub fn pay_to(&self) -> Address {
        self.pay_to
    }

    /// The requirement's `network`, as the server spelled it.
    pub fn network(&self) -> &str {
        match &self.requirement {
            ChosenRequirement::V1(requirement) => &requirement.network,
            ChosenRequirement::V2(requirement) => &requirement.network,
        }
    }

    pub fn asset(&self) -> Address {
        self.asset
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// How long the authorization will be valid: the server's `maxTimeoutSeconds`, capped by the
    /// policy's window.
    pub fn timeout_secs(&self) -> u64 {
        self.timeout_secs
    }

    /// The `validBefore` an authorization signed at `now_secs` gets.
    pub fn valid_before(&self, now_secs: u64) -> u64 {
        now_secs.saturating_add(self.timeout_secs)
    }

    /// The EIP-712 domain the authorization is signed for.
    pub fn domain(&self) -> &TokenDomain {
        &self.domain
    }

    pub(crate) fn resource(&self) -> Option<&ResourceInfo> {
        self.resource.as_ref()
    }

    pub(crate) fn extensions(&self) -> Option<&Map<String, Value>> {
        self.extensions.as_ref()
    }

    /// The ledger's view of this payment. `service` is the resource URL's host (the URL itself
    /// when it has none); the caller adds the nonce to `details` once it has one.
    pub fn intent(&self, resource_url: &str) -> PaymentIntent {
        let service = http::Uri::from_str(resource_url)
            .ok()
            .and_then(|uri| uri.host().map(str::to_ascii_lowercase))
            .unwrap_or_else(|| clip(resource_url));
        let details = BTreeMap::from([
            ("pay_to".to_owned(), self.pay_to.to_string()),
            ("network".to_owned(), self.network().to_owned()),
            ("asset".to_owned(), self.asset.to_string()),
        ]);
        PaymentIntent { amount: self.amount, service, protocol: Protocol::X402, details }
    }
}

/// Picks the cheapest requirement the policy accepts; on a tie, the server's first.
///
/// When nothing is acceptable and every requirement was refused for the same reason, that reason
/// is the error (a single `wrong EIP-712 name` reads better than a list of one); otherwise
/// [`X402Error::NoAcceptableRequirement`] lists each requirement's reason.
pub fn choose(required: &PaymentRequired, policy: &Policy) -> Result<Choice, X402Error> {
    let outcomes: Vec<Result<Choice, X402Error>> = match required {
        PaymentRequired::V1(required) => required.accepts.iter().map(|r| consider_v1(r, policy)).collect(),
        PaymentRequired::V2(required) => required.accepts.iter().map(|r| consider_v2(r, required, policy)).collect(),
    };
    let mut best: Option<Choice> = None;
    let mut refusals = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(choice) if best.as_ref().is_none_or(|b| choice.amount < b.amount) => best = Some(choice),
            Ok(_) => {}
            Err(err) => refusals.push(err),
        }
    }
    if let Some(choice) = best {
        return Ok(choice);
    }
    match refusals.first() {
        Some(first) if refusals.iter().all(|err| err.code() == first.code()) => Err(first.clone()),
        _ => Err(X402Error::NoAcceptableRequirement {
            reasons: if refusals.is_empty() {
                vec!["the server offered no way to pay".to_owned()]
            } else {
                refusals.iter().map(ToString::to_string).collect()
            },
        }),
    }
}

/// The facts of one requirement that the policy looks at, whatever its version.
struct Offer<'a> {
    version: X402Version,
    scheme: &'a str,
    network: &'a str,
    amount: &'a str,
    asset: &'a str,
    pay_to: &'a str,
    max_timeout_seconds: u64,
    extra: Option<&'a Map<String, Value>>,
}

fn consider_v1(requirement: &PaymentRequirementsV1, policy: &Policy) -> Result<Choice, X402Error> {
    let offer = Offer {
        version: X402Version::V1,
        scheme: &requirement.scheme,
        network: &requirement.network,
        amount: &requirement.max_amount_required,
        asset: &requirement.asset,
        pay_to: &requirement.pay_to,
        max_timeout_seconds: requirement.max_timeout_seconds,
        extra: requirement.extra.as_ref(),
    };
    accept(&offer, policy, ChosenRequirement::V1(requirement.clone()), None, None)
}

fn consider_v2(
    requirement: &PaymentRequirementsV2,
    required: &PaymentRequiredV2,
    policy: &Policy,
) -> Result<Choice, X402Error> {
    let offer = Offer {
        version: X402Version::V2,
        scheme: &requirement.scheme,
        network: &requirement.network,
        amount: &requirement.amount,
        asset: &requirement.asset,
        pay_to: &requirement.pay_to,
        max_timeout_seconds: requirement.max_timeout_seconds,
        extra: requirement.extra.as_ref(),
    };
    accept(
        &offer,
        policy,
        ChosenRequirement::V2(requirement.clone()),
        required.resource.clone(),
        required.extensions.clone(),
    )
}

fn accept(
    offer: &Offer<'_>,
    policy: &Policy,
    requirement: ChosenRequirement,
    resource: Option<ResourceInfo>,
    extensions: Option<Map<String, Value>>,
) -> Result<Choice, X402Error> {
    let extra_text = |key: &str| offer.extra.and_then(|extra| extra.get(key));
    let scheme = match (offer.scheme, offer.version) {
        ("exact", _) => {
            // `exact` on EVM also has a Permit2 variant, signed differently; only EIP-3009 is spoken here.
            if let Some(method) = extra_text("assetTransferMethod") {
                if method.as_str() != Some("eip3009") {
                    return Err(X402Error::UnsupportedScheme {
                        scheme: format!("exact ({})", clip(&method.to_string())),
                    });
                }
            }
            PaymentScheme::Exact
        }
        // The permit names the one facilitator allowed to settle it; without one it cannot be signed.
        ("upto", X402Version::V2) => match extra_text("facilitatorAddress").and_then(Value::as_str) {
            Some(text) => PaymentScheme::Upto { facilitator: parse_address("extra.facilitatorAddress", text)? },
            None => {
                return Err(X402Error::MissingField {
                    what: "upto requirement",
                    field: "extra.facilitatorAddress".into(),
                })
            }
        },
        _ => return Err(X402Error::UnsupportedScheme { scheme: clip(offer.scheme) }),
    };
    let chain_id = chain_id_of_network(offer.network, offer.version)
        .filter(|id| policy.assets.iter().any(|allowed| allowed.chain_id == *id))
        .ok_or_else(|| X402Error::UnknownNetwork { network: clip(offer.network) })?;
    let asset = parse_address("asset", offer.asset)?;
    let allowed = policy
        .assets
        .iter()
        .find(|allowed| allowed.chain_id == chain_id && allowed.asset == asset)
        .ok_or_else(|| X402Error::UnknownAsset { network: clip(offer.network), asset: asset.to_string() })?;
    // The server's domain must be the token's. A server that leaves it out gets the known one.
    for (field, expected) in [("name", &allowed.name), ("version", &allowed.version)] {
        match extra_text(field) {
            None => {}
            Some(Value::String(found)) if found == expected => {}
            Some(found) => {
                let found = found.as_str().map_or_else(|| found.to_string(), str::to_owned);
                return Err(X402Error::DomainMismatch { field, expected: expected.clone(), found: clip(&found) });
            }
        }
    }
    let pay_to = parse_address("payTo", offer.pay_to)?;
    let amount = atomic_to_micros(offer.amount, allowed.decimals)
        .map_err(|source| X402Error::BadAmount { amount: clip(offer.amount), source })?;
    if amount > policy.max_payment {
        return Err(X402Error::OverPaymentMaximum { amount: amount.get(), maximum: policy.max_payment.get() });
    }
    let timeout_secs = offer.max_timeout_seconds.min(policy.max_validity_secs);
    if timeout_secs == 0 {
        return Err(X402Error::BadTimeout);
    }
    Ok(Choice {
        requirement,
        resource,
        extensions,
        amount,
        atomic_amount: canonical_digits(offer.amount).to_owned(),
        pay_to,
        asset,
        chain_id,
        timeout_secs,
        domain: allowed.domain(),
        scheme,
        decimals: allowed.decimals,
    })
}

/// Parses a 0x-prefixed 20-byte hex address, any letter case (no checksum is required).
pub fn parse_address(field: &'static str, text: &str) -> Result<Address, X402Error> {
    let bad = || X402Error::BadAddress { field, value: clip(text) };
    let hex = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).ok_or_else(bad)?;
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut bytes = [0u8; 20];
    ::hex::decode_to_slice(hex, &mut bytes).map_err(|_| bad())?;
    Ok(Address::from(bytes))
}

/// Converts an amount in a token's atomic units (digits only) into micro-USD, exactly: a token
/// with more than 6 decimals must not be asked for a fraction of a micro-dollar.
pub(crate) fn atomic_to_micros(atomic: &str, decimals: u32) -> Result<Micros, AmountError> {
    if atomic.is_empty() || !atomic.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::Malformed(clip(atomic)));
    }
    let digits = canonical_digits(atomic);
    let micros = if decimals <= 6 {
        // One atomic unit is worth 10^(6 - decimals) micros.
        Micros::from_decimal_str(digits, 6 - decimals)?
    } else {
        // Shift the decimal point left by (decimals - 6) places.
        let shift = (decimals - 6) as usize;
        if digits.len() <= shift {
            // Less than one micro-dollar: nothing, or a fraction of one.
            return Err(if digits == "0" { AmountError::Zero } else { AmountError::Fractional });
        }
        let (whole, fraction) = digits.split_at(digits.len() - shift);
        Micros::from_decimal_str(&format!("{whole}.{fraction}"), 0)?
    };
    if micros.is_zero() {
        return Err(AmountError::Zero);
    }
    Ok(micros)
}

/// `"0010"` → `"10"`, `"000"` → `"0"`: one spelling of a number.
fn canonical_digits(digits: &str) -> &str {
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() && !digits.is_empty() {
        "0"
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_units_convert_exactly_for_any_decimals() {
        let micros = |atomic: &str, decimals| atomic_to_micros(atomic, decimals).map(Micros::get).map_err(|e| e.code());
        assert_eq!(micros("10000", 6), Ok(10_000));
        assert_eq!(micros("0010000", 6), Ok(10_000));
        assert_eq!(micros("1", 2), Ok(10_000));
        assert_eq!(micros("1000000000000", 18), Ok(1));
        assert_eq!(micros("1500000000000000000", 18), Ok(1_500_000));
        assert_eq!(micros("1", 18), Err("amount_fractional"));
        assert_eq!(micros("999999999999", 18), Err("amount_fractional"));
        assert_eq!(micros("1000000000001", 18), Err("amount_fractional"));
        assert_eq!(micros("0", 18), Err("amount_zero"));
        assert_eq!(micros("5", u32::MAX), Err("amount_fractional"));
        assert_eq!(micros("0", 6), Err("amount_zero"));
        assert_eq!(micros("000", 6), Err("amount_zero"));
        assert_eq!(micros("1000000000000001", 6), Err("amount_too_large"));
        assert_eq!(micros(&"9".repeat(100), 6), Err("amount_too_large"));
        assert_eq!(micros("", 6), Err("amount_malformed"));
        assert_eq!(micros("-1", 6), Err("amount_malformed"));
    }

    #[test]
    fn addresses_are_20_byte_hex_in_any_case() {
        let lower = parse_address("payTo", "0x209693bc6afc0c5328ba36faf03c514ef312287c").expect("lowercase");
        let mixed = parse_address("payTo", "0x209693Bc6afc0C5328bA36FaF03C514EF312287C").expect("checksummed");
        assert_eq!(lower, mixed);
        for bad in
            ["209693bc6afc0c5328ba36faf03c514ef312287c", "0x209693bc", "0x209693bc6afc0c5328ba36faf03c514ef312287g", ""]
        {
            assert_eq!(parse_address("payTo", bad).map_err(|e| e.code()), Err("x402_bad_address"), "{bad:?}");
        }
    }

    #[test]
    fn networks_resolve_per_version() {
        assert_eq!(chain_id_of_network("base", X402Version::V1), Some(8453));
        assert_eq!(chain_id_of_network("base-sepolia", X402Version::V1), Some(84532));
        assert_eq!(chain_id_of_network("eip155:8453", X402Version::V2), Some(8453));
        assert_eq!(chain_id_of_network("eip155:8453", X402Version::V1), None);
        assert_eq!(chain_id_of_network("base", X402Version::V2), None);
        assert_eq!(chain_id_of_network("eip155:08453", X402Version::V2), None);
        assert_eq!(chain_id_of_network("eip155:", X402Version::V2), None);
        assert_eq!(chain_id_of_network("eip155:99999999999999999999999", X402Version::V2), None);
        assert_eq!(chain_id_of_network("solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", X402Version::V2), None);
    }

    #[test]
    fn intent_names_the_host_and_the_payee() {
        let required = PaymentRequired::V2(
            serde_json::from_value(serde_json::json!({
                "x402Version": 2,
                "accepts": [{
                    "scheme": "exact", "network": "eip155:8453", "amount": "250000",
                    "asset": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
                    "payTo": "0x209693bc6afc0c5328ba36faf03c514ef312287c", "maxTimeoutSeconds": 60,
                    "extra": {"name": "USD Coin", "version": "2"}
                }]
            }))
            .expect("valid PaymentRequired"),
        );
        let policy = Policy::with_default_assets(Micros::new(1_000_000).expect("valid"), 300);
        let choice = choose(&required, &policy).expect("acceptable");
        let intent = choice.intent("https://API.Example.com:8443/weather?city=Paris");
        assert_eq!(intent.amount.get(), 250_000);
        assert_eq!(intent.service, "api.example.com");
        assert_eq!(intent.protocol, Protocol::X402);
        assert_eq!(intent.details["pay_to"], "0x209693Bc6afc0C5328bA36FaF03C514EF312287C");
        assert_eq!(intent.details["network"], "eip155:8453");
        assert_eq!(intent.details["asset"], "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
        assert_eq!(choice.intent("not a url").service, "not a url");
    }
}
