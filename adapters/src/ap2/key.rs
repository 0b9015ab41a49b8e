//! The agent's AP2 signing key: the ES256 (P-256) key whose public half the user names as `cnf`
//! in open mandates and which signs the closed mandates. It lives in the daemon only.

use std::fmt;

use p256::ecdsa::SigningKey;
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;
use rand::rngs::OsRng;

use super::error::Ap2Error;
use super::jose;
use super::types::{Cnf, Jwk};

/// An ES256 key pair. `Debug` shows the public key's thumbprint, never the private key.
#[derive(Clone)]
pub struct AgentKey {
    signing: SigningKey,
    public: Jwk,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey").field("thumbprint", &self.thumbprint()).field("private_key", &"<redacted>").finish()
    }
}

impl AgentKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> AgentKey {
        AgentKey::from_signing_key(SigningKey::random(&mut OsRng))
    }

    fn from_signing_key(signing: SigningKey) -> AgentKey {
        let public = jose::public_jwk(signing.verifying_key());
        AgentKey { signing, public }
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<AgentKey, Ap2Error> {
        SigningKey::from_pkcs8_pem(pem)
            .map(AgentKey::from_signing_key)
            .map_err(|_| Ap2Error::InvalidKey("not a PKCS#8 PEM P-256 private key".into()))
    }

    /// Writes the private key as PKCS#8 PEM, for the daemon's key storage. Zeroized on drop.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, Ap2Error> {
        self.signing
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| Ap2Error::InvalidKey("the key cannot be encoded as PKCS#8".into()))
    }

    /// Reads a private JWK (`kty: EC`, `crv: P-256`, `d`, and `x`, `y` which must match `d`).
    /// Other members (`kid`, `use`, `alg`, ...) are allowed and ignored.
    pub fn from_private_jwk(json: &str) -> Result<AgentKey, Ap2Error> {
        #[derive(serde::Deserialize)]
        struct PrivateJwk {
            kty: String,
            crv: String,
            #[serde(default)]
            x: Option<String>,
            #[serde(default)]
            y: Option<String>,
            d: String,
        }
        let invalid = || Ap2Error::InvalidKey("not a private EC P-256 JWK".into());
        let jwk: PrivateJwk = serde_json::from_str(json).map_err(|_| invalid())?;
        if jwk.kty != "EC" || jwk.crv != "P-256" {
            return Err(invalid());
        }
        let d_text = Zeroizing::new(jwk.d);
        let d = Zeroizing::new(jose::b64url_decode(&d_text).ok_or_else(invalid)?);
        let secret = SecretKey::from_slice(&d).map_err(|_| invalid())?;
        let key = AgentKey::from_signing_key(SigningKey::from(secret));
        if jwk.x.is_some_and(|x| Some(x) != key.public.x) || jwk.y.is_some_and(|y| Some(y) != key.public.y) {
            return Err(Ap2Error::InvalidKey("the JWK's public coordinates do not match its private key".into()));
        }
        Ok(key)
    }

    /// Writes the private key as a JWK (with `d`). Zeroized on drop.
    pub fn to_private_jwk(&self) -> Zeroizing<String> {
        SecretKey::from(&self.signing).to_jwk_string()
    }

    /// The public JWK, as it goes into an open mandate's `cnf`.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    /// `{"jwk": <public JWK>}`.
    pub fn cnf(&self) -> Cnf {
        Cnf { jwk: self.public.clone() }
    }

    /// RFC 7638 thumbprint of the public key: a stable, public name for this key.
    pub fn thumbprint(&self) -> String {
        jose::thumbprint(&self.public)
    }

    /// Signs `payload_json` as a compact ES256 JWS with this key (header `typ` as given, `kid`
    /// when set): what a merchant, processor or credential issuer does with its own key.
    pub fn sign_jws(&self, typ: Option<&str>, kid: Option<&str>, payload_json: &str) -> Result<String, Ap2Error> {
        jose::sign_jws(&self.signing, typ, kid, payload_json)
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap2_agent_key_round_trips_through_pkcs8_and_jwk() {
        let key = AgentKey::generate();
        let pem = key.to_pkcs8_pem().expect("encodes");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(AgentKey::from_pkcs8_pem(&pem).expect("decodes").public_jwk(), key.public_jwk());
        let jwk = key.to_private_jwk();
        assert_eq!(AgentKey::from_private_jwk(&jwk).expect("decodes").public_jwk(), key.public_jwk());
        assert_eq!(AgentKey::from_pkcs8_pem("nope").map(|_| ()).map_err(|e| e.code()), Err("ap2_invalid_key"));
        assert_eq!(AgentKey::from_private_jwk("{}").map(|_| ()).map_err(|e| e.code()), Err("ap2_invalid_key"));
        // Extra members are fine; public coordinates that belong to another key are not.
        let mut with_kid: serde_json::Value = serde_json::from_str(&jwk).expect("json");
        with_kid["kid"] = "k1".into();
        assert!(AgentKey::from_private_jwk(&with_kid.to_string()).is_ok());
        with_kid["x"] = AgentKey::generate().public_jwk().x.clone().into();
        assert_eq!(
            AgentKey::from_private_jwk(&with_kid.to_string()).map(|_| ()).map_err(|e| e.code()),
            Err("ap2_invalid_key")
        );
    }

    #[test]
    fn ap2_agent_key_debug_redacts_the_private_key() {
        let key = AgentKey::generate();
        let debug = format!("{key:?}");
        let private = key.to_private_jwk();
        let d: serde_json::Value = serde_json::from_str(&private).expect("json");
        let d = d["d"].as_str().expect("d").to_owned();
        assert!(!debug.contains(&d), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert!(debug.contains(&key.thumbprint()));
    }
}
