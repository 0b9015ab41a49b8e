//! Identities: agent, tree and hold ids, bearer tokens and their hashes.
//!
//! Ids carry the id of their budget tree (`ag_<tree>_<rand>`, `hd_<tree>_<rand>`), so the daemon
//! and orchestration scripts can compute every Redis key of an agent or hold from its id alone,
//! and all keys of a tree share one hash tag. A token names its agent (`sct_<agent>_<secret>`),
//! so authenticating it is one lookup of that agent; only the token's SHA-256 is stored.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {text:?} is malformed")]
pub struct MalformedId {
    pub kind: &'static str,
    pub text: String,
}

/// Random hex for ids: the thread's CSPRNG (ChaCha, seeded and reseeded from the OS), with no
/// system call per id — a hold id is made for every payment.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Random hex for secrets (tokens), straight from the OS.
fn secret_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A budget tree: a root agent and its descendants. 64 random bits, hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TreeId(String);

impl TreeId {
    pub fn generate() -> TreeId {
        TreeId(random_hex(8))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TreeId {
    type Err = MalformedId;
    fn from_str(text: &str) -> Result<TreeId, MalformedId> {
        if is_lower_hex(text, 16) {
            Ok(TreeId(text.to_owned()))
        } else {
            Err(MalformedId { kind: "tree id", text: text.to_owned() })
        }
    }
}

impl fmt::Display for TreeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `<prefix>_<tree:16 hex>_<rand:hex of len>`.
fn parse_tree_scoped(text: &str, prefix: &str, rand_len: usize, kind: &'static str) -> Result<TreeId, MalformedId> {
    let malformed = || MalformedId { kind, text: text.chars().take(80).collect() };
    let rest = text.strip_prefix(prefix).ok_or_else(malformed)?;
    let (tree, rand) = rest.split_once('_').ok_or_else(malformed)?;
    if !is_lower_hex(rand, rand_len) {
        return Err(malformed());
    }
    tree.parse().map_err(|_| malformed())
}

macro_rules! tree_scoped_id {
    ($name:ident, $prefix:literal, $rand_bytes:literal, $kind:literal) => {
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name {
            text: String,
            tree: TreeId,
        }

        impl $name {
            pub fn generate(tree: &TreeId) -> $name {
                $name { text: format!("{}{}_{}", $prefix, tree, random_hex($rand_bytes)), tree: tree.clone() }
            }

            pub fn tree(&self) -> &TreeId {
                &self.tree
            }

            pub fn as_str(&self) -> &str {
                &self.text
            }
        }

        impl FromStr for $name {
            type Err = MalformedId;
            fn from_str(text: &str) -> Result<$name, MalformedId> {
                let tree = parse_tree_scoped(text, $prefix, $rand_bytes * 2, $kind)?;
                Ok($name { text: text.to_owned(), tree })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }
    };
}

tree_scoped_id!(AgentId, "ag_", 8, "agent id");
tree_scoped_id!(HoldId, "hd_", 12, "hold id");

/// The SHA-256 of a bearer token, hex. This, never the token, is what is stored and compared.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash(String);

impl TokenHash {
    pub fn of(secret: &str) -> TokenHash {
        TokenHash(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A hash as its hex text (one read back from where it was stored).
    pub fn of_hex(hex: &str) -> TokenHash {
        TokenHash(hex.to_owned())
    }

    /// A hash as the ledger stored it (hex).
    pub fn from_stored(hex: String) -> TokenHash {
        TokenHash(hex)
    }

    /// Constant-time comparison of two hashes.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// An agent's bearer token: `sct_<agent id>_<256 random bits as 64 hex>`, or a task-scoped one
/// `sct_<agent id>_t<token id: 16 hex>_<64 hex>` (short-lived, for one task; see
/// `api/orchestrators.rs`). Shown once, at creation or rotation; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken {
    secret: String,
    agent: AgentId,
    task_token: Option<String>,
}

impl AgentToken {
    pub fn generate(agent: &AgentId) -> AgentToken {
        AgentToken { secret: format!("sct_{}_{}", agent, secret_hex(32)), agent: agent.clone(), task_token: None }
    }

    /// A new task-scoped token of `agent`, with a fresh token id.
    pub fn generate_task(agent: &AgentId) -> AgentToken {
        let id = random_hex(8);
        AgentToken {
            secret: format!("sct_{}_t{}_{}", agent, id, secret_hex(32)),
            agent: agent.clone(),
            task_token: Some(id),
        }
    }

    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// The id of a task-scoped token (16 hex), `None` for the agent's own token.
    pub fn task_token_id(&self) -> Option<&str> {
        self.task_token.as_deref()
    }

    /// What the ledger compares: the token's SHA-256, and for a task token `t<id>:<sha256>`,
    /// which the ledger looks up by id (see `check_token` in `spendcap.lua`).
    pub fn hash(&self) -> TokenHash {
        match &self.task_token {
            None => TokenHash::of(&self.secret),
            Some(id) => TokenHash(format!("t{id}:{}", TokenHash::of(&self.secret).0)),
        }
    }

    /// The plain SHA-256 of the token, as stored (for a task token, in its own record).
    pub fn secret_hash(&self) -> TokenHash {
        TokenHash::of(&self.secret)
    }

    /// The token itself, for the one response that shows it.
    pub fn reveal(&self) -> &str {
        &self.secret
    }
}

impl FromStr for AgentToken {
    type Err = MalformedId;
    fn from_str(text: &str) -> Result<AgentToken, MalformedId> {
        let malformed = || MalformedId { kind: "agent token", text: "<redacted>".to_owned() };
        let rest = text.strip_prefix("sct_").ok_or_else(malformed)?;
        let (agent, secret) = rest.rsplit_once('_').ok_or_else(malformed)?;
        if !is_lower_hex(secret, 64) {
            return Err(malformed());
        }
        let (agent, task_token) = match agent.rsplit_once('_') {
            Some((agent, id)) if id.len() == 17 && id.starts_with('t') && is_lower_hex(&id[1..], 16) => {
                (agent, Some(id[1..].to_owned()))
            }
            _ => (agent, None),
        };
        let agent = agent.parse().map_err(|_| malformed())?;
        Ok(AgentToken { secret: text.to_owned(), agent, task_token })
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentToken({}, <redacted>)", self.agent)
    }
}

/// The administrator's bearer token. Compared by hash in constant time; `Debug` redacts it.
#[derive(Clone)]
pub struct AdminToken {
    secret: String,
}

impl AdminToken {
    /// Admin tokens are chosen by the operator; they must still be long enough to resist guessing.
    pub const MIN_LEN: usize = 32;

    pub fn new(secret: String) -> Result<AdminToken, MalformedId> {
        if secret.len() < Self::MIN_LEN || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(MalformedId {
                kind: "admin token (at least 32 visible characters)",
                text: "<redacted>".to_owned(),
            });
        }
        Ok(AdminToken { secret })
    }

    pub fn generate() -> AdminToken {
        AdminToken { secret: format!("sca_{}", secret_hex(32)) }
    }

    pub fn reveal(&self) -> &str {
        &self.secret
    }

    pub fn verify(&self, presented: &str) -> bool {
        TokenHash::of(&self.secret).matches(&TokenHash::of(presented))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_tree_and_round_trip() {
        let tree = TreeId::generate();
        let agent = AgentId::generate(&tree);
        let parsed: AgentId = agent.as_str().parse().expect("generated id parses");
        assert_eq!(parsed.tree(), &tree);
        let hold = HoldId::generate(&tree);
        assert_eq!(hold.as_str().parse::<HoldId>().expect("parses").tree(), &tree);
        for bad in ["", "ag_", "ag_xyz_123", "hd_0123456789abcdef_00", "ag_0123456789ABCDEF_0123456789abcdef"] {
            assert!(bad.parse::<AgentId>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn tokens_name_their_agent_and_never_show_in_debug() {
        let agent = AgentId::generate(&TreeId::generate());
        let token = AgentToken::generate(&agent);
        let parsed: AgentToken = token.reveal().parse().expect("token parses");
        assert_eq!(parsed.agent(), &agent);
        assert!(parsed.hash().matches(&token.hash()));
        assert!(!format!("{token:?}").contains(&token.reveal()[40..]));
        let admin = AdminToken::generate();
        assert!(admin.verify(admin.reveal()));
        assert!(!admin.verify("sca_wrong"));
        assert!(!format!("{admin:?}").contains(admin.reveal()));
        assert!(AdminToken::new("short".into()).is_err());
    }

    #[test]
    fn task_tokens_name_their_agent_and_id_and_hash_apart() {
        let agent = AgentId::generate(&TreeId::generate());
        let token = AgentToken::generate_task(&agent);
        let parsed: AgentToken = token.reveal().parse().expect("task token parses");
        assert_eq!(parsed.agent(), &agent);
        let id = parsed.task_token_id().expect("a task token has an id").to_owned();
        assert_eq!(id.len(), 16);
        assert_eq!(parsed.hash().as_str(), format!("t{id}:{}", token.secret_hash().as_str()));
        assert!(AgentToken::generate(&agent).task_token_id().is_none());
        let bad = token.reveal().replacen("_t", "_x", 1);
        assert!(bad.parse::<AgentToken>().is_err(), "a mangled task token must not parse");
    }
}

/// An agent, as its bearer token names it: the plain caller identity every face hands the core.
/// The token itself is checked by the ledger inside the same atomic step as the operation (by its
/// SHA-256), so a rotated token stops at once.
#[derive(Clone)]
pub struct AgentAuth {
    pub agent: AgentId,
    pub token_hash: TokenHash,
}

impl AgentAuth {
    /// Whether the caller used a task-scoped token (which can pay, but manage nothing).
    pub fn is_task_token(&self) -> bool {
        self.token_hash.as_str().starts_with('t')
    }

    pub fn caller(&self) -> crate::ledger::Caller {
        crate::ledger::Caller::Agent(self.token_hash.clone())
    }
}
