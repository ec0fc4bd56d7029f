//! Bearer tokens: JWTs signed with the mesh's Ed25519 key (`EdDSA`), with the
//! key id in the header so keys can rotate.

use crate::principal::{Caller, Principal};
use estate_core::{Error, Result};
use estate_crypto::SigningKeyPair;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Longest lifetime a token may be issued with: one year.
pub const MAX_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    iat: i64,
    exp: i64,
    jti: String,
    #[serde(flatten)]
    principal: Principal,
}

/// Most verified tokens remembered; beyond that the memory starts over.
const VERIFIED_CACHE_CAPACITY: usize = 16_384;

/// Public keys that verify tokens, by key id.
///
/// A token that verified once is remembered (by its SHA-256) until it
/// expires, so a gate sending thousands of decisions with the same token pays
/// for one Ed25519 verification, not one per call.
#[derive(Clone)]
pub struct VerifyingKeys {
    issuer: String,
    keys: Arc<HashMap<String, DecodingKey>>,
    verified: Arc<std::sync::RwLock<HashMap<[u8; 32], Verified>>>,
}

#[derive(Clone)]
struct Verified {
    principal: Principal,
    subject: String,
    token_id: String,
    expires_at: i64,
}

impl std::fmt::Debug for VerifyingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKeys")
            .field("issuer", &self.issuer)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl VerifyingKeys {
    /// Keys from (key id, raw 32-byte public key) pairs.
    pub fn new(issuer: impl Into<String>, keys: impl IntoIterator<Item = (String, [u8; 32])>) -> Self {
        let keys = keys
            .into_iter()
            .map(|(kid, raw)| {
                let key = DecodingKey::from_ed_der(&raw);
                (kid, key)
            })
            .collect();
        Self { issuer: issuer.into(), keys: Arc::new(keys), verified: Arc::default() }
    }

    /// Verifies `token` and returns the caller it proves. Every failure is
    /// UNAUTHENTICATED with a message that says what to do.
    pub fn verify(&self, token: &str, request_id: String) -> Result<Caller> {
        let digest: [u8; 32] = estate_crypto::sha256(token.as_bytes());
        let now = time_now_secs();
        if let Ok(cache) = self.verified.read()
            && let Some(v) = cache.get(&digest)
            && v.expires_at > now
        {
            return Ok(Caller {
                principal: v.principal.clone(),
                subject: v.subject.clone(),
                token_id: v.token_id.clone(),
                expires_at: v.expires_at,
                request_id,
            });
        }
        let caller = self.verify_signed(token, request_id)?;
        if let Ok(mut cache) = self.verified.write() {
            if cache.len() >= VERIFIED_CACHE_CAPACITY {
                cache.retain(|_, v| v.expires_at > now);
                if cache.len() >= VERIFIED_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                digest,
                Verified {
                    principal: caller.principal.clone(),
                    subject: caller.subject.clone(),
                    token_id: caller.token_id.clone(),
                    expires_at: caller.expires_at,
                },
            );
        }
        Ok(caller)
    }

    fn verify_signed(&self, token: &str, request_id: String) -> Result<Caller> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::Unauthenticated("the bearer token is malformed".into()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(Error::Unauthenticated("the bearer token must be signed with EdDSA".into()));
        }
        let kid = header.kid.ok_or_else(|| Error::Unauthenticated("the bearer token names no key id".into()))?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| Error::Unauthenticated("the bearer token was signed by an unknown key".into()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            Error::Unauthenticated(
                match e.kind() {
                    ErrorKind::ExpiredSignature => "the bearer token has expired; ask for a new one",
                    ErrorKind::InvalidSignature => "the bearer token signature is not valid",
                    ErrorKind::InvalidIssuer => "the bearer token was issued by another mesh",
                    _ => "the bearer token is not valid",
                }
                .into(),
            )
        })?;
        let claims = data.claims;
        Ok(Caller {
            principal: claims.principal,
            subject: claims.sub,
            token_id: claims.jti,
            expires_at: claims.exp,
            request_id,
        })
    }
}

fn time_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Its `jti`.
    pub token_id: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
}

/// Issues and verifies tokens with the mesh's signing key.
#[derive(Clone)]
pub struct TokenAuthority {
    issuer: String,
    key_id: String,
    encoding: Arc<EncodingKey>,
    verifying: VerifyingKeys,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority").field("issuer", &self.issuer).field("key_id", &self.key_id).finish()
    }
}

impl TokenAuthority {
    /// An authority signing with `key` as `issuer`.
    pub fn new(issuer: impl Into<String>, key: &SigningKeyPair) -> Result<Self> {
        let issuer = issuer.into();
        let der = key.private_pkcs8_der().map_err(|e| Error::Internal(e.to_string()))?;
        let verifying = VerifyingKeys::new(issuer.clone(), [(key.key_id().to_owned(), key.public_key_bytes())]);
        Ok(Self {
            issuer,
            key_id: key.key_id().to_owned(),
            encoding: Arc::new(EncodingKey::from_ed_der(&der)),
            verifying,
        })
    }

    /// The keys that verify this authority's tokens.
    pub fn verifying_keys(&self) -> &VerifyingKeys {
        &self.verifying
    }

    /// Signs a token for `principal` held by `subject`, valid `ttl_secs`.
    pub fn issue(&self, principal: Principal, subject: &str, ttl_secs: u64) -> Result<IssuedToken> {
        if ttl_secs == 0 || ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(Error::invalid("ttl_seconds", "must be between 1 second and one year"));
        }
        let now = estate_core::now_ms() / 1000;
        let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
        self.issue_between(principal, subject, now, now.saturating_add(ttl))
    }

    /// Signs a token with explicit issue and expiry times (seconds since the
    /// epoch). For tests of expiry and for tools that pre-date tokens.
    pub fn issue_between(
        &self,
        principal: Principal,
        subject: &str,
        issued_at: i64,
        expires_at: i64,
    ) -> Result<IssuedToken> {
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            iat: issued_at,
            exp: expires_at,
            jti: uuid::Uuid::new_v4().to_string(),
            principal,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| Error::Internal(format!("token signing: {e}")))?;
        Ok(IssuedToken { token, token_id: claims.jti, expires_at: claims.exp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> Result<TokenAuthority> {
        TokenAuthority::new("estate-mesh", &SigningKeyPair::from_seed([1; 32]))
    }

    #[test]
    fn issued_tokens_verify_to_their_principal() -> Result<()> {
        let a = authority()?;
        let p = Principal::Operator { tenant_id: "t1".into(), estate_ids: vec!["e1".into()] };
        let t = a.issue(p.clone(), "alice", 60)?;
        let c = a.verifying_keys().verify(&t.token, "r".into())?;
        assert_eq!(c.principal, p);
        assert_eq!(c.subject, "alice");
        Ok(())
    }

    #[test]
    fn forged_and_foreign_tokens_fail() -> Result<()> {
        let a = authority()?;
        let other = TokenAuthority::new("estate-mesh", &SigningKeyPair::from_seed([2; 32]))?;
        let t = other.issue(Principal::PlatformAdmin, "x", 60)?;
        assert!(matches!(a.verifying_keys().verify(&t.token, String::new()), Err(Error::Unauthenticated(_))));
        let good = a.issue(Principal::PlatformAdmin, "x", 60)?.token;
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_claims = other.issue(Principal::PlatformAdmin, "y", 60)?.token;
        let forged_payload = forged_claims.split('.').nth(1).unwrap_or_default().to_owned();
        parts[1] = &forged_payload;
        let tampered = parts.join(".");
        assert!(matches!(a.verifying_keys().verify(&tampered, String::new()), Err(Error::Unauthenticated(_))));
        assert!(a.verifying_keys().verify("not-a-token", String::new()).is_err());
        Ok(())
    }

    #[test]
    fn ttl_bounds_are_enforced() -> Result<()> {
        let a = authority()?;
        assert!(a.issue(Principal::PlatformAdmin, "x", 0).is_err());
        assert!(a.issue(Principal::PlatformAdmin, "x", MAX_TOKEN_TTL_SECS + 1).is_err());
        Ok(())
    }
}
