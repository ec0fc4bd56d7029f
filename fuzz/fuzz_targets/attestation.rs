//! Consent attestations as facematch receives them: raw, and with claims
//! that passed the signature (signed here), decoded and checked.
#![no_main]
use estate_attestation::{Expected, KeySet, sign_encoded, verify};
use estate_proto::consent::{Purpose, SignedAttestation};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let key = estate_crypto::SigningKeyPair::from_seed([9; 32]);
    let keys = KeySet::new([(key.key_id().to_owned(), key.public_key_bytes())]);
    let expected = Expected { tenant_id: "t", estate_id: "e", purpose: Purpose::FaceVerificationAtGates };
    if let Ok(raw) = SignedAttestation::decode(data) {
        let _ = verify(&raw, &keys, &expected, 1_800_000_000);
    }
    let signed = sign_encoded(&key, data);
    let _ = verify(&signed, &keys, &expected, 1_800_000_000);
});
