//! Local-mode workload tokens: short-lived, signed by citadel (HMAC-SHA256
//! with a key kept in the state directory), each bound to one identity and
//! to citadel's audience. `meshctl` mints one per workload.
//!
//! Format: `<base64url(json claims)>.<base64url(mac)>`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use mesh_identity::SpiffeId;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::authority::{AuthorityError, io, write_private};

pub const TOKEN_KEY_FILE: &str = "token-key";
pub const AUDIENCE: &str = "mesh-citadel";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is not of the form <claims>.<signature>")]
    Malformed,
    #[error("token signature does not verify (not minted by this citadel)")]
    BadSignature,
    #[error("token claims are unreadable: {0}")]
    Claims(String),
    #[error("token is for audience {0:?}, not {AUDIENCE:?}")]
    Audience(String),
    #[error("token expired {0} s ago; mint a fresh one")]
    Expired(u64),
    #[error("token names no valid identity: {0}")]
    Identity(String),
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: u64,
}

pub struct TokenSigner {
    key: hmac::Key,
}

impl TokenSigner {
    /// Loads the signing key from `dir`, or makes one there.
    pub fn open(dir: &Path) -> Result<Self, AuthorityError> {
        let path = dir.join(TOKEN_KEY_FILE);
        if !path.exists() {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .expect("the system random source works");
            write_private(&path, &B64.encode(secret))?;
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let secret = B64.decode(text.trim()).map_err(|e| AuthorityError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        })
    }

    pub fn mint(&self, identity: &SpiffeId, ttl: Duration) -> String {
        let claims = Claims {
            sub: identity.to_string(),
            aud: AUDIENCE.to_string(),
            exp: now() + ttl.as_secs(),
        };
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let mac = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", B64.encode(mac.as_ref()))
    }

    /// The identity a token grants, if it is genuine, current and for us.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
        let (payload, mac) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, payload.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let raw = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&raw).map_err(|e| TokenError::Claims(e.to_string()))?;
        if claims.aud != AUDIENCE {
            return Err(TokenError::Audience(claims.aud));
        }
        let now = now();
        if claims.exp <= now {
            return Err(TokenError::Expired(now - claims.exp));
        }
        claims
            .sub
            .parse()
            .map_err(|e: mesh_identity::ParseError| TokenError::Identity(e.to_string()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (tempfile::TempDir, TokenSigner) {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenSigner::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn grants_the_minted_identity() {
        let (_d, s) = signer();
        let id = SpiffeId::new("cluster.local", "default", "reviews");
        let t = s.mint(&id, Duration::from_secs(60));
        assert_eq!(s.verify(&t), Ok(id));
    }

    #[test]
    fn refuses_tampering_expiry_and_strangers() {
        let (_d, s) = signer();
        let (_d2, other) = signer();
        let id = SpiffeId::new("cluster.local", "default", "reviews");
        let t = s.mint(&id, Duration::from_secs(60));
        assert_eq!(other.verify(&t), Err(TokenError::BadSignature));
        let forged = format!(
            "{}.{}",
            B64.encode(br#"{"sub":"spiffe://cluster.local/ns/default/sa/admin","aud":"mesh-citadel","exp":99999999999}"#),
            t.split_once('.').unwrap().1
        );
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(s.verify("nonsense"), Err(TokenError::Malformed));
        let expired = s.mint(&id, Duration::ZERO);
        assert!(matches!(s.verify(&expired), Err(TokenError::Expired(_))));
    }
}
