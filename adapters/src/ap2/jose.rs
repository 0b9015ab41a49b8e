//! JOSE for AP2: ES256 (ECDSA P-256 with SHA-256) JWS compact serialization, JWK conversion and
//! the base64url SHA-256 hashes that bind AP2 messages together.
//!
//! Only ES256 is accepted. The header's `alg` is checked before anything else is trusted, so
//! `alg: none`, HMAC algorithms and other curves are refused as `ap2_alg_not_allowed` whatever the
//! rest of the token says. Verification is over the exact bytes received (`header.payload`), and
//! the payload is handed back as its JSON text so callers can read numbers exactly.
//!
//! ECDSA signatures are malleable: `(r, n - s)` verifies wherever `(r, s)` does, and anyone can
//! compute it. So only low-S signatures are accepted (`ap2_signature_not_canonical` otherwise),
//! every signature made here is low-S, and whatever the daemon derives an identity from (a
//! mandate's budget, a checkout's payment) is keyed on the signed content ([`content_hash`]),
//! never on the signature bytes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::{RandomizedSigner, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::FromEncodedPoint;
use p256::{EncodedPoint, FieldBytes, PublicKey};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::Ap2Error;
use super::types::Jwk;

/// The only JWS algorithm AP2 uses and this module accepts.
pub const ES256: &str = "ES256";

/// Inputs longer than this are refused before any parsing: no AP2 message comes near it.
pub(crate) const MAX_TOKEN_LEN: usize = 512 * 1024;

/// base64url without padding (RFC 7515 §2).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strict base64url decoding: no padding, no stray characters, canonical trailing bits.
pub(crate) fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// base64url(SHA-256(bytes)).
pub fn sha256_b64url(bytes: &[u8]) -> String {
    b64url(&Sha256::digest(bytes))
}

/// base64url(SHA-256(`header.payload`)) of a compact JWS: what its signer signed, without the
/// signature. Two tokens with the same signed content (a re-encoded or re-made signature) have
/// the same content hash; anything the daemon keys on a signed object uses this.
pub fn content_hash(jwt: &str) -> String {
    let jwt = jwt.trim();
    let signing_input = jwt.rsplit_once('.').map_or(jwt, |(input, _)| input);
    sha256_b64url(signing_input.as_bytes())
}

/// `checkout_hash` (and a closed Payment Mandate's `transaction_id`):
/// base64url(SHA-256(the ASCII bytes of the merchant's `checkout_jwt`)).
pub fn checkout_hash(checkout_jwt: &str) -> String {
    sha256_b64url(checkout_jwt.as_bytes())
}

/// A JWS protected header. Members other than these are ignored, except `crit`, which is refused:
/// this implementation understands no extension that a signer could make critical.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JwsHeader {
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<Value>,
}

/// A JWS whose signature has been verified.
#[derive(Clone, Debug)]
pub struct VerifiedJws {
    pub header: JwsHeader,
    /// The payload's JSON text, exactly as signed.
    pub payload_json: String,
    /// Which of the given keys verified it.
    pub key_index: usize,
}

/// `exp` and `nbf`, read from a payload (integers, seconds since the Unix epoch).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TimeClaims {
    #[serde(default)]
    pub exp: Option<i64>,
    #[serde(default)]
    pub nbf: Option<i64>,
}

impl TimeClaims {
    pub(crate) fn read(payload_json: &str) -> Result<TimeClaims, Ap2Error> {
        serde_json::from_str(payload_json)
            .map_err(|_| Ap2Error::MalformedJwt("exp and nbf must be integer seconds since the epoch".into()))
    }

    /// RFC 7519: the token is valid only before `exp` and from `nbf` on.
    pub(crate) fn check(&self, now: i64) -> Result<(), Ap2Error> {
        if let Some(exp) = self.exp {
            if now >= exp {
                return Err(Ap2Error::Expired { expired_at: exp, now });
            }
        }
        if let Some(nbf) = self.nbf {
            if now < nbf {
                return Err(Ap2Error::NotYetValid { not_before: nbf, now });
            }
        }
        Ok(())
    }
}

/// A compact JWS split and decoded, signature not yet checked.
pub(crate) struct DecodedJws<'a> {
    pub header: JwsHeader,
    pub payload_json: String,
    pub signing_input: &'a str,
    pub signature: Signature,
}

/// Splits and decodes a compact JWS and checks that it claims ES256. Does not verify.
pub(crate) fn decode(jwt: &str) -> Result<DecodedJws<'_>, Ap2Error> {
    if jwt.len() > MAX_TOKEN_LEN {
        return Err(Ap2Error::MalformedJwt("token too long".into()));
    }
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Ap2Error::MalformedJwt("expected three dot-separated parts".into()));
    };
    let header_bytes =
        b64url_decode(header_b64).ok_or_else(|| Ap2Error::MalformedJwt("header is not base64url".into()))?;
    let header_value: Value =
        serde_json::from_slice(&header_bytes).map_err(|_| Ap2Error::MalformedJwt("header is not JSON".into()))?;
    if !header_value.is_object() {
        return Err(Ap2Error::MalformedJwt("header is not a JSON object".into()));
    }
    let header: JwsHeader =
        serde_json::from_value(header_value).map_err(|_| Ap2Error::MalformedJwt("header lacks a string alg".into()))?;
    if header.alg != ES256 {
        return Err(Ap2Error::AlgNotAllowed(header.alg));
    }
    if header.crit.is_some() {
        return Err(Ap2Error::MalformedJwt("critical header extensions are not supported".into()));
    }
    let payload_bytes =
        b64url_decode(payload_b64).ok_or_else(|| Ap2Error::MalformedJwt("payload is not base64url".into()))?;
    let payload_json =
        String::from_utf8(payload_bytes).map_err(|_| Ap2Error::MalformedJwt("payload is not UTF-8".into()))?;
    match serde_json::from_str::<Value>(&payload_json) {
        Ok(Value::Object(_)) => {}
        _ => return Err(Ap2Error::MalformedJwt("payload is not a JSON object".into())),
    }
    let signature_bytes =
        b64url_decode(signature_b64).ok_or_else(|| Ap2Error::MalformedJwt("signature is not base64url".into()))?;
    if signature_bytes.len() != 64 {
        return Err(Ap2Error::MalformedJwt("an ES256 signature is 64 bytes (r || s)".into()));
    }
    // r or s out of range cannot verify under any key.
    let signature = Signature::from_slice(&signature_bytes).map_err(|_| Ap2Error::BadSignature)?;
    if signature.normalize_s().is_some() {
        return Err(Ap2Error::NonCanonicalSignature);
    }
    let signing_input = &jwt[..header_b64.len() + 1 + payload_b64.len()];
    Ok(DecodedJws { header, payload_json, signing_input, signature })
}

/// Verifies a compact ES256 JWS against a set of trusted public keys.
///
/// Key choice: when the header has a `kid` and some trusted keys carry that `kid`, only those are
/// tried; otherwise every trusted key without a `kid` (or, with no `kid` in the header, every
/// key). A `kid` that matches nothing with no kid-less key to fall back on is
/// `ap2_untrusted_issuer`; a signature that no candidate verifies is `ap2_bad_signature` (a wrong
/// key and an edited token look the same to a verifier).
pub fn verify_jws(jwt: &str, trusted: &[Jwk]) -> Result<VerifiedJws, Ap2Error> {
    let decoded = decode(jwt)?;
    if trusted.is_empty() {
        return Err(Ap2Error::UntrustedIssuer("no trusted keys are configured".into()));
    }
    let candidates: Vec<usize> = match &decoded.header.kid {
        Some(kid) if trusted.iter().any(|k| k.kid.as_deref() == Some(kid)) => {
            (0..trusted.len()).filter(|&i| trusted[i].kid.as_deref() == Some(kid)).collect()
        }
        Some(_) => (0..trusted.len()).filter(|&i| trusted[i].kid.is_none()).collect(),
        None => (0..trusted.len()).collect(),
    };
    if candidates.is_empty() {
        return Err(Ap2Error::UntrustedIssuer("the token's kid names no trusted key".into()));
    }
    for index in candidates {
        let key = verifying_key(&trusted[index])?;
        if key.verify(decoded.signing_input.as_bytes(), &decoded.signature).is_ok() {
            return Ok(VerifiedJws { header: decoded.header, payload_json: decoded.payload_json, key_index: index });
        }
    }
    Err(Ap2Error::BadSignature)
}

/// Signs `payload_json` as a compact ES256 JWS. The header's `alg` is always ES256.
///
/// Signatures are hedged (RFC 6979 nonce mixed with fresh randomness), so the same payload never
/// yields the same token twice; AP2 asks for non-deterministic signatures on hashed JWTs.
pub(crate) fn sign_jws(
    key: &SigningKey,
    typ: Option<&str>,
    kid: Option<&str>,
    payload_json: &str,
) -> Result<String, Ap2Error> {
    let header =
        JwsHeader { alg: ES256.to_owned(), typ: typ.map(str::to_owned), kid: kid.map(str::to_owned), crit: None };
    let header_json = serde_json::to_string(&header).map_err(|_| Ap2Error::SigningFailed)?;
    let signing_input = format!("{}.{}", b64url(header_json.as_bytes()), b64url(payload_json.as_bytes()));
    let signature: Signature =
        key.try_sign_with_rng(&mut OsRng, signing_input.as_bytes()).map_err(|_| Ap2Error::SigningFailed)?;
    // Low-S, the only form verifiers here (and strict ones elsewhere) accept.
    let signature = signature.normalize_s().unwrap_or(signature);
    Ok(format!("{signing_input}.{}", b64url(&signature.to_bytes())))
}

/// The P-256 verifying key a public JWK describes. Only `kty: EC`, `crv: P-256` keys meant for
/// signatures (no `use`, or `use: sig`; no `alg`, or `alg: ES256`) are accepted.
pub fn verifying_key(jwk: &Jwk) -> Result<VerifyingKey, Ap2Error> {
    if jwk.kty != "EC" || jwk.crv.as_deref() != Some("P-256") {
        return Err(Ap2Error::InvalidKey("only EC P-256 keys are supported".into()));
    }
    if jwk.alg.as_deref().is_some_and(|alg| alg != ES256) || jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
        return Err(Ap2Error::InvalidKey("the key is not an ES256 signing key".into()));
    }
    let coordinate = |value: &Option<String>, name: &str| -> Result<FieldBytes, Ap2Error> {
        let bytes = value
            .as_deref()
            .and_then(b64url_decode)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Ap2Error::InvalidKey(format!("{name} must be 32 base64url bytes")))?;
        Ok(FieldBytes::clone_from_slice(&bytes))
    };
    let point = EncodedPoint::from_affine_coordinates(&coordinate(&jwk.x, "x")?, &coordinate(&jwk.y, "y")?, false);
    let public = Option::<PublicKey>::from(PublicKey::from_encoded_point(&point))
        .ok_or_else(|| Ap2Error::InvalidKey("the point is not on the P-256 curve".into()))?;
    Ok(VerifyingKey::from(public))
}

/// The public JWK (`kty`, `crv`, `x`, `y`) of a P-256 key.
pub fn public_jwk(key: &VerifyingKey) -> Jwk {
    let point = key.to_encoded_point(false);
    let coordinate = |bytes: Option<&FieldBytes>| bytes.map(|b| b64url(b));
    Jwk {
        kty: "EC".into(),
        crv: Some("P-256".into()),
        x: coordinate(point.x()),
        y: coordinate(point.y()),
        key_use: None,
        key_ops: None,
        alg: None,
        kid: None,
        x5u: None,
        x5c: None,
        x5t: None,
        x5t_s256: None,
    }
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key.
pub fn thumbprint(jwk: &Jwk) -> String {
    // Required members only, in lexicographic order, no whitespace (RFC 7638 §3.2).
    let canonical = format!(
        r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
        jwk.crv.as_deref().unwrap_or_default(),
        jwk.kty,
        jwk.x.as_deref().unwrap_or_default(),
        jwk.y.as_deref().unwrap_or_default()
    );
    sha256_b64url(canonical.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::random(&mut OsRng)
    }

    fn jwk_of(key: &SigningKey) -> Jwk {
        public_jwk(key.verifying_key())
    }

    fn forge(header: &str, payload: &str, signature: &[u8]) -> String {
        format!("{}.{}.{}", b64url(header.as_bytes()), b64url(payload.as_bytes()), b64url(signature))
    }

    #[test]
    fn ap2_jws_round_trip_and_refusals_have_distinct_codes() {
        let signer = key();
        let trusted = [jwk_of(&signer)];
        let jwt = sign_jws(&signer, Some("JWT"), None, r#"{"a":1}"#).expect("signs");
        let verified = verify_jws(&jwt, &trusted).expect("verifies");
        assert_eq!(verified.payload_json, r#"{"a":1}"#);
        assert_eq!(verified.header.typ.as_deref(), Some("JWT"));

        let code = |token: &str| verify_jws(token, &trusted).map(|_| ()).map_err(|e| e.code());
        // A different key.
        assert_eq!(code(&sign_jws(&key(), None, None, "{}").expect("signs")), Err("ap2_bad_signature"));
        // An edited payload under the original signature.
        let parts: Vec<&str> = jwt.split('.').collect();
        let edited = format!("{}.{}.{}", parts[0], b64url(br#"{"a":2}"#), parts[2]);
        assert_eq!(code(&edited), Err("ap2_bad_signature"));
        // alg none, with and without a signature part; HS256; ES384.
        assert_eq!(code(&format!("{}.{}.", b64url(br#"{"alg":"none"}"#), parts[1])), Err("ap2_alg_not_allowed"));
        assert_eq!(code(&forge(r#"{"alg":"none"}"#, "{}", &[])), Err("ap2_alg_not_allowed"));
        assert_eq!(code(&forge(r#"{"alg":"HS256"}"#, "{}", &[0; 32])), Err("ap2_alg_not_allowed"));
        assert_eq!(code(&forge(r#"{"alg":"ES384"}"#, "{}", &[0; 96])), Err("ap2_alg_not_allowed"));
        // Malformed shapes.
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.AA",
            &forge("[]", "{}", &[0; 64]),
            &forge(r#"{"alg":"ES256"}"#, "[1]", &[0; 64]),
        ] {
            assert_eq!(code(bad), Err("ap2_malformed_jwt"), "{bad:?}");
        }
        assert_eq!(code(&forge(r#"{"alg":"ES256"}"#, "{}", &[1; 10])), Err("ap2_malformed_jwt"));
        assert_eq!(code(&forge(r#"{"alg":"ES256","crit":["b64"]}"#, "{}", &[1; 64])), Err("ap2_malformed_jwt"));
        // No trusted keys at all.
        assert_eq!(verify_jws(&jwt, &[]).map(|_| ()).map_err(|e| e.code()), Err("ap2_untrusted_issuer"));
    }

    /// `(r, n - s)` of a compact JWS: the re-encoded copy anyone can make without the key.
    fn high_s_copy(jwt: &str) -> String {
        let (input, signature) = jwt.rsplit_once('.').expect("a JWS");
        let signature = Signature::from_slice(&b64url_decode(signature).expect("base64url")).expect("r || s");
        let (r, s) = signature.split_scalars();
        let flipped = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).expect("a valid signature");
        format!("{input}.{}", b64url(&flipped.to_bytes()))
    }

    #[test]
    fn ap2_high_s_copies_are_refused_and_keep_the_content_hash() {
        let signer = key();
        let trusted = [jwk_of(&signer)];
        for n in 0..32 {
            let jwt = sign_jws(&signer, Some("JWT"), None, &format!(r#"{{"n":{n}}}"#)).expect("signs");
            // Every signature made here is low-S and verifies.
            assert!(verify_jws(&jwt, &trusted).is_ok(), "signature {n} verifies");
            let copy = high_s_copy(&jwt);
            assert_ne!(copy, jwt);
            // The copy is a valid ECDSA signature of the same bytes (p256 alone accepts it) ...
            let (input, signature) = copy.rsplit_once('.').expect("a JWS");
            let signature = Signature::from_slice(&b64url_decode(signature).expect("b64")).expect("r || s");
            assert!(signer.verifying_key().verify(input.as_bytes(), &signature).is_ok());
            // ... which the verifier refuses with its own code.
            assert_eq!(
                verify_jws(&copy, &trusted).map(|_| ()).map_err(|e| e.code()),
                Err("ap2_signature_not_canonical")
            );
            assert_eq!(content_hash(&copy), content_hash(&jwt));
            assert_ne!(checkout_hash(&copy), checkout_hash(&jwt));
        }
    }

    #[test]
    fn ap2_kid_selects_the_key_and_unknown_kids_are_untrusted() {
        let (a, b) = (key(), key());
        let mut jwk_a = jwk_of(&a);
        jwk_a.kid = Some("a".into());
        let mut jwk_b = jwk_of(&b);
        jwk_b.kid = Some("b".into());
        let trusted = [jwk_a, jwk_b];
        let jwt = sign_jws(&b, None, Some("b"), "{}").expect("signs");
        assert_eq!(verify_jws(&jwt, &trusted).expect("verifies").key_index, 1);
        let unknown = sign_jws(&b, None, Some("c"), "{}").expect("signs");
        assert_eq!(verify_jws(&unknown, &trusted).map(|_| ()).map_err(|e| e.code()), Err("ap2_untrusted_issuer"));
        // Signed by b but claiming to be a: only a is tried.
        let lying = sign_jws(&b, None, Some("a"), "{}").expect("signs");
        assert_eq!(verify_jws(&lying, &trusted).map(|_| ()).map_err(|e| e.code()), Err("ap2_bad_signature"));
    }

    #[test]
    fn ap2_time_claims_follow_rfc7519() {
        let claims = TimeClaims::read(r#"{"exp":100,"nbf":50}"#).expect("integers");
        assert!(claims.check(99).is_ok());
        assert_eq!(claims.check(100).map_err(|e| e.code()), Err("ap2_expired"));
        assert_eq!(claims.check(49).map_err(|e| e.code()), Err("ap2_not_yet_valid"));
        assert_eq!(TimeClaims::read(r#"{"exp":"soon"}"#).map(|_| ()).map_err(|e| e.code()), Err("ap2_malformed_jwt"));
    }

    #[test]
    fn ap2_checkout_hash_is_base64url_sha256_of_the_jwt_text() {
        // SHA-256("abc") is ba7816bf...15ad; its base64url is the well-known value below.
        assert_eq!(checkout_hash("abc"), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
    }

    #[test]
    fn ap2_jwk_conversion_round_trips_and_refuses_bad_points() {
        let signer = key();
        let jwk = jwk_of(&signer);
        assert_eq!(&verifying_key(&jwk).expect("valid"), signer.verifying_key());
        let mut off_curve = jwk.clone();
        off_curve.y = jwk.x.clone();
        assert_eq!(verifying_key(&off_curve).map_err(|e| e.code()).err(), Some("ap2_invalid_key"));
        let mut wrong_curve = jwk;
        wrong_curve.crv = Some("secp256k1".into());
        assert_eq!(verifying_key(&wrong_curve).map_err(|e| e.code()).err(), Some("ap2_invalid_key"));
    }
}
