//! A gate's on-disk journal of offline decisions, as read after a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (records, valid) = estate_gate_sdk::journal::parse_records(data);
    assert!(valid <= data.len());
    assert!(records.len() <= data.len() / 8 + 1);
});
