//! Image -> template with an ONNX face-embedding model run by tract (pure
//! Rust). The model is not part of the repository: its path comes from the
//! settings (`model_path`). The default preprocessing fits ArcFace-style
//! models such as `fr_feature.onnx` of the npm package
//! `faceplugin-face-recognition-js`: an aligned 112x112 RGB face, each
//! channel scaled as (x - 127.5) / 128, NCHW, one embedding out.
//!
//! Images are decoded in memory and dropped after embedding; nothing here
//! writes to disk (R8).

use std::path::Path;
use tract_onnx::prelude::*;

pub use estate_face_input::MAX_IMAGE_BYTES;

/// Why an image could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file could not be loaded or has an unexpected shape.
    #[error("face model {0}")]
    Load(String),
    /// The bytes are not a PNG or JPEG image, or too large.
    #[error("{0}")]
    Image(String),
    /// Inference failed.
    #[error("face model inference failed: {0}")]
    Run(String),
}

type Plan = std::sync::Arc<TypedSimplePlan>;

/// A loaded embedding model.
pub struct Embedder {
    plan: Plan,
    side: usize,
    dim: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("side", &self.side).field("dim", &self.dim).finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads and optimises the model at `path` for `side` x `side` RGB input,
    /// and checks that it yields `dim` numbers.
    pub fn load(path: &Path, side: usize, dim: usize) -> Result<Self, ModelError> {
        let load = |e: TractError| ModelError::Load(format!("{}: {e}", path.display()));
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(load)?
            .with_input_fact(0, f32::fact([1, 3, side, side]).into())
            .map_err(load)?
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        let embedder = Self { plan, side, dim: 0 };
        let probe = embedder.run(vec![0.0; 3 * side * side])?;
        if probe.len() != dim {
            return Err(ModelError::Load(format!(
                "{} yields {} numbers, but the tenant's template dimension is {dim}",
                path.display(),
                probe.len()
            )));
        }
        Ok(Self { dim, ..embedder })
    }

    /// Output dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    fn run(&self, chw: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        let s = self.side;
        let input: Tensor = tract_ndarray::Array4::from_shape_vec((1, 3, s, s), chw)
            .map_err(|e| ModelError::Run(e.to_string()))?
            .into();
        let out = self.plan.run(tvec!(input.into())).map_err(|e| ModelError::Run(e.to_string()))?;
        let first = out.first().ok_or_else(|| ModelError::Run("the model has no output".into()))?;
        let view = first.to_plain_array_view::<f32>().map_err(|e| ModelError::Run(e.to_string()))?;
        Ok(view.iter().copied().collect())
    }

    /// The embedding of an aligned face image (PNG or JPEG; resized to the
    /// model's input side when it is not already that size).
    pub fn embed(&self, encoded: &[u8]) -> Result<Vec<f32>, ModelError> {
        self.run(estate_face_input::pixels(encoded, self.side).map_err(ModelError::Image)?)
    }
}

/// Decodes `encoded` and returns its RGB pixels as normalised NCHW floats.
pub fn pixels(encoded: &[u8], side: usize) -> Result<Vec<f32>, ModelError> {
    estate_face_input::pixels(encoded, side).map_err(ModelError::Image)
}
