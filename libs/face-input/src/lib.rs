//! Untrusted face input, as gates and apps send it to facematch: encoded
//! images decoded in memory with size limits, and templates checked and
//! normalised. Kept apart so that it can be fuzzed on its own
//! (`fuzz/fuzz_targets/face_input.rs`). Nothing here writes anywhere (R8).

/// Largest accepted encoded image.
pub const MAX_IMAGE_BYTES: usize = 2 * 1024 * 1024;
/// Largest accepted decoded side, in pixels.
const MAX_SIDE: u32 = 4096;

/// Normalises `v` to unit length; `None` for NaN, infinity or a zero vector.
pub fn normalised(v: &[f32]) -> Option<Vec<f32>> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm.is_nan() || norm <= 1e-12 || !norm.is_finite() {
        return None;
    }
    Some(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

/// Int8 quantisation of a unit vector with its own scale: `q[i] ≈ v[i] / scale`.
pub fn quantise(v: &[f32], padded: usize) -> (Vec<i8>, f32) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let mut q = vec![0i8; padded];
    for (o, x) in q.iter_mut().zip(v) {
        // |x / scale| <= 127 by construction; the clamp guards rounding.
        *o = (x / scale).round().clamp(-127.0, 127.0) as i8;
    }
    (q, scale)
}

/// Decodes `encoded` and returns its RGB pixels as normalised NCHW floats.
pub fn pixels(encoded: &[u8], side: usize) -> Result<Vec<f32>, String> {
    if encoded.len() > MAX_IMAGE_BYTES {
        return Err(format!("the image must be at most {MAX_IMAGE_BYTES} bytes"));
    }
    let format = image::guess_format(encoded).map_err(|_| "the image must be a PNG or JPEG file".to_owned())?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err("the image must be a PNG or JPEG file".into());
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(encoded), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("the image does not decode: {e}"))?.to_rgb8();
    let side32 = u32::try_from(side).map_err(|_| "bad model side".to_owned())?;
    let img = if img.width() == side32 && img.height() == side32 {
        img
    } else {
        image::imageops::resize(&img, side32, side32, image::imageops::FilterType::Triangle)
    };
    let plane = side * side;
    let mut chw = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = (f32::from(p[c]) - 127.5) / 128.0;
        }
    }
    Ok(chw)
}
