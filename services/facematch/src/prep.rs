//! What a gate terminal does before it sends a face: find the face in a
//! camera frame and crop it to the model's aligned input. Facematch itself
//! takes the aligned crop; this module serves terminals, tools and tests.
//!
//! The detector is an Ultra-Light-Fast-Generic-Face-Detector style ONNX model
//! (such as `fr_detect.onnx` of `faceplugin-face-recognition-js`): RGB
//! 320x240 in, (x - 127) / 128, `scores` [1, N, 2] and `boxes` [1, N, 4]
//! (corners relative to the frame) out.

use crate::model::ModelError;
use std::path::Path;
use tract_onnx::prelude::*;

const W: usize = 320;
const H: usize = 240;

/// A loaded face detector.
pub struct Detector {
    plan: std::sync::Arc<TypedSimplePlan>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Detector")
    }
}

/// A detected face, in pixels of the frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Face {
    /// Left, top, right, bottom.
    pub bbox: [f32; 4],
    /// Detector confidence.
    pub score: f32,
}

impl Detector {
    /// Loads the detector at `path`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let load = |e: TractError| ModelError::Load(format!("{}: {e}", path.display()));
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(load)?
            .with_input_fact(0, f32::fact([1, 3, H, W]).into())
            .map_err(load)?
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        Ok(Self { plan })
    }

    /// The most confident face of `frame`, if any above 0.6.
    pub fn detect(&self, frame: &image::RgbImage) -> Result<Option<Face>, ModelError> {
        let small = image::imageops::resize(frame, W as u32, H as u32, image::imageops::FilterType::Triangle);
        let mut chw = vec![0f32; 3 * W * H];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                chw[c * W * H + i] = (f32::from(p[c]) - 127.0) / 128.0;
            }
        }
        let input: Tensor = tract_ndarray::Array4::from_shape_vec((1, 3, H, W), chw)
            .map_err(|e| ModelError::Run(e.to_string()))?
            .into();
        let out = self.plan.run(tvec!(input.into())).map_err(|e| ModelError::Run(e.to_string()))?;
        let (Some(scores), Some(boxes)) = (out.first(), out.get(1)) else {
            return Err(ModelError::Run("the detector must output scores and boxes".into()));
        };
        let scores = scores.to_plain_array_view::<f32>().map_err(|e| ModelError::Run(e.to_string()))?;
        let boxes = boxes.to_plain_array_view::<f32>().map_err(|e| ModelError::Run(e.to_string()))?;
        let (scores, boxes): (Vec<f32>, Vec<f32>) = (scores.iter().copied().collect(), boxes.iter().copied().collect());
        let (fw, fh) = (frame.width() as f32, frame.height() as f32);
        let best = scores
            .chunks_exact(2)
            .zip(boxes.chunks_exact(4))
            .map(|(s, b)| Face { bbox: [b[0] * fw, b[1] * fh, b[2] * fw, b[3] * fh], score: s[1] })
            .filter(|f| f.score > 0.6)
            .max_by(|a, b| a.score.total_cmp(&b.score));
        Ok(best)
    }
}

/// Crops `face` from `frame` as a square around the box (with a margin that
/// matches ArcFace-style crops) resized to `side`, PNG-encoded.
pub fn crop(frame: &image::RgbImage, face: &Face, side: u32) -> Result<Vec<u8>, ModelError> {
    let [l, t, r, b] = face.bbox;
    let (cx, cy) = ((l + r) / 2.0, (t + b) / 2.0);
    let size = (r - l).max(b - t) * 0.95;
    let x0 = (cx - size / 2.0).max(0.0) as u32;
    let y0 = (cy - size / 2.0).max(0.0) as u32;
    let s = (size as u32).min(frame.width().saturating_sub(x0)).min(frame.height().saturating_sub(y0)).max(1);
    let cut = image::imageops::crop_imm(frame, x0, y0, s, s).to_image();
    let resized = image::imageops::resize(&cut, side, side, image::imageops::FilterType::Triangle);
    let mut png = Vec::new();
    resized
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| ModelError::Image(e.to_string()))?;
    Ok(png)
}

/// Decodes an encoded frame (PNG or JPEG).
pub fn decode(encoded: &[u8]) -> Result<image::RgbImage, ModelError> {
    image::load_from_memory(encoded).map(|i| i.to_rgb8()).map_err(|e| ModelError::Image(e.to_string()))
}
