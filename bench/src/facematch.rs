//! `facematch-bench`: single-query 1:N Identify throughput of facematch's
//! gallery (int8 AVX2 scan + float32 re-score of the shortlist) against
//! faiss-cpu `IndexFlatIP` (exact float32) run one query at a time in the
//! same run on the same data, top-1 agreement with exact float32, the ratio
//! to a memory-bandwidth bound, and the model's image -> template time.
//!
//! Data: N unit vectors (Gaussian, seeded); queries are noisy copies of
//! random gallery rows (cosine to their source about 0.6, like a genuine
//! probe), normalised.

use clap::Parser;
use estate_facematch::gallery::{Entry, Gallery, normalised};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(name = "facematch-bench")]
struct Args {
    /// Templates in the gallery.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Template dimension.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Queries, sent one at a time.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Python with faiss-cpu and numpy (the baseline); skipped when unset.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Face assets (tools/fetch-face-assets.sh) for the model timing.
    #[arg(long)]
    assets: Option<PathBuf>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

fn unit(rng: &mut Rng, dim: usize) -> Vec<f32> {
    loop {
        let v: Vec<f32> = (0..dim).map(|_| rng.gaussian()).collect();
        if let Some(u) = normalised(&v) {
            return u;
        }
    }
}

/// Single-thread sequential read bandwidth over a buffer of `len` bytes,
/// bytes per second: best of `passes` AVX2 streaming passes (the first pass
/// warms caches the buffer fits in).
fn read_bandwidth(len: usize, passes: usize) -> f64 {
    let buf: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut best = 0f64;
    for _ in 0..passes {
        let t = Instant::now();
        std::hint::black_box(estate_facematch::simd::read_sum(&buf));
        best = best.max(len as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (n, dim) = (args.n, args.dim);
    println!(
        "facematch-bench: N = {n}, dim = {dim}, {} single queries, avx2 = {}",
        args.queries,
        std::arch::is_x86_feature_detected!("avx2")
    );
    let mut rng = Rng(0x5eed_f00d);
    let t = Instant::now();
    let mut gallery = Gallery::new(dim);
    let mut flat: Vec<f32> = Vec::with_capacity(n * dim);
    for i in 0..n {
        let v = unit(&mut rng, dim);
        flat.extend_from_slice(&v);
        gallery.push(Entry { template_id: i.to_string(), person: i.to_string(), consent_id: String::new() }, &v);
    }
    let mut queries: Vec<Vec<f32>> = Vec::with_capacity(args.queries);
    let mut sources = Vec::with_capacity(args.queries);
    for _ in 0..args.queries {
        let src = (rng.next() % n as u64) as usize;
        let noise = unit(&mut rng, dim);
        let q: Vec<f32> = flat[src * dim..(src + 1) * dim].iter().zip(&noise).map(|(a, b)| 0.6 * a + 0.8 * b).collect();
        queries.push(normalised(&q).unwrap_or_default());
        sources.push(src);
    }
    println!("built gallery in {:.1} s", t.elapsed().as_secs_f64());

    // Ours, one query at a time.
    for q in queries.iter().take(20) {
        std::hint::black_box(gallery.best(q));
    }
    let t = Instant::now();
    let ours: Vec<usize> = queries.iter().map(|q| gallery.best(q).map_or(usize::MAX, |h| h.row)).collect();
    let ours_s = t.elapsed().as_secs_f64();
    let ours_qps = args.queries as f64 / ours_s;
    println!("facematch int8+rescore: {ours_qps:.1} queries/s ({:.2} ms/query)", 1000.0 * ours_s / args.queries as f64);

    // Exact float32 reference (our own scalar scan), for top-1 agreement.
    let t = Instant::now();
    let exact: Vec<usize> = queries.iter().map(|q| gallery.best_exact(q).map_or(usize::MAX, |h| h.row)).collect();
    let exact_s = t.elapsed().as_secs_f64();
    let agree = ours.iter().zip(&exact).filter(|(a, b)| a == b).count();
    let found = exact.iter().zip(&sources).filter(|(a, b)| a == b).count();
    println!(
        "exact float32 scan (reference): {:.1} queries/s; top-1 agreement {agree}/{} = {:.2}%; exact top-1 is the probe's source in {found}/{}",
        args.queries as f64 / exact_s,
        args.queries,
        100.0 * agree as f64 / args.queries as f64,
        args.queries
    );

    // Bandwidth bounds: reading the scanned bytes at the machine's read
    // bandwidth for a buffer of the same size (the gallery may sit in a large
    // last-level cache), and for one far larger than any cache (DRAM).
    let bytes = n * dim.div_ceil(32) * 32 + n * 4;
    let per_query = ours_s / args.queries as f64;
    for (label, bw) in [
        ("same-size buffer", read_bandwidth(bytes.div_ceil(128) * 128, 20)),
        ("512 MiB buffer (DRAM)", read_bandwidth(512 * 1024 * 1024, 5)),
    ] {
        let bound_s = bytes as f64 / bw;
        println!(
            "bandwidth bound, {label}: {:.1} GB/s read; {:.1} MB scanned per query -> {:.2} ms; measured {:.2} ms = {:.2}x the bound",
            bw / 1e9,
            bytes as f64 / 1e6,
            bound_s * 1e3,
            per_query * 1e3,
            per_query / bound_s,
        );
    }

    // faiss baseline, same data, same run.
    if let Some(python) = &args.python {
        let dir = tempfile::tempdir()?;
        let mut g = std::io::BufWriter::new(std::fs::File::create(dir.path().join("gallery.f32"))?);
        for x in &flat {
            g.write_all(&x.to_le_bytes())?;
        }
        g.flush()?;
        drop(g);
        let mut qf = std::io::BufWriter::new(std::fs::File::create(dir.path().join("queries.f32"))?);
        for q in &queries {
            for x in q {
                qf.write_all(&x.to_le_bytes())?;
            }
        }
        qf.flush()?;
        drop(qf);
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/bench/faiss_baseline.py");
        for threads in [1, 2] {
            let out = std::process::Command::new(python)
                .arg(&script)
                .arg(dir.path())
                .arg(dim.to_string())
                .env("FAISS_THREADS", threads.to_string())
                .output()?;
            anyhow::ensure!(out.status.success(), "faiss baseline failed: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let qps = v["qps"].as_f64().unwrap_or(0.0);
            let top1: Vec<usize> = v["top1"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                .unwrap_or_default();
            let agree_faiss = ours.iter().zip(&top1).filter(|(a, b)| a == b).count();
            println!(
                "faiss {} IndexFlatIP, {threads} OpenMP thread(s): {qps:.1} queries/s; ours / faiss = {:.2}x; top-1 agreement with faiss {agree_faiss}/{}",
                v["faiss_version"].as_str().unwrap_or("?"),
                ours_qps / qps,
                top1.len()
            );
        }
    } else {
        println!("faiss baseline skipped (no --python)");
    }

    // The model: image -> template.
    if let Some(assets) = &args.assets {
        let emb = estate_facematch::model::Embedder::load(&assets.join("model/fr_feature.onnx"), 112, 512)?;
        let det = estate_facematch::prep::Detector::load(&assets.join("model/fr_detect.onnx"))?;
        let mut crops = Vec::new();
        for name in ["obama", "obama2", "obama3", "biden"] {
            let frame = estate_facematch::prep::decode(&std::fs::read(assets.join(format!("images/{name}.jpg")))?)?;
            let t = Instant::now();
            let face = det.detect(&frame)?.ok_or_else(|| anyhow::anyhow!("no face in {name}"))?;
            let detect_ms = t.elapsed().as_secs_f64() * 1e3;
            crops.push((estate_facematch::prep::crop(&frame, &face, 112)?, detect_ms));
        }
        for (png, _) in &crops {
            emb.embed(png)?;
        }
        let rounds = 10;
        let t = Instant::now();
        for _ in 0..rounds {
            for (png, _) in &crops {
                std::hint::black_box(emb.embed(png)?);
            }
        }
        let per = t.elapsed().as_secs_f64() * 1e3 / (rounds * crops.len()) as f64;
        let detect = crops.iter().map(|(_, d)| d).sum::<f64>() / crops.len() as f64;
        println!(
            "model fr_feature.onnx (tract): {per:.1} ms per aligned 112x112 PNG -> 512-d template (decode + embed); terminal-side face detection {detect:.1} ms per photo"
        );
    }
    Ok(())
}
