//! The regulator's offline verifier on an arbitrary export file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = std::collections::HashMap::from([("k".to_owned(), [3u8; 32])]);
    if let Ok(bundle) = estate_audit_bundle::Bundle::read(data) {
        let _ = bundle.verify(&keys, None);
    }
    let _ = estate_audit_bundle::parse_keys(&String::from_utf8_lossy(data));
});
