//! Universal-mode join tokens: the credential a workload outside Kubernetes presents to get a
//! certificate. A token names one namespace and service account and an expiry, and is signed
//! (HMAC-SHA256) with a key only weftd's state folder holds; whoever can read that folder (the
//! operator, `weftctl token create`, `weftctl up`) can issue tokens, nobody else can.
//!
//! Shape: `weft1.<base64url(JSON claims)>.<base64url(HMAC)>`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::{CaError, SpiffeId, ensure_private_dir, write_private};

const KEY_FILE: &str = "join-token-key";
const PREFIX: &str = "weft1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Namespace.
    pub ns: String,
    /// Service account.
    pub sa: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a weft join token (expected weft1.<claims>.<signature>)")]
    Malformed,
    #[error(
        "the join token's signature does not verify: it was not issued by this control plane (or was altered)"
    )]
    BadSignature,
    #[error(
        "the join token for {ns}/{sa} expired {ago_s}s ago; issue a new one with `weftctl token create`"
    )]
    Expired { ns: String, sa: String, ago_s: u64 },
}

/// The signing key, loaded from (or created in) the state folder.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenKey {
    /// Loads the key from `state_dir`, creating it (mode 0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<TokenKey, CaError> {
        ensure_private_dir(state_dir)?;
        let path = state_dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 32 => Ok(Self::from_bytes(&bytes)),
            Ok(_) => Err(super::state_err(
                &path,
                "the key file is shorter than 32 bytes",
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| super::state_err(&path, "no randomness for a new key"))?;
                write_private(state_dir, KEY_FILE, &bytes, 0o600)?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) => Err(super::state_err(&path, e)),
        }
    }

    /// Loads an existing key (for tools that must not create one).
    pub fn load(state_dir: &Path) -> Result<TokenKey, CaError> {
        let path = state_dir.join(KEY_FILE);
        let bytes = std::fs::read(&path)
            .map_err(|e| super::state_err(&path, format!("{e} (is this weftd's --state-dir?)")))?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> TokenKey {
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Issues a token for `namespace`/`service_account`, valid for `ttl`.
    pub fn issue(&self, namespace: &str, service_account: &str, ttl: Duration) -> String {
        let claims = Claims {
            ns: namespace.to_string(),
            sa: service_account.to_string(),
            exp: unix_now() + ttl.as_secs(),
        };
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{PREFIX}.{body}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", B64.encode(tag.as_ref()))
    }

    /// Checks a token and returns the identity it proves.
    pub fn verify(&self, token: &str, trust_domain: &str) -> Result<SpiffeId, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, format!("{PREFIX}.{body}").as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        let now = unix_now();
        if claims.exp <= now {
            return Err(TokenError::Expired {
                ns: claims.ns,
                sa: claims.sa,
                ago_s: now - claims.exp,
            });
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: claims.ns,
            service_account: claims.sa,
        })
    }

    /// Whether `token` looks like a join token at all (so other credential kinds get a say).
    pub fn is_join_token(token: &str) -> bool {
        token.trim().starts_with("weft1.")
    }
}
