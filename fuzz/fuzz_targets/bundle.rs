//! Offline bundles as a gate receives them: the raw message (signature,
//! key id, contents), and contents that passed the signature (signed here
//! with a trusted key), decoded and used for decisions by the gate SDK.
#![no_main]
use estate_gate_sdk::bundle::{LocalView, Presented, TrustedKeys, verify};
use estate_proto::gate::{BundleKeys, OfflineBundle};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let key = estate_crypto::SigningKeyPair::from_seed([7; 32]);
    let keys = TrustedKeys::from_proto(&BundleKeys {
        keys: vec![estate_proto::gate::BundleKey {
            key_id: key.key_id().to_owned(),
            public_key: key.public_key_bytes().to_vec(),
        }],
    });
    if let Ok(raw) = OfflineBundle::decode(data) {
        let _ = verify(&raw, &keys, None, 0);
    }
    let signed = OfflineBundle { contents: data.to_vec(), key_id: key.key_id().to_owned(), signature: key.sign(data).to_vec() };
    if let Ok(contents) = verify(&signed, &keys, None, i64::MIN) {
        let mut view = LocalView::new(contents);
        for uid in ["04A1B2C3", "DEADBEEF", ""] {
            let _ = view.decide(&Presented::Card { uid: uid.into(), facility_code: String::new() }, 0);
        }
    }
});
