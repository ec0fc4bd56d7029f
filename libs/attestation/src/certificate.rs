//! Deletion certificates (R6): a signed statement of what was deleted, for
//! whom (pseudonymously), where, when and why. Anyone with the published
//! verifying key checks it offline (`meshctl deletion verify`).
//!
//! The signature covers `DOMAIN || body`, where `body` is the exact encoded
//! [`CertificateBody`]; verifiers decode those bytes, never a re-encoding.

use crate::KeySet;
use estate_crypto::{SigningKeyPair, verify_signature};
use estate_proto::facematch::{CertificateBody, DeletionCertificate};
use prost::Message;

/// Domain separation from every other signature of the mesh.
pub const DOMAIN: &[u8] = b"estate.facematch.deletion.v1\0";
/// Format of [`CertificateBody`] written and read here.
pub const FORMAT: u32 = 1;

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// The body does not decode.
    #[error("the certificate is malformed")]
    Malformed,
    /// A format this verifier does not know.
    #[error("the certificate format {0} is not supported")]
    UnsupportedFormat(u32),
    /// Not signed by a published key.
    #[error("the certificate was signed by an unknown key")]
    UnknownKey,
    /// The signature does not match the body.
    #[error("the certificate signature is not valid")]
    BadSignature,
}

fn message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

/// Signs `body` with `key`.
pub fn sign(key: &SigningKeyPair, body: &CertificateBody) -> DeletionCertificate {
    let bytes = body.encode_to_vec();
    let signature = key.sign(&message(&bytes)).to_vec();
    DeletionCertificate { body: bytes, key_id: key.key_id().to_owned(), signature, decoded: Some(body.clone()) }
}

/// Signs a body that is already encoded; `decoded` is left empty.
pub fn sign_encoded(key: &SigningKeyPair, body: &[u8]) -> DeletionCertificate {
    let signature = key.sign(&message(body)).to_vec();
    DeletionCertificate { body: body.to_vec(), key_id: key.key_id().to_owned(), signature, decoded: None }
}

/// Verifies `cert` against `keys` and returns the signed body.
pub fn verify(cert: &DeletionCertificate, keys: &KeySet) -> Result<CertificateBody, CertificateError> {
    let public = keys.get(&cert.key_id).ok_or(CertificateError::UnknownKey)?;
    if !verify_signature(public, &message(&cert.body), &cert.signature) {
        return Err(CertificateError::BadSignature);
    }
    let body = CertificateBody::decode(cert.body.as_slice()).map_err(|_| CertificateError::Malformed)?;
    if body.format != FORMAT {
        return Err(CertificateError::UnsupportedFormat(body.format));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_certificates_verify_and_tampering_is_caught() {
        let key = SigningKeyPair::from_seed([3; 32]);
        let keys = KeySet::new([(key.key_id().to_owned(), key.public_key_bytes())]);
        let body = CertificateBody {
            format: FORMAT,
            certificate_id: "c1".into(),
            tenant_id: "t".into(),
            person_pseudonym: "p".into(),
            templates_deleted: 2,
            ..Default::default()
        };
        let cert = sign(&key, &body);
        assert_eq!(verify(&cert, &keys), Ok(body));
        let mut bad = cert.clone();
        bad.body[3] ^= 1;
        assert_eq!(verify(&bad, &keys), Err(CertificateError::BadSignature));
        let other = SigningKeyPair::from_seed([4; 32]);
        assert_eq!(
            verify(&cert, &KeySet::new([(key.key_id().to_owned(), other.public_key_bytes())])),
            Err(CertificateError::BadSignature)
        );
        assert_eq!(verify(&cert, &KeySet::default()), Err(CertificateError::UnknownKey));
    }
}
