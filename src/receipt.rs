//! Receipts: every settle yields one, signed with Ed25519 over RFC 8785 canonical JSON, and the
//! receipts of a budget tree form a hash chain.
//!
//! The settle function assigns the receipt's sequence number and stores its facts atomically
//! with the money movement. Usually it also links the receipt itself: the daemon that granted the
//! hold signs it before the settle ([`ReceiptSigner::presign`]) and the settle stores it only if
//! it is exactly that settle's receipt. Otherwise [`issue`] signs it after the settle and links it
//! after its predecessor. Signing is deterministic (Ed25519 over canonical bytes), so any daemon
//! instance can sign and link receipts another instance left unlinked (it crashed, or is
//! slower): the chain never forks and never keeps a gap.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use adapters::Micros;

use crate::identity::{HoldId, TreeId};
use crate::ledger::{ChainHead, Ledger, LedgerError, ReceiptFacts, ReceiptLink, SettleOutcome};

/// The `prev_hash` of the first receipt of a tree.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The signed content of a receipt. Field names are part of the stable receipt format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    pub version: u32,
    pub tree: String,
    pub seq: u64,
    pub prev_hash: String,
    pub hold_id: String,
    pub agent_id: String,
    pub amount_micros: u64,
    pub held_micros: u64,
    pub currency: String,
    pub task: String,
    pub service: String,
    pub protocol: String,
    pub settled_at_ms: u64,
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    #[schema(value_type = Object)]
    pub receipt: ReceiptBody,
    /// The first 16 hex digits of SHA-256 of the public key.
    pub key_id: String,
    /// Ed25519 signature of the canonical JSON of `receipt`, base64url without padding.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt JSON is malformed: {0}")]
    Malformed(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("receipt was signed by key {0}, not by the given key")]
    WrongKey(String),
    #[error("chain broken at {tree} seq {seq}: {reason}")]
    BrokenChain { tree: String, seq: u64, reason: String },
    #[error("signing key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The daemon's receipt signing key, the chain heads it last saw and the holds it granted.
/// `Debug` shows only the key id.
pub struct ReceiptSigner {
    key: SigningKey,
    /// The key's id, computed once (it is in every receipt).
    key_id: String,
    heads: HeadCache,
    holds: HoldCache,
    linker: Linker,
    settling: InFlight,
}

/// What a receipt states about the hold it settles, as the daemon that granted the hold asked
/// for it.
#[derive(Clone, Debug)]
pub struct HeldFacts {
    pub agent: String,
    pub held: Micros,
    pub task: String,
    pub service: String,
    pub protocol: String,
    /// The hold's details JSON exactly as the ledger was given it ('' for none).
    pub details: String,
}

/// Holds granted by this daemon and not settled yet; past this it forgets them all (their
/// settles then sign after the settle, one call more) and starts again.
const MAX_REMEMBERED_HOLDS: usize = 16_384;

#[derive(Default)]
struct HoldCache(Mutex<HashMap<String, HeldFacts>>);

/// A receipt signed before its settle, for the settle to link (see [`ReceiptSigner::presign`]).
pub struct Presigned {
    pub link: ReceiptLink,
    receipt: Receipt,
}

impl Presigned {
    /// The receipt as signed ahead: the settle's receipt if the settle links it.
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }
}

/// Trees whose chain head the daemon remembers; past this it forgets them all and starts again.
const MAX_CACHED_HEADS: usize = 65_536;

/// The chain head this daemon last linked or was told, per tree: the guess [`issue`] signs the
/// next receipt against. The guess is only that — `spendcap_receipt_link` refuses a receipt
/// whose predecessor is not the head and names the real one — so a stale entry (another
/// instance linked since) costs one more call, never a wrong chain.
#[derive(Default)]
struct HeadCache(Mutex<HashMap<TreeId, ChainHead>>);

impl HeadCache {
    fn get(&self, tree: &TreeId) -> Option<ChainHead> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(tree).cloned()
    }

    /// Remembers `head` unless a later one is already known.
    fn learn(&self, tree: &TreeId, head: &ChainHead) {
        let mut heads = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if heads.get(tree).is_some_and(|known| known.seq >= head.seq) {
            return;
        }
        if heads.len() >= MAX_CACHED_HEADS {
            heads.clear();
        }
        heads.insert(tree.clone(), head.clone());
    }
}

/// The receipts settled through this daemon whose settle did not link them (another settle of
/// the same tree took the sequence number the receipt was signed ahead for), per tree, so that
/// one settle links them all in one call: group commit. Without it, each of N concurrent settles
/// of one tree read the chain head, signed every receipt between the head and its own and raced
/// the others to link them: O(N²) signatures and calls for N settles.
#[derive(Default)]
struct Linker(Mutex<HashMap<TreeId, Arc<TreeLinks>>>);

#[derive(Default)]
struct TreeLinks {
    /// Held by the settle that is linking the tree's receipts; the others wait for their turn,
    /// and usually find their receipt linked by then.
    turn: tokio::sync::Mutex<()>,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// Settled, waiting for a link: the facts the settle recorded, by sequence number.
    waiting: BTreeMap<u64, ReceiptFacts>,
    /// Linked by another settle's turn: the receipt, for its own settle to pick up.
    linked: HashMap<u64, Receipt>,
}

impl LinkState {
    /// The waiting facts from `first` on, as long as they are consecutive, at most `max`.
    fn run_from(&self, first: u64, max: usize) -> Vec<ReceiptFacts> {
        self.waiting
            .range(first..)
            .zip(first..)
            .take_while(|((seq, _), want)| **seq == *want)
            .take(max)
            .map(|((_, facts), _)| facts.clone())
            .collect()
    }
}

/// A settle's place in its tree's [`Linker`] entry; leaving (done or cancelled) forgets what it
/// left there, and the entry itself when nobody else uses it.
struct Waiting<'a> {
    linker: &'a Linker,
    tree: TreeId,
    links: Arc<TreeLinks>,
    seq: Option<u64>,
}

impl Linker {
    /// Enters `tree`, with the facts of a receipt to link when there are some.
    fn enter(&self, tree: &TreeId, facts: Option<ReceiptFacts>) -> Waiting<'_> {
        let links = {
            let mut trees = self.0.lock().unwrap_or_else(|e| e.into_inner());
            trees.entry(tree.clone()).or_default().clone()
        };
        let seq = facts.map(|facts| {
            let seq = facts.seq;
            links.state.lock().unwrap_or_else(|e| e.into_inner()).waiting.insert(seq, facts);
            seq
        });
        Waiting { linker: self, tree: tree.clone(), links, seq }
    }
}

impl Waiting<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.links.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            let mut state = self.state();
            state.waiting.remove(&seq);
            state.linked.remove(&seq);
        }
        let mut trees = self.linker.0.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this settle hold the entry (nobody can take it from the map while
        // the map is locked): nobody else waits on the tree.
        if Arc::strong_count(&self.links) == 2 {
            trees.remove(&self.tree);
        }
    }
}

/// How many settles of each tree this daemon has in flight (from before the settle call until
/// its receipt is issued).
#[derive(Default)]
struct InFlight(Mutex<HashMap<TreeId, usize>>);

/// A settle in flight (see [`ReceiptSigner::settling`]); dropping it ends it.
pub struct Settling<'a> {
    in_flight: &'a InFlight,
    tree: TreeId,
    /// No other settle of the tree was in flight here when this one began.
    alone: bool,
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        let mut trees = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = trees.get_mut(&self.tree) {
            *count -= 1;
            if *count == 0 {
                trees.remove(&self.tree);
            }
        }
    }
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReceiptSigner(key_id {})", key_id(&self.key.verifying_key()))
    }
}

pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

impl ReceiptSigner {
    pub fn generate() -> ReceiptSigner {
        ReceiptSigner::new(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    fn new(key: SigningKey) -> ReceiptSigner {
        let key_id = key_id(&key.verifying_key());
        ReceiptSigner {
            key,
            key_id,
            heads: HeadCache::default(),
            holds: HoldCache::default(),
            linker: Linker::default(),
            settling: InFlight::default(),
        }
    }

    /// Loads the PKCS#8 PEM key at `path`, or generates one there (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<ReceiptSigner, ReceiptError> {
        let fail = |reason: String| ReceiptError::KeyFile { path: path.display().to_string(), reason };
        if path.exists() {
            let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| fail(e.to_string()))?;
            return Ok(ReceiptSigner::new(key));
        }
        let signer = ReceiptSigner::generate();
        let pem = signer.key.to_pkcs8_pem(Default::default()).map_err(|e| fail(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        write_private(path, pem.as_bytes()).map_err(|e| fail(e.to_string()))?;
        Ok(signer)
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn public_key_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }

    /// Learns a tree's chain head from the ledger (a hold's reply carries it), so that the next
    /// receipt of the tree can be signed ahead even if this daemon never linked one there.
    pub fn learn_head(&self, tree: &TreeId, head: &ChainHead) {
        self.heads.learn(tree, head);
    }

    /// Whether this daemon has a guess of the tree's chain head (if not, a hold asks for it).
    pub fn knows_head(&self, tree: &TreeId) -> bool {
        self.heads.get(tree).is_some()
    }

    /// Remembers a hold this daemon just granted, so that its settle can carry its receipt.
    pub fn remember_hold(&self, hold: &HoldId, facts: HeldFacts) {
        let mut holds = self.holds.0.lock().unwrap_or_else(|e| e.into_inner());
        if holds.len() >= MAX_REMEMBERED_HOLDS {
            holds.clear();
        }
        holds.insert(hold.to_string(), facts);
    }

    /// Marks a settle of `tree` in flight until the returned guard is dropped, which must be
    /// after its receipt is issued.
    pub fn settling(&self, tree: &TreeId) -> Settling<'_> {
        let mut trees = self.settling.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = trees.entry(tree.clone()).or_insert(0);
        *count += 1;
        Settling { in_flight: &self.settling, tree: tree.clone(), alone: *count == 1 }
    }

    /// The receipt of settling `hold` for `amount` at `now_ms` with `details` (the settle's
    /// details JSON, '' for none), signed ahead of the settle against the chain head this daemon
    /// last linked for the tree, if it granted the hold and knows the head. The settle links it
    /// only if it is exactly the settle's receipt (`spendcap_settle` checks the facts, the
    /// sequence number and the head), so a wrong guess costs a signature, never a wrong chain.
    ///
    /// Not signed when another settle of the tree is in flight here (`settling`): the head that
    /// settle is about to move is the one the guess would name, so the guess would be wrong; the
    /// receipt is then signed once, after the settle, by [`issue`] (grouped with the others).
    pub fn presign(
        &self,
        settling: &Settling<'_>,
        hold: &HoldId,
        now_ms: u64,
        amount: Micros,
        details: &str,
    ) -> Option<Presigned> {
        let held = self.holds.0.lock().unwrap_or_else(|e| e.into_inner()).remove(hold.as_str())?;
        if !settling.alone || settling.tree != *hold.tree() {
            return None;
        }
        let tree = hold.tree();
        let head = self.heads.get(tree)?;
        let facts = ReceiptFacts {
            tree: tree.clone(),
            seq: head.seq + 1,
            hold: hold.to_string(),
            agent: held.agent,
            amount: amount.get(),
            held: held.held.get(),
            task: held.task,
            service: held.service,
            protocol: held.protocol,
            ts_ms: now_ms,
            details: details.to_owned(),
            hold_details: held.details,
            signed: None,
        };
        let (receipt, hash) = self.sign(body_from_facts(&facts, &head.hash)).ok()?;
        let signed = serde_json::to_string(&receipt).ok()?;
        Some(Presigned { link: ReceiptLink { facts, prev_hash: head.hash, hash, signed }, receipt })
    }

    pub fn sign(&self, body: ReceiptBody) -> Result<(Receipt, String), ReceiptError> {
        let canonical = canonical(&body)?;
        let signature = self.key.sign(&canonical);
        let hash = hex::encode(Sha256::digest(&canonical));
        let receipt = Receipt {
            receipt: body,
            key_id: self.key_id.clone(),
            signature: URL_SAFE_NO_PAD.encode(signature.to_bytes()),
        };
        Ok((receipt, hash))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

fn canonical(body: &ReceiptBody) -> Result<Vec<u8>, ReceiptError> {
    serde_json_canonicalizer::to_vec(body).map_err(|e| ReceiptError::Malformed(e.to_string()))
}

/// The hash a receipt is named by in the chain: hex SHA-256 of its body's canonical JSON.
pub fn receipt_hash(receipt: &Receipt) -> Result<String, ReceiptError> {
    Ok(hex::encode(Sha256::digest(canonical(&receipt.receipt)?)))
}

fn body_from_facts(facts: &ReceiptFacts, prev_hash: &str) -> ReceiptBody {
    // The hold's details (payee, session, ...) overlaid by the settle's (transaction, order, ...).
    let object =
        |text: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).unwrap_or_default();
    let mut details = object(&facts.hold_details);
    details.extend(object(&facts.details));
    ReceiptBody {
        version: 1,
        tree: facts.tree.to_string(),
        seq: facts.seq,
        prev_hash: if prev_hash.is_empty() { GENESIS_HASH.to_owned() } else { prev_hash.to_owned() },
        hold_id: facts.hold.clone(),
        agent_id: facts.agent.clone(),
        amount_micros: facts.amount,
        held_micros: facts.held,
        currency: "USD".into(),
        task: facts.task.clone(),
        service: facts.service.clone(),
        protocol: facts.protocol.clone(),
        settled_at_ms: facts.ts_ms,
        details,
    }
}

fn parse_signed(text: &str) -> Result<Receipt, ReceiptError> {
    serde_json::from_str(text).map_err(|e| ReceiptError::Malformed(e.to_string()))
}

/// Signs and links the receipt a settle recorded, returning it. When this daemon knows the
/// tree's chain head (the usual case) this costs one ledger call; otherwise it reads the chain
/// head first. The receipts of one tree are linked by one settle at a time: a settle that finds
/// its receipt linked when its turn comes (by the settle before it, along with its own) is done
/// without a call, and the one whose turn it is links every receipt settled here and waiting
/// after the head in one call. When earlier receipts of the tree are not linked and not waiting
/// here (a daemon that died between settle and link, or another instance's), it reads them in
/// one call, signs them too — signing is deterministic, so every instance produces the same
/// bytes — and links them all in one call.
pub async fn issue(ledger: &Ledger, signer: &ReceiptSigner, settled: &SettleOutcome) -> Result<Receipt, ReceiptError> {
    let tree = &settled.facts.tree;
    let seq = settled.seq;
    // A replayed settle's receipt may be linked already: it is looked up, not offered.
    let waiting = signer.linker.enter(tree, (!settled.replayed).then(|| settled.facts.clone()));
    let _turn = waiting.links.turn.lock().await;
    if let Some(receipt) = waiting.state().linked.remove(&seq) {
        return Ok(receipt);
    }
    // A stale guess (another instance linked since) costs one refused link, which names the head.
    let mut head = match signer.heads.get(tree) {
        Some(guess) if guess.seq < seq && !settled.replayed => guess,
        _ => ledger.chain_head(tree).await?,
    };
    // Each round either links or learns a newer head; the bound guards against a ledger that
    // answers inconsistently.
    for _ in 0..64 {
        if head.seq >= seq {
            let facts = ledger
                .receipt(tree, seq)
                .await?
                .ok_or_else(|| LedgerError::Corrupt(format!("receipt {seq} of tree {tree} is missing")))?;
            if let Some(signed) = facts.signed {
                return parse_signed(&signed);
            }
            head = ledger.chain_head(tree).await?;
            continue;
        }
        // At most MAX_LINKS receipts per call: link the oldest missing ones first. The receipts
        // waiting here from the head on, ours included, need no read; others are read.
        let first = head.seq + 1;
        let mut pending = waiting.state().run_from(first, MAX_LINKS);
        if pending.last().is_none_or(|last| last.seq < seq.min(head.seq + MAX_LINKS as u64)) {
            pending = ledger.receipts(tree, first, seq.min(head.seq + MAX_LINKS as u64)).await?;
        }
        if pending.first().map(|f| f.seq) != Some(first) {
            return Err(LedgerError::Corrupt(format!("receipt {first} of tree {tree} is missing")).into());
        }
        let mut prev = head.hash.clone();
        let mut links = Vec::with_capacity(pending.len());
        let mut receipts = Vec::with_capacity(pending.len());
        for facts in pending {
            let (receipt, hash) = signer.sign(body_from_facts(&facts, &prev))?;
            let signed = serde_json::to_string(&receipt).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
            receipts.push(receipt);
            links.push(ReceiptLink { facts, prev_hash: std::mem::replace(&mut prev, hash.clone()), hash, signed });
        }
        let linked_to = links.last().map(|l| ChainHead { seq: l.facts.seq, hash: l.hash.clone() });
        match ledger.link_receipts(tree, &links).await? {
            Ok(()) => {
                if let Some(linked) = &linked_to {
                    signer.heads.learn(tree, linked);
                }
                let mut ours = None;
                {
                    // Hand the others their receipts (those still waiting for them).
                    let mut state = waiting.state();
                    for receipt in receipts {
                        let linked = receipt.receipt.seq;
                        if linked == seq {
                            ours = Some(receipt);
                        } else if state.waiting.remove(&linked).is_some() {
                            state.linked.insert(linked, receipt);
                        }
                    }
                }
                match (ours, linked_to) {
                    (Some(receipt), _) => return Ok(receipt),
                    (None, Some(linked)) => head = linked,
                    (None, None) => head = ledger.chain_head(tree).await?,
                }
            }
            Err(newer) => {
                signer.heads.learn(tree, &newer);
                head = newer;
            }
        }
    }
    Err(LedgerError::Corrupt(format!("could not link receipt {seq} of tree {tree}")).into())
}

/// At most this many receipts are linked in one call (`MAX_LINKS` of `spendcap_receipt_link`).
const MAX_LINKS: usize = 256;

/// The receipt of a settle made with `presigned` (see [`ReceiptSigner::presign`]): that one if
/// the settle linked it, else signed and linked now by [`issue`].
pub async fn issue_settled(
    ledger: &Ledger,
    signer: &ReceiptSigner,
    settled: &SettleOutcome,
    presigned: Option<Presigned>,
) -> Result<Receipt, ReceiptError> {
    if let Some(presigned) = presigned.filter(|_| settled.linked) {
        debug_assert_eq!(presigned.link.facts, settled.facts, "the settle linked a receipt for other facts");
        let head = ChainHead { seq: settled.seq, hash: presigned.link.hash };
        signer.heads.learn(&settled.facts.tree, &head);
        return Ok(presigned.receipt);
    }
    issue(ledger, signer, settled).await
}

/// Verifies one receipt's signature against `key`.
pub fn verify(receipt: &Receipt, key: &VerifyingKey) -> Result<(), ReceiptError> {
    if receipt.key_id != key_id(key) {
        return Err(ReceiptError::WrongKey(receipt.key_id.clone()));
    }
    let bytes = URL_SAFE_NO_PAD.decode(&receipt.signature).map_err(|_| ReceiptError::BadSignature)?;
    let signature = Signature::from_slice(&bytes).map_err(|_| ReceiptError::BadSignature)?;
    key.verify(&canonical(&receipt.receipt)?, &signature).map_err(|_| ReceiptError::BadSignature)
}

/// What a chain check found.
#[derive(Debug, PartialEq, Eq)]
pub struct ChainReport {
    pub receipts: usize,
    pub trees: usize,
}

/// Verifies receipts in export order (grouped by tree, in sequence): every signature, and within
/// each tree consecutive sequence numbers whose `prev_hash` names the previous receipt's hash. A
/// chain that starts at seq 1 must start from the genesis hash.
pub fn verify_chain(receipts: &[Receipt], key: &VerifyingKey) -> Result<ChainReport, ReceiptError> {
    let mut last: std::collections::HashMap<String, (u64, String)> = Default::default();
    for receipt in receipts {
        verify(receipt, key)?;
        let body = &receipt.receipt;
        let broken = |reason: String| ReceiptError::BrokenChain { tree: body.tree.clone(), seq: body.seq, reason };
        match last.get(&body.tree) {
            Some((seq, hash)) => {
                if body.seq != seq + 1 {
                    return Err(broken(format!("follows seq {seq}; a receipt is missing or out of order")));
                }
                if &body.prev_hash != hash {
                    return Err(broken("prev_hash does not name the previous receipt".into()));
                }
            }
            None if body.seq == 1 && body.prev_hash != GENESIS_HASH => {
                return Err(broken("the first receipt must name the genesis hash".into()));
            }
            None => {}
        }
        last.insert(body.tree.clone(), (body.seq, receipt_hash(receipt)?));
    }
    Ok(ChainReport { receipts: receipts.len(), trees: last.len() })
}

/// Decodes a base64url (or standard base64) Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ReceiptError> {
    let text = text.trim();
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
        .map_err(|e| ReceiptError::Malformed(format!("public key: {e}")))?;
    let bytes: [u8; 32] =
        bytes.try_into().map_err(|_| ReceiptError::Malformed("public key must be 32 bytes".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| ReceiptError::Malformed(format!("public key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(seq: u64) -> ReceiptFacts {
        ReceiptFacts {
            tree: "0123456789abcdef".parse().expect("valid tree id"),
            seq,
            hold: format!("hd_0123456789abcdef_{seq:024x}"),
            agent: "ag_0123456789abcdef_0000000000000001".into(),
            amount: 1_000 * seq,
            held: 2_000 * seq,
            task: "t".into(),
            service: "api.example.com".into(),
            protocol: "generic".into(),
            ts_ms: 1_700_000_000_000,
            details: r#"{"note":"é"}"#.into(),
            hold_details: r#"{"pay_to":"0xabc","note":"overridden"}"#.into(),
            signed: None,
        }
    }

    fn chain(signer: &ReceiptSigner, n: u64) -> Vec<Receipt> {
        let mut prev = String::new();
        (1..=n)
            .map(|seq| {
                let (receipt, hash) = signer.sign(body_from_facts(&facts(seq), &prev)).expect("signs");
                prev = hash;
                receipt
            })
            .collect()
    }

    #[test]
    fn a_chain_verifies_and_any_tampering_is_detected() {
        let signer = ReceiptSigner::generate();
        let key = signer.verifying_key();
        let receipts = chain(&signer, 4);
        assert_eq!(verify_chain(&receipts, &key).expect("intact chain verifies").receipts, 4);

        let mut edited = receipts.clone();
        edited[1].receipt.amount_micros += 1;
        assert!(matches!(verify_chain(&edited, &key), Err(ReceiptError::BadSignature)));

        let mut deleted = receipts.clone();
        deleted.remove(2);
        assert!(matches!(verify_chain(&deleted, &key), Err(ReceiptError::BrokenChain { seq: 4, .. })));

        // A receipt re-signed by another key does not pass as ours.
        let other = ReceiptSigner::generate();
        let mut forged = receipts.clone();
        forged[0] = other.sign(forged[0].receipt.clone()).expect("signs").0;
        assert!(matches!(verify_chain(&forged, &key), Err(ReceiptError::WrongKey(_))));

        let mut flipped = receipts;
        let mut sig = URL_SAFE_NO_PAD.decode(&flipped[0].signature).expect("b64");
        sig[5] ^= 1;
        flipped[0].signature = URL_SAFE_NO_PAD.encode(sig);
        assert!(matches!(verify(&flipped[0], &key), Err(ReceiptError::BadSignature)));
    }

    #[test]
    fn signing_is_deterministic_so_instances_agree() {
        let signer = ReceiptSigner::generate();
        let a = signer.sign(body_from_facts(&facts(1), "")).expect("signs");
        let b = signer.sign(body_from_facts(&facts(1), "")).expect("signs");
        assert_eq!(a, b);
    }

    #[test]
    fn key_file_is_created_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("spendcap-key-{}", rand::random::<u64>()));
        let path = dir.join("receipt.pem");
        let first = ReceiptSigner::load_or_create(&path).expect("creates");
        let second = ReceiptSigner::load_or_create(&path).expect("loads");
        assert_eq!(first.public_key_b64(), second.public_key_b64());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
