//! The protocol-neutral description of one payment, which every adapter produces.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::money::Micros;

/// The payment protocols spendcap speaks. A closed set: adding one is a code change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    X402,
    Acp,
    Ap2,
    /// The generic budget authority: hold / settle / void for any other paid call.
    Generic,
    /// Keyed APIs: LLM and SaaS APIs called with the owner's API key (`/v1/apis/{name}/...`).
    Api,
    /// MPP (Machine Payments Protocol, `WWW-Authenticate: Payment`): `/v1/mpp/...`.
    Mpp,
}

impl Protocol {
    pub const ALL: [Protocol; 6] =
        [Protocol::X402, Protocol::Acp, Protocol::Ap2, Protocol::Generic, Protocol::Api, Protocol::Mpp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::X402 => "x402",
            Protocol::Acp => "acp",
            Protocol::Ap2 => "ap2",
            Protocol::Generic => "generic",
            Protocol::Api => "api",
            Protocol::Mpp => "mpp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}; expected one of x402, acp, ap2, generic, api, mpp")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(text: &str) -> Result<Protocol, UnknownProtocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == text).ok_or_else(|| UnknownProtocol(text.to_owned()))
    }
}

/// What an adapter asks the ledger to hold: how much, for whom it is paid, under which protocol.
///
/// `details` carries the protocol's own facts (x402 `payTo` and nonce, ACP checkout session id,
/// AP2 mandate ids, ...) into the log line and the receipt, as sorted string pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentIntent {
    pub amount: Micros,
    /// The payee as people name it: a host, a merchant, a payee id.
    pub service: String,
    pub protocol: Protocol,
    pub details: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip_and_unknown_ones_are_refused() {
        for protocol in Protocol::ALL {
            assert_eq!(protocol.as_str().parse::<Protocol>(), Ok(protocol));
        }
        assert!("X402".parse::<Protocol>().is_err());
        assert!("paypal".parse::<Protocol>().is_err());
    }
}
