//! Operator tokens: named bearer tokens with a [`Role`], optionally limited to one budget tree.
//! A token is `sco_op_<id>_<secret>` (id: 64 random bits, secret: 256, hex); only its SHA-256 is
//! stored, in the ledger (`<ns>:{ops}:…` keys, see `spendcap.lua`), so a revoked token stops at
//! once on every instance: every request reads the operator's record.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

use crate::identity::{MalformedId, TokenHash, TreeId};
use crate::roles::{Principal, Role};

fn hex_of(bytes: usize, os: bool) -> String {
    let mut buf = vec![0u8; bytes];
    if os {
        rand::rngs::OsRng.fill_bytes(&mut buf);
    } else {
        rand::thread_rng().fill_bytes(&mut buf);
    }
    hex::encode(buf)
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An operator's bearer token. Shown once, at creation; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken {
    secret: String,
    id: String,
}

impl OperatorToken {
    pub const PREFIX: &'static str = "sco_op_";

    pub fn generate() -> OperatorToken {
        let id = hex_of(8, false);
        OperatorToken { secret: format!("{}{}_{}", Self::PREFIX, id, hex_of(32, true)), id }
    }

    /// The operator's id (the record the ledger keeps under it).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.secret)
    }

    pub fn reveal(&self) -> &str {
        &self.secret
    }
}

impl FromStr for OperatorToken {
    type Err = MalformedId;
    fn from_str(text: &str) -> Result<OperatorToken, MalformedId> {
        let malformed = || MalformedId { kind: "operator token", text: "<redacted>".to_owned() };
        let rest = text.strip_prefix(Self::PREFIX).ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('_').ok_or_else(malformed)?;
        if !is_lower_hex(id, 16) || !is_lower_hex(secret, 64) {
            return Err(malformed());
        }
        Ok(OperatorToken { secret: text.to_owned(), id: id.to_owned() })
    }
}

impl fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperatorToken({}, <redacted>)", self.id)
    }
}

/// A new operator, as the ledger stores it.
#[derive(Clone, Debug)]
pub struct NewOperator {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub tree: Option<TreeId>,
    pub token_hash: TokenHash,
}

/// An operator as stored (never with its token; the hash stays inside the ledger's answer to
/// [`crate::ledger::Ledger::operator`] only for the constant-time comparison).
#[derive(Clone, Debug)]
pub struct OperatorRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub tree: Option<TreeId>,
    pub token_hash: TokenHash,
    pub created_at_ms: u64,
    pub created_by: String,
    pub revoked_at_ms: Option<u64>,
}

impl OperatorRecord {
    /// The principal this record stands for, if `presented` is its live token.
    pub fn authenticate(&self, presented: &OperatorToken) -> Option<Principal> {
        if self.revoked_at_ms.is_some() || !self.token_hash.matches(&presented.hash()) {
            return None;
        }
        Some(Principal { name: self.name.clone(), role: self.role, tree: self.tree.clone() })
    }
}

/// Operator names: 1 to 64 characters of `[a-z0-9_.-]`, and not `admin` (the bootstrap token's
/// name in the log).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "admin"
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_authenticate_only_while_live() {
        let token = OperatorToken::generate();
        let parsed: OperatorToken = token.reveal().parse().expect("parses");
        assert_eq!(parsed.id(), token.id());
        assert!(!format!("{token:?}").contains(&token.reveal()[24..]));
        let mut record = OperatorRecord {
            id: token.id().into(),
            name: "oncall".into(),
            role: Role::Operator,
            tree: None,
            token_hash: token.hash(),
            created_at_ms: 1,
            created_by: "admin".into(),
            revoked_at_ms: None,
        };
        assert_eq!(record.authenticate(&parsed).map(|p| p.role), Some(Role::Operator));
        let other = OperatorToken::generate();
        let forged: OperatorToken = format!("sco_op_{}_{}", token.id(), &other.reveal()[24..]).parse().expect("parses");
        assert!(record.authenticate(&forged).is_none(), "another secret under the same id");
        record.revoked_at_ms = Some(2);
        assert!(record.authenticate(&parsed).is_none(), "revoked");
        for bad in ["sco_op_", "sco_op_xyz_00", "sct_abc", &token.reveal()[..40]] {
            assert!(bad.parse::<OperatorToken>().is_err(), "{bad:?}");
        }
        assert!(valid_name("on-call.eu_1") && !valid_name("admin") && !valid_name("Bob") && !valid_name(""));
    }
}
