//! SD-JWT (RFC 9901) and the Delegate SD-JWT key-binding hop that AP2 v0.2 mandates use.
//!
//! Shapes, as the AP2 spec and its reference SDK produce them:
//!
//! - An open mandate is an SD-JWT `<issuer JWT>~<disclosure>~...~`. The issuer JWT's payload is
//!   `{"delegate_payload": [{"...": <digest>}], "_sd_alg": "sha-256", ...}` and the mandate content
//!   is the array-element disclosure `[salt, {vct, constraints, cnf, ...}]`; elements of its
//!   `allowed` / `acceptable_items` arrays may themselves be disclosures.
//! - A closed mandate is a KB-SD-JWT signed by the key in the open mandate's `cnf`: header
//!   `typ: kb+sd-jwt`, payload `{"delegate_payload": [{"...": <digest>}], "iat", "aud", "nonce",
//!   "sd_hash", "_sd_alg"}`, followed by its own disclosures. `sd_hash` is base64url(SHA-256) of
//!   the open SD-JWT exactly as presented (`<issuer JWT>~<disclosures>~`).
//! - The two are presented as one string: `<open SD-JWT>~<KB-SD-JWT>~<disclosures>~`, which
//!   reads `...~~<KB-SD-JWT>...` where they meet (Delegate SD-JWT compact serialization).
//!
//! Disclosures are resolved over the raw JSON text, not over `serde_json::Value`, so numbers keep
//! their exact text (an open mandate's `payment.budget` `max` is a decimal number).

use std::collections::{HashMap, HashSet};
use std::fmt;

use rand::rngs::OsRng;
use rand::RngCore;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::Ap2Error;
use super::jose::{self, b64url, b64url_decode, sha256_b64url, JwsHeader, TimeClaims};
use super::types::Jwk;

/// `_sd_alg` value for SHA-256, the only hash supported.
pub const SD_ALG: &str = "sha-256";
/// `typ` of a terminal KB-SD-JWT (a closed mandate).
pub const TYP_KB_SD_JWT: &str = "kb+sd-jwt";

/// How deep objects and arrays may nest while resolving disclosures.
const MAX_DEPTH: usize = 64;

/// One disclosure: `base64url(JSON [salt, value])` for an array element, or
/// `base64url(JSON [salt, name, value])` for an object property.
#[derive(Clone)]
pub struct Disclosure {
    encoded: String,
    digest: String,
    name: Option<String>,
    value: Box<RawValue>,
}

impl fmt::Debug for Disclosure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disclosure").field("digest", &self.digest).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Disclosure {
    /// Decodes a disclosure as it appears between `~`s.
    pub fn parse(encoded: &str) -> Result<Disclosure, Ap2Error> {
        let bad = |why: &str| Ap2Error::MalformedSdJwt(format!("disclosure {why}"));
        let bytes = b64url_decode(encoded).ok_or_else(|| bad("is not base64url"))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8"))?;
        let parts: Vec<Box<RawValue>> = serde_json::from_str(&text).map_err(|_| bad("is not a JSON array"))?;
        let string_at = |index: usize| serde_json::from_str::<String>(parts[index].get()).ok();
        let (name, value) = match parts.len() {
            2 => (None, &parts[1]),
            3 => {
                let name = string_at(1).ok_or_else(|| bad("name is not a string"))?;
                if name == "_sd" || name == "..." || name == "_sd_alg" {
                    return Err(bad("discloses a reserved claim name"));
                }
                (Some(name), &parts[2])
            }
            _ => return Err(bad("must have two or three elements")),
        };
        string_at(0).ok_or_else(|| bad("salt is not a string"))?;
        Ok(Disclosure {
            encoded: encoded.to_owned(),
            digest: sha256_b64url(encoded.as_bytes()),
            name,
            value: value.clone(),
        })
    }

    /// A new array-element disclosure of `value`, with a fresh 128-bit salt.
    pub fn element<T: Serialize>(value: &T) -> Result<Disclosure, Ap2Error> {
        Self::create(None, value)
    }

    /// A new object-property disclosure of `name: value`, with a fresh 128-bit salt.
    pub fn property<T: Serialize>(name: &str, value: &T) -> Result<Disclosure, Ap2Error> {
        Self::create(Some(name), value)
    }

    fn create<T: Serialize>(name: Option<&str>, value: &T) -> Result<Disclosure, Ap2Error> {
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let salt = serde_json::to_string(&b64url(&salt)).map_err(|_| Ap2Error::SigningFailed)?;
        let value = serde_json::to_string(value).map_err(|_| Ap2Error::SigningFailed)?;
        let json = match name {
            Some(name) => {
                let name = serde_json::to_string(name).map_err(|_| Ap2Error::SigningFailed)?;
                format!("[{salt},{name},{value}]")
            }
            None => format!("[{salt},{value}]"),
        };
        Disclosure::parse(&b64url(json.as_bytes()))
    }

    /// The disclosure's text as it travels.
    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// base64url(SHA-256(encoded)), the value that stands for it in the payload.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// An SD-JWT as presented: the issuer-signed (or holder-signed, for a KB-SD-JWT) JWT and the
/// disclosures that follow it.
#[derive(Clone, Debug)]
pub struct SdJwt {
    jwt: String,
    disclosures: Vec<Disclosure>,
}

impl SdJwt {
    /// Parses `<JWT>~<disclosure>~...~`. A trailing key-binding JWT is not accepted here.
    pub fn parse(text: &str) -> Result<SdJwt, Ap2Error> {
        if text.len() > jose::MAX_TOKEN_LEN {
            return Err(Ap2Error::MalformedSdJwt("too long".into()));
        }
        let Some(body) = text.strip_suffix('~') else {
            return Err(Ap2Error::MalformedSdJwt("an SD-JWT ends with '~' (no key-binding JWT expected)".into()));
        };
        let mut parts = body.split('~');
        let jwt = parts.next().unwrap_or_default();
        if jwt.is_empty() {
            return Err(Ap2Error::MalformedSdJwt("empty JWT".into()));
        }
        let disclosures = parts
            .map(|part| {
                if part.is_empty() {
                    Err(Ap2Error::MalformedSdJwt("empty disclosure".into()))
                } else {
                    Disclosure::parse(part)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SdJwt { jwt: jwt.to_owned(), disclosures })
    }

    /// `<JWT>~<disclosure>~...~`.
    pub fn serialize(&self) -> String {
        let mut out = String::with_capacity(
            self.jwt.len() + self.disclosures.iter().map(|d| d.encoded.len() + 1).sum::<usize>() + 1,
        );
        out.push_str(&self.jwt);
        out.push('~');
        for disclosure in &self.disclosures {
            out.push_str(&disclosure.encoded);
            out.push('~');
        }
        out
    }

    /// The signed JWT alone.
    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    pub fn disclosures(&self) -> &[Disclosure] {
        &self.disclosures
    }

    /// `sd_hash`: base64url(SHA-256(the serialized SD-JWT, disclosures and final `~` included)).
    pub fn sd_hash(&self) -> String {
        sha256_b64url(self.serialize().as_bytes())
    }

    /// base64url(SHA-256(the signed JWT alone)) — stable whichever disclosures are presented.
    pub fn jwt_hash(&self) -> String {
        sha256_b64url(self.jwt.as_bytes())
    }
}

/// Joins an SD-JWT and the KB-SD-JWTs that delegate it: `<sd-jwt>~<kb-sd-jwt>~...`.
pub fn join_chain(links: &[&SdJwt]) -> String {
    links.iter().map(|link| link.serialize()).collect::<Vec<_>>().join("~")
}

/// Splits `<sd-jwt>~~<kb-sd-jwt>~...~` into its SD-JWTs (at least one).
pub fn split_chain(text: &str) -> Result<Vec<SdJwt>, Ap2Error> {
    if text.len() > jose::MAX_TOKEN_LEN {
        return Err(Ap2Error::MalformedSdJwt("too long".into()));
    }
    let segments: Vec<&str> = text.split("~~").collect();
    let last = segments.len() - 1;
    segments
        .iter()
        .enumerate()
        .map(
            |(index, segment)| {
                if index == last {
                    SdJwt::parse(segment)
                } else {
                    SdJwt::parse(&format!("{segment}~"))
                }
            },
        )
        .collect()
}

/// An SD-JWT whose signature, time claims and disclosures were checked.
#[derive(Clone, Debug)]
pub struct VerifiedSdJwt {
    pub header: JwsHeader,
    /// The payload with every presented disclosure put in place and `_sd`, `_sd_alg` removed.
    pub claims_json: String,
    pub key_index: usize,
}

/// Verifies an issuer-signed SD-JWT (RFC 9901 §7.1) against trusted issuer keys at `now`.
pub fn verify_sd_jwt(sd_jwt: &SdJwt, trusted: &[Jwk], now: i64) -> Result<VerifiedSdJwt, Ap2Error> {
    let jws = jose::verify_jws(&sd_jwt.jwt, trusted)?;
    TimeClaims::read(&jws.payload_json)?.check(now)?;
    let claims_json = resolve(&jws.payload_json, &sd_jwt.disclosures)?;
    Ok(VerifiedSdJwt { header: jws.header, claims_json, key_index: jws.key_index })
}

/// The mandate content of a verified payload: the single disclosed element of
/// `delegate_payload`, or, for a mandate issued without delegation, the payload itself.
pub fn delegate_content(claims_json: &str) -> Result<String, Ap2Error> {
    #[derive(Deserialize)]
    struct Delegated {
        #[serde(default)]
        delegate_payload: Option<Vec<Box<RawValue>>>,
    }
    let delegated: Delegated = serde_json::from_str(claims_json)
        .map_err(|_| Ap2Error::MalformedSdJwt("delegate_payload must be an array".into()))?;
    let Some(items) = delegated.delegate_payload else {
        return Ok(claims_json.to_owned());
    };
    match items.as_slice() {
        [only] if only.get().trim_start().starts_with('{') => Ok(only.get().to_owned()),
        [_] => Err(Ap2Error::MalformedSdJwt("delegate_payload element is not an object".into())),
        _ => Err(Ap2Error::MalformedSdJwt(format!(
            "delegate_payload must have exactly one disclosed element, has {}",
            items.len()
        ))),
    }
}

/// What a KB-SD-JWT binds itself to besides the preceding SD-JWT.
#[derive(Clone, Debug)]
pub struct KeyBinding<'a> {
    pub aud: &'a str,
    pub nonce: &'a str,
    pub iat: i64,
}

/// Signs a terminal KB-SD-JWT (a closed mandate) over `content`, bound to `previous` by `sd_hash`.
///
/// `disclosable` names top-level members of `content` to turn into property disclosures
/// (the schema's `x-selectively-disclosable-field`s, e.g. `checkout_jwt`); they are still all
/// presented. The content itself is the one array-element disclosure of `delegate_payload`.
pub fn issue_kb_sd_jwt(
    holder: &p256::ecdsa::SigningKey,
    previous: &SdJwt,
    content: &Map<String, Value>,
    disclosable: &[&str],
    binding: &KeyBinding<'_>,
) -> Result<SdJwt, Ap2Error> {
    let mut content = content.clone();
    let mut disclosures = Vec::new();
    let mut digests = Vec::new();
    for name in disclosable {
        if let Some(value) = content.remove(*name) {
            let disclosure = Disclosure::property(name, &value)?;
            digests.push(Value::String(disclosure.digest.clone()));
            disclosures.push(disclosure);
        }
    }
    if !digests.is_empty() {
        // Sorted, so the order of digests says nothing about the order of claims (RFC 9901 §4.2.4.1).
        digests.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        content.insert("_sd".into(), Value::Array(digests));
    }
    let content_disclosure = Disclosure::element(&content)?;
    let payload = serde_json::json!({
        "delegate_payload": [{"...": content_disclosure.digest}],
        "iat": binding.iat,
        "aud": binding.aud,
        "nonce": binding.nonce,
        "sd_hash": previous.sd_hash(),
        "_sd_alg": SD_ALG,
    });
    let payload_json = serde_json::to_string(&payload).map_err(|_| Ap2Error::SigningFailed)?;
    let jwt = jose::sign_jws(holder, Some(TYP_KB_SD_JWT), None, &payload_json)?;
    disclosures.insert(0, content_disclosure);
    Ok(SdJwt { jwt, disclosures })
}

/// A verified KB-SD-JWT hop.
#[derive(Clone, Debug)]
pub struct VerifiedKeyBinding {
    /// The delegate content (the closed mandate), disclosures resolved.
    pub content_json: String,
    pub aud: String,
    pub nonce: String,
    pub iat: i64,
}

/// Verifies a terminal KB-SD-JWT against the SD-JWT it follows and the holder key from that
/// SD-JWT's `cnf` (Delegate SD-JWT §Verification, steps 3–4).
pub fn verify_kb_sd_jwt(
    kb: &SdJwt,
    previous: &SdJwt,
    holder: &Jwk,
    expected_aud: Option<&str>,
    expected_nonce: Option<&str>,
    now: i64,
) -> Result<VerifiedKeyBinding, Ap2Error> {
    let jws = jose::verify_jws(&kb.jwt, std::slice::from_ref(holder))?;
    if !matches!(jws.header.typ.as_deref(), Some("kb+sd-jwt" | "kb-sd-jwt")) {
        return Err(Ap2Error::MalformedSdJwt("a closed mandate's typ must be kb+sd-jwt".into()));
    }
    #[derive(Deserialize)]
    struct Claims {
        iat: i64,
        aud: String,
        nonce: String,
        #[serde(default)]
        sd_hash: Option<String>,
        #[serde(default)]
        issuer_jwt_hash: Option<String>,
    }
    let claims: Claims = serde_json::from_str(&jws.payload_json)
        .map_err(|_| Ap2Error::MalformedSdJwt("a KB-SD-JWT needs integer iat and string aud, nonce".into()))?;
    if claims.aud.is_empty() || claims.nonce.is_empty() {
        return Err(Ap2Error::MalformedSdJwt("aud and nonce must not be empty".into()));
    }
    match (&claims.sd_hash, &claims.issuer_jwt_hash) {
        (Some(sd_hash), None) if *sd_hash == previous.sd_hash() => {}
        (None, Some(jwt_hash)) if *jwt_hash == previous.jwt_hash() => {}
        (Some(_), None) => return Err(Ap2Error::BindingMismatch("sd_hash is not the hash of the open mandate".into())),
        (None, Some(_)) => {
            return Err(Ap2Error::BindingMismatch("issuer_jwt_hash is not the hash of the open mandate".into()))
        }
        _ => return Err(Ap2Error::MalformedSdJwt("exactly one of sd_hash, issuer_jwt_hash is required".into())),
    }
    if expected_aud.is_some_and(|aud| aud != claims.aud) {
        return Err(Ap2Error::KeyBindingMismatch("aud"));
    }
    if expected_nonce.is_some_and(|nonce| nonce != claims.nonce) {
        return Err(Ap2Error::KeyBindingMismatch("nonce"));
    }
    TimeClaims::read(&jws.payload_json)?.check(now)?;
    let resolved = resolve(&jws.payload_json, &kb.disclosures)?;
    let content_json = delegate_content(&resolved)?;
    #[derive(Deserialize)]
    struct Terminal {
        #[serde(default)]
        cnf: Option<Value>,
    }
    let terminal: Terminal = serde_json::from_str(&content_json)
        .map_err(|_| Ap2Error::MalformedSdJwt("delegate content is not an object".into()))?;
    if terminal.cnf.is_some() {
        return Err(Ap2Error::MalformedSdJwt("a terminal KB-SD-JWT must not carry cnf".into()));
    }
    TimeClaims::read(&content_json)?.check(now)?;
    Ok(VerifiedKeyBinding { content_json, aud: claims.aud, nonce: claims.nonce, iat: claims.iat })
}

/// A JSON object as ordered raw members; duplicate member names are refused.
struct RawObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawObject, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut members: Vec<(String, Box<RawValue>)> = Vec::new();
                let mut names = HashSet::new();
                while let Some((name, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    if !names.insert(name.clone()) {
                        return Err(serde::de::Error::custom("duplicate member name"));
                    }
                    members.push((name, value));
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Puts the presented disclosures in place (RFC 9901 §7.1 steps 3–5) and returns the resulting
/// JSON text, with `_sd` members and the top-level `_sd_alg` removed. Undisclosed array elements
/// disappear. Every disclosure must be referenced exactly once.
pub(crate) fn resolve(payload_json: &str, disclosures: &[Disclosure]) -> Result<String, Ap2Error> {
    let top: RawObject = serde_json::from_str(payload_json)
        .map_err(|_| Ap2Error::MalformedSdJwt("payload is not a JSON object with unique member names".into()))?;
    if let Some((_, alg)) = top.0.iter().find(|(name, _)| name == "_sd_alg") {
        let alg: String =
            serde_json::from_str(alg.get()).map_err(|_| Ap2Error::MalformedSdJwt("_sd_alg is not a string".into()))?;
        if alg != SD_ALG {
            return Err(Ap2Error::UnsupportedSdAlg(alg));
        }
    }
    let mut by_digest = HashMap::with_capacity(disclosures.len());
    for (index, disclosure) in disclosures.iter().enumerate() {
        if by_digest.insert(disclosure.digest.as_str(), index).is_some() {
            return Err(Ap2Error::MalformedSdJwt("the same disclosure is presented twice".into()));
        }
    }
    let mut resolver = Resolver { disclosures, by_digest, used: vec![false; disclosures.len()] };
    let mut out = String::with_capacity(payload_json.len() * 2);
    resolver.object(top, 0, true, &mut out)?;
    if resolver.used.iter().any(|used| !used) {
        return Err(Ap2Error::MalformedSdJwt("a presented disclosure is not referenced by the payload".into()));
    }
    Ok(out)
}

struct Resolver<'a> {
    disclosures: &'a [Disclosure],
    by_digest: HashMap<&'a str, usize>,
    used: Vec<bool>,
}

impl<'a> Resolver<'a> {
    /// The disclosure a digest names, marked as used; `None` for a decoy or withheld one.
    fn take(&mut self, digest: &str) -> Result<Option<&'a Disclosure>, Ap2Error> {
        let Some(&index) = self.by_digest.get(digest) else { return Ok(None) };
        if std::mem::replace(&mut self.used[index], true) {
            return Err(Ap2Error::MalformedSdJwt("a digest is referenced more than once".into()));
        }
        Ok(Some(&self.disclosures[index]))
    }

    fn value(&mut self, raw: &RawValue, depth: usize, out: &mut String) -> Result<(), Ap2Error> {
        if depth > MAX_DEPTH {
            return Err(Ap2Error::MalformedSdJwt("nested too deeply".into()));
        }
        let text = raw.get().trim();
        match text.as_bytes().first() {
            Some(b'{') => {
                let object: RawObject = serde_json::from_str(text)
                    .map_err(|_| Ap2Error::MalformedSdJwt("an object has duplicate member names".into()))?;
                self.object(object, depth, false, out)
            }
            Some(b'[') => {
                let elements: Vec<Box<RawValue>> =
                    serde_json::from_str(text).map_err(|_| Ap2Error::MalformedSdJwt("invalid array".into()))?;
                out.push('[');
                let mut first = true;
                for element in &elements {
                    let disclosed = match array_digest(element)? {
                        Some(digest) => match self.take(&digest)? {
                            Some(disclosure) if disclosure.name.is_none() => Some(&disclosure.value),
                            Some(_) => {
                                return Err(Ap2Error::MalformedSdJwt(
                                    "an array element digest names a property disclosure".into(),
                                ))
                            }
                            None => continue,
                        },
                        None => None,
                    };
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    self.value(disclosed.map_or(element, |v| v), depth + 1, out)?;
                }
                out.push(']');
                Ok(())
            }
            _ => {
                out.push_str(text);
                Ok(())
            }
        }
    }

    fn object(&mut self, object: RawObject, depth: usize, top: bool, out: &mut String) -> Result<(), Ap2Error> {
        let mut names: HashSet<&str> = HashSet::new();
        let mut digests: Vec<String> = Vec::new();
        out.push('{');
        let mut first = true;
        let mut member = |out: &mut String, name: &str| -> Result<(), Ap2Error> {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&serde_json::to_string(name).map_err(|_| Ap2Error::MalformedSdJwt("bad name".into()))?);
            out.push(':');
            Ok(())
        };
        for (name, value) in &object.0 {
            match name.as_str() {
                "_sd" => {
                    digests = serde_json::from_str(value.get())
                        .map_err(|_| Ap2Error::MalformedSdJwt("_sd must be an array of strings".into()))?;
                }
                "..." => return Err(Ap2Error::MalformedSdJwt("'...' is only valid in array elements".into())),
                "_sd_alg" if top => {}
                _ => {
                    names.insert(name);
                    member(out, name)?;
                    self.value(value, depth + 1, out)?;
                }
            }
        }
        for digest in &digests {
            let Some(disclosure) = self.take(digest)? else { continue };
            let Some(name) = &disclosure.name else {
                return Err(Ap2Error::MalformedSdJwt("an _sd digest names an array element disclosure".into()));
            };
            if !names.insert(name.as_str()) {
                return Err(Ap2Error::MalformedSdJwt("a disclosed claim is also present in clear".into()));
            }
            member(out, name)?;
            self.value(&disclosure.value, depth + 1, out)?;
        }
        out.push('}');
        Ok(())
    }
}

/// The digest of an array element of the form `{"...": "<digest>"}`, if it is one.
fn array_digest(element: &RawValue) -> Result<Option<String>, Ap2Error> {
    if !element.get().trim_start().starts_with('{') {
        return Ok(None);
    }
    let object: RawObject =
        serde_json::from_str(element.get()).map_err(|_| Ap2Error::MalformedSdJwt("invalid object".into()))?;
    if !object.0.iter().any(|(name, _)| name == "...") {
        return Ok(None);
    }
    match object.0.as_slice() {
        [(_, digest)] => serde_json::from_str::<String>(digest.get())
            .map(Some)
            .map_err(|_| Ap2Error::MalformedSdJwt("'...' must be a digest string".into())),
        _ => Err(Ap2Error::MalformedSdJwt("an array element digest object has other members".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    fn issue(key: &SigningKey, payload: &Value, disclosures: Vec<Disclosure>) -> SdJwt {
        let jwt = jose::sign_jws(key, Some("example+sd-jwt"), None, &payload.to_string()).expect("signs");
        SdJwt { jwt, disclosures }
    }

    #[test]
    fn ap2_sd_jwt_resolves_nested_disclosures_and_keeps_number_text() {
        let key = SigningKey::random(&mut OsRng);
        let merchant_a = Disclosure::element(&serde_json::json!({"id": "m1", "name": "A"})).expect("disclosure");
        let merchant_b = Disclosure::element(&serde_json::json!({"id": "m2", "name": "B"})).expect("disclosure");
        let content_text = format!(
            r#"{{"vct":"x","max":1000.10,"allowed":[{{"...":"{}"}},{{"...":"{}"}},{{"...":"decoy"}}]}}"#,
            merchant_a.digest(),
            merchant_b.digest()
        );
        let content_raw = RawValue::from_string(content_text).expect("json");
        let content = Disclosure::element(&content_raw).expect("disclosure");
        let payload = serde_json::json!({"delegate_payload": [{"...": content.digest()}], "_sd_alg": "sha-256"});
        // Presenting only merchant A: B disappears like the decoy.
        let sd_jwt = issue(&key, &payload, vec![merchant_a.clone(), content.clone()]);
        let trusted = [jose::public_jwk(key.verifying_key())];
        let verified =
            verify_sd_jwt(&SdJwt::parse(&sd_jwt.serialize()).expect("parses"), &trusted, 0).expect("verifies");
        let inner = delegate_content(&verified.claims_json).expect("one element");
        assert_eq!(inner, r#"{"vct":"x","max":1000.10,"allowed":[{"id":"m1","name":"A"}]}"#);

        // An unreferenced disclosure is refused.
        let stray = Disclosure::element(&1).expect("disclosure");
        let with_stray = issue(&key, &payload, vec![merchant_a, content, stray]);
        assert_eq!(
            verify_sd_jwt(&with_stray, &trusted, 0).map(|_| ()).map_err(|e| e.code()),
            Err("ap2_malformed_sd_jwt")
        );
    }

    #[test]
    fn ap2_sd_jwt_refuses_bad_structure() {
        let key = SigningKey::random(&mut OsRng);
        let trusted = [jose::public_jwk(key.verifying_key())];
        let property = Disclosure::property("secret", &"v").expect("disclosure");
        // A property disclosure referenced as an array element.
        let payload = serde_json::json!({"list": [{"...": property.digest()}]});
        let bad = issue(&key, &payload, vec![property.clone()]);
        assert_eq!(verify_sd_jwt(&bad, &trusted, 0).map(|_| ()).map_err(|e| e.code()), Err("ap2_malformed_sd_jwt"));
        // The same claim in clear and disclosed.
        let payload = serde_json::json!({"secret": "w", "_sd": [property.digest()]});
        let bad = issue(&key, &payload, vec![property.clone()]);
        assert_eq!(verify_sd_jwt(&bad, &trusted, 0).map(|_| ()).map_err(|e| e.code()), Err("ap2_malformed_sd_jwt"));
        // A property disclosed through _sd resolves.
        let payload = serde_json::json!({"_sd": [property.digest()], "_sd_alg": "sha-256"});
        let good = issue(&key, &payload, vec![property.clone()]);
        assert_eq!(verify_sd_jwt(&good, &trusted, 0).expect("verifies").claims_json, r#"{"secret":"v"}"#);
        // Another hash algorithm.
        let payload = serde_json::json!({"_sd_alg": "sha-512"});
        let bad = issue(&key, &payload, vec![]);
        assert_eq!(verify_sd_jwt(&bad, &trusted, 0).map(|_| ()).map_err(|e| e.code()), Err("ap2_unsupported_sd_alg"));
        // Shapes.
        for text in ["", "~", "abc", "a.b.c~~", "a.b.c~!!~"] {
            assert_eq!(SdJwt::parse(text).map(|_| ()).map_err(|e| e.code()), Err("ap2_malformed_sd_jwt"), "{text:?}");
        }
    }

    #[test]
    fn ap2_chain_serialization_matches_the_delegate_sd_jwt_form() {
        let open = SdJwt { jwt: "a.b.c".into(), disclosures: vec![Disclosure::element(&1).expect("d")] };
        let closed = SdJwt { jwt: "d.e.f".into(), disclosures: vec![] };
        let chain = join_chain(&[&open, &closed]);
        assert_eq!(chain, format!("a.b.c~{}~~d.e.f~", open.disclosures[0].encoded()));
        let split = split_chain(&chain).expect("splits");
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].serialize(), open.serialize());
        assert_eq!(split[1].serialize(), closed.serialize());
    }
}
