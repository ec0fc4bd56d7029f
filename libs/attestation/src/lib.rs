//! Consent attestations (R9): the consent service states, signed with
//! Ed25519, "person P of tenant T consents to purpose F at estate E under
//! notice N, until t". Facematch checks the statement offline with the
//! published verifying keys, so it needs no outbound call to learn of consent.
//!
//! The signature covers `DOMAIN || claims`, where `claims` are the exact
//! encoded bytes carried in the attestation; verifiers decode those bytes,
//! never a re-encoding, so what was signed is what is checked.

pub mod certificate;

use estate_crypto::{SigningKeyPair, verify_signature};
use estate_proto::consent::{AttestationClaims, Purpose, SignedAttestation, VerifyingKey, VerifyingKeys};
use prost::Message;
use std::collections::HashMap;

/// Domain separation: an attestation signature can never be mistaken for a
/// signature over anything else the mesh signs.
pub const DOMAIN: &[u8] = b"estate.consent.attestation.v1\0";
/// Format number of [`AttestationClaims`] this library writes and reads.
pub const FORMAT: u32 = 1;
/// Tolerated clock difference between issuer and verifier, in seconds.
pub const CLOCK_LEEWAY_SECS: i64 = 30;

/// Why an attestation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// The claims do not decode or the signature has the wrong length.
    #[error("the attestation is malformed")]
    Malformed,
    /// A format this verifier does not know.
    #[error("the attestation format {0} is not supported")]
    UnsupportedFormat(u32),
    /// Signed by a key that is not among the published verifying keys.
    #[error("the attestation was signed by an unknown key")]
    UnknownKey,
    /// The signature does not match the claims (tampering).
    #[error("the attestation signature is not valid")]
    BadSignature,
    /// Past its expiry.
    #[error("the attestation has expired")]
    Expired,
    /// Issued in the future (beyond clock leeway).
    #[error("the attestation is not yet valid")]
    NotYetValid,
    /// For another tenant.
    #[error("the attestation is for another tenant")]
    WrongTenant,
    /// For another estate.
    #[error("the attestation is for another estate")]
    WrongEstate,
    /// For another purpose.
    #[error("the attestation is for another purpose")]
    WrongPurpose,
}

/// Signs `claims` with `key`.
pub fn sign(key: &SigningKeyPair, claims: &AttestationClaims) -> SignedAttestation {
    let bytes = claims.encode_to_vec();
    let signature = key.sign(&signed_message(&bytes)).to_vec();
    SignedAttestation { claims: bytes, key_id: key.key_id().to_owned(), signature, decoded: Some(claims.clone()) }
}

/// Signs claims that are already encoded (a verifier decodes exactly these
/// bytes); `decoded` is left empty.
pub fn sign_encoded(key: &SigningKeyPair, claims: &[u8]) -> SignedAttestation {
    let signature = key.sign(&signed_message(claims)).to_vec();
    SignedAttestation { claims: claims.to_vec(), key_id: key.key_id().to_owned(), signature, decoded: None }
}

fn signed_message(claims: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + claims.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(claims);
    m
}

/// The verifying keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, [u8; 32]>,
}

impl KeySet {
    /// A key set from (key id, public key) pairs.
    pub fn new(keys: impl IntoIterator<Item = (String, [u8; 32])>) -> Self {
        Self { keys: keys.into_iter().collect() }
    }

    /// The key set published by the consent service; keys of another
    /// algorithm or length are skipped.
    pub fn from_published(published: &VerifyingKeys) -> Self {
        Self::new(
            published
                .keys
                .iter()
                .filter(|k| k.algorithm == "ed25519")
                .filter_map(|k| <[u8; 32]>::try_from(k.public_key.as_slice()).ok().map(|pk| (k.key_id.clone(), pk))),
        )
    }

    /// The public key with id `key_id`, if trusted.
    pub fn get(&self, key_id: &str) -> Option<&[u8; 32]> {
        self.keys.get(key_id)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The published form of one signing key.
    pub fn published_key(key: &SigningKeyPair) -> VerifyingKey {
        VerifyingKey {
            key_id: key.key_id().to_owned(),
            algorithm: "ed25519".to_owned(),
            public_key: key.public_key_bytes().to_vec(),
        }
    }
}

/// What the verifier requires the attestation to be about.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The verifier's tenant (facematch runs one instance per tenant).
    pub tenant_id: &'a str,
    /// The estate whose gallery the enrolment is for.
    pub estate_id: &'a str,
    /// The purpose of the processing.
    pub purpose: Purpose,
}

/// Verifies `att` at time `now_unix` (seconds) and returns its claims.
pub fn verify(
    att: &SignedAttestation,
    keys: &KeySet,
    expected: &Expected<'_>,
    now_unix: i64,
) -> Result<AttestationClaims, AttestationError> {
    let key = keys.keys.get(&att.key_id).ok_or(AttestationError::UnknownKey)?;
    if att.signature.len() != 64 {
        return Err(AttestationError::Malformed);
    }
    if !verify_signature(key, &signed_message(&att.claims), &att.signature) {
        return Err(AttestationError::BadSignature);
    }
    let claims = AttestationClaims::decode(att.claims.as_slice()).map_err(|_| AttestationError::Malformed)?;
    if claims.format != FORMAT {
        return Err(AttestationError::UnsupportedFormat(claims.format));
    }
    if now_unix >= claims.expires_at_unix {
        return Err(AttestationError::Expired);
    }
    if claims.issued_at_unix > now_unix + CLOCK_LEEWAY_SECS {
        return Err(AttestationError::NotYetValid);
    }
    if claims.tenant_id != expected.tenant_id {
        return Err(AttestationError::WrongTenant);
    }
    if claims.estate_id != expected.estate_id {
        return Err(AttestationError::WrongEstate);
    }
    if claims.purpose != expected.purpose as i32 {
        return Err(AttestationError::WrongPurpose);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn claims() -> AttestationClaims {
        AttestationClaims {
            format: FORMAT,
            tenant_id: "t1".into(),
            estate_id: "e1".into(),
            person_pseudonym: "psn_x".into(),
            purpose: Purpose::FaceVerificationAtGates as i32,
            notice_text_sha256: "ab".repeat(32),
            consent_id: "c1".into(),
            issued_at_unix: NOW,
            expires_at_unix: NOW + 300,
            concerns_minor: false,
        }
    }

    fn setup() -> (SigningKeyPair, KeySet, SignedAttestation) {
        let key = SigningKeyPair::from_seed([9; 32]);
        let keys = KeySet::from_published(&VerifyingKeys { keys: vec![KeySet::published_key(&key)] });
        let att = sign(&key, &claims());
        (key, keys, att)
    }

    fn expected() -> Expected<'static> {
        Expected { tenant_id: "t1", estate_id: "e1", purpose: Purpose::FaceVerificationAtGates }
    }

    #[test]
    fn a_genuine_attestation_verifies() {
        let (_, keys, att) = setup();
        assert_eq!(verify(&att, &keys, &expected(), NOW + 10), Ok(claims()));
    }

    #[test]
    fn every_tamper_kind_is_refused() {
        let (_, keys, att) = setup();
        let e = expected();
        assert_eq!(verify(&att, &keys, &e, NOW + 300), Err(AttestationError::Expired));
        assert_eq!(verify(&att, &keys, &e, NOW - 100), Err(AttestationError::NotYetValid));
        let other_estate = Expected { estate_id: "e2", ..e };
        assert_eq!(verify(&att, &keys, &other_estate, NOW), Err(AttestationError::WrongEstate));
        let other_tenant = Expected { tenant_id: "t2", ..e };
        assert_eq!(verify(&att, &keys, &other_tenant, NOW), Err(AttestationError::WrongTenant));
        let other_purpose = Expected { purpose: Purpose::Marketing, ..e };
        assert_eq!(verify(&att, &keys, &other_purpose, NOW), Err(AttestationError::WrongPurpose));

        // Claims changed after signing: a longer expiry, another person.
        let mut longer = claims();
        longer.expires_at_unix += 86_400;
        let tampered = SignedAttestation { claims: longer.encode_to_vec(), ..att.clone() };
        assert_eq!(verify(&tampered, &keys, &e, NOW), Err(AttestationError::BadSignature));
        let mut flipped = att.clone();
        if let Some(b) = flipped.claims.last_mut() {
            *b ^= 1;
        }
        assert_eq!(verify(&flipped, &keys, &e, NOW), Err(AttestationError::BadSignature));
        let mut bad_sig = att.clone();
        bad_sig.signature[0] ^= 1;
        assert_eq!(verify(&bad_sig, &keys, &e, NOW), Err(AttestationError::BadSignature));
        let short_sig = SignedAttestation { signature: vec![1, 2, 3], ..att.clone() };
        assert_eq!(verify(&short_sig, &keys, &e, NOW), Err(AttestationError::Malformed));

        // The `decoded` copy is never trusted.
        let mut lying = att.clone();
        if let Some(d) = lying.decoded.as_mut() {
            d.estate_id = "e2".into();
        }
        assert!(verify(&lying, &keys, &e, NOW).is_ok());

        // Signed by another key, or naming a key id nobody published.
        let stranger = SigningKeyPair::from_seed([7; 32]);
        let foreign = sign(&stranger, &claims());
        assert_eq!(verify(&foreign, &keys, &e, NOW), Err(AttestationError::UnknownKey));
        let relabelled = SignedAttestation { key_id: att.key_id.clone(), ..foreign };
        assert_eq!(verify(&relabelled, &keys, &e, NOW), Err(AttestationError::BadSignature));
    }

    #[test]
    fn unknown_formats_are_refused() {
        let key = SigningKeyPair::from_seed([9; 32]);
        let keys = KeySet::new([(key.key_id().to_owned(), key.public_key_bytes())]);
        let mut c = claims();
        c.format = 2;
        let att = sign(&key, &c);
        assert_eq!(verify(&att, &keys, &expected(), NOW), Err(AttestationError::UnsupportedFormat(2)));
    }
}
