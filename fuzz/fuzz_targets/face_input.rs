//! Face probes as a gate or app sends them: image bytes decoded and resized
//! in memory (PNG / JPEG decoders with limits), and templates normalised.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = estate_face_input::pixels(data, 112);
    let floats: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some(unit) = estate_face_input::normalised(&floats) {
        let (q, scale) = estate_face_input::quantise(&unit, unit.len().div_ceil(32) * 32);
        assert!(scale.is_finite() && q.iter().all(|x| *x >= -127));
    }
});
