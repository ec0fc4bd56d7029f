//! Deletion certificates as `meshctl deletion verify` reads them: raw, and
//! with a body that passed the signature (signed here), decoded.
#![no_main]
use estate_attestation::KeySet;
use estate_attestation::certificate::{sign_encoded, verify};
use estate_proto::facematch::DeletionCertificate;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let key = estate_crypto::SigningKeyPair::from_seed([11; 32]);
    let keys = KeySet::new([(key.key_id().to_owned(), key.public_key_bytes())]);
    if let Ok(raw) = DeletionCertificate::decode(data) {
        let _ = verify(&raw, &keys);
    }
    let _ = verify(&sign_encoded(&key, data), &keys);
});
