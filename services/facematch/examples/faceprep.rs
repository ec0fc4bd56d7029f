//! Crops faces from photos and prints pairwise cosine similarity of their
//! embeddings: `faceprep MODEL_DIR IMAGE...`.
use estate_facematch::{gallery::normalised, model::Embedder, prep};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(&args[1]);
    let det = prep::Detector::load(&dir.join("fr_detect.onnx"))?;
    let emb = Embedder::load(&dir.join("fr_feature.onnx"), 112, 512)?;
    let mut vecs = Vec::new();
    for p in &args[2..] {
        let frame = prep::decode(&std::fs::read(p)?)?;
        let t = std::time::Instant::now();
        let face = det.detect(&frame)?;
        println!("{p}: {:?} in {:?}", face, t.elapsed());
        if let Some(f) = face {
            let png = prep::crop(&frame, &f, 112)?;
            let t = std::time::Instant::now();
            let v = normalised(&emb.embed(&png)?).unwrap_or_default();
            println!("  embed {:?}", t.elapsed());
            vecs.push((p.clone(), v));
        }
    }
    for (a, va) in &vecs {
        for (b, vb) in &vecs {
            if a < b {
                let s: f32 = va.iter().zip(vb).map(|(x, y)| x * y).sum();
                println!("{s:.3}  {a} {b}");
            }
        }
    }
    Ok(())
}
