//! One estate's gallery in memory: unit-norm templates, quantised to int8
//! per row for the scan, with the float32 vectors kept to re-score the few
//! best candidates exactly. The top-1 is therefore the exact float32 cosine
//! top-1 unless the true best row falls outside the int8 shortlist.

use crate::simd;

/// Rows re-scored exactly after the int8 scan.
const SHORTLIST: usize = 8;
/// Rows scored per block (the scores stay in L1).
const BLOCK: usize = 1024;

/// A gallery row's owner.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Template id (storage key).
    pub template_id: String,
    /// Pseudonymous person id.
    pub person: String,
    /// Consent the template was enrolled under.
    pub consent_id: String,
}

/// Best match of a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Row index.
    pub row: usize,
    /// Exact cosine similarity.
    pub score: f32,
}

/// An estate's templates.
#[derive(Debug)]
pub struct Gallery {
    dim: usize,
    padded: usize,
    entries: Vec<Entry>,
    quantised: Vec<i8>,
    scales: Vec<f32>,
    exact: Vec<f32>,
}

pub use estate_face_input::{normalised, quantise};

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes of partial sums let the compiler vectorise.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

impl Gallery {
    /// An empty gallery of `dim`-dimensional templates.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            padded: dim.div_ceil(32) * 32,
            entries: Vec::new(),
            quantised: Vec::new(),
            scales: Vec::new(),
            exact: Vec::new(),
        }
    }

    /// Template dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no template.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The owner of row `row`.
    pub fn entry(&self, row: usize) -> Option<&Entry> {
        self.entries.get(row)
    }

    /// Adds a unit-norm template of the gallery's dimension.
    pub fn push(&mut self, entry: Entry, unit: &[f32]) {
        debug_assert_eq!(unit.len(), self.dim);
        let (q, scale) = quantise(unit, self.padded);
        self.quantised.extend_from_slice(&q);
        self.scales.push(scale);
        self.exact.extend_from_slice(unit);
        self.entries.push(entry);
    }

    /// Removes every row of `person`; returns how many.
    pub fn remove_person(&mut self, person: &str) -> usize {
        let mut removed = 0;
        let mut row = 0;
        while row < self.entries.len() {
            if self.entries[row].person == person {
                self.swap_remove(row);
                removed += 1;
            } else {
                row += 1;
            }
        }
        removed
    }

    fn swap_remove(&mut self, row: usize) {
        let last = self.entries.len() - 1;
        if row != last {
            let (d, p) = (self.dim, self.padded);
            self.quantised.copy_within(last * p..(last + 1) * p, row * p);
            self.exact.copy_within(last * d..(last + 1) * d, row * d);
        }
        self.entries.swap_remove(row);
        self.scales.swap_remove(row);
        self.quantised.truncate(last * self.padded);
        self.exact.truncate(last * self.dim);
    }

    /// Exact cosine of `unit` with row `row`.
    pub fn exact_score(&self, unit: &[f32], row: usize) -> f32 {
        dot_f32(unit, &self.exact[row * self.dim..(row + 1) * self.dim])
    }

    /// 1:N: the best row for `unit` (already normalised): an int8 scan of
    /// every row, then the shortlist re-scored in float32.
    pub fn best(&self, unit: &[f32]) -> Option<Hit> {
        if self.entries.is_empty() {
            return None;
        }
        let (q, _) = quantise(unit, self.padded);
        let mut shortlist: Vec<(f32, usize)> = Vec::with_capacity(SHORTLIST + 1);
        let mut floor = f32::NEG_INFINITY;
        let mut scores = [0i32; BLOCK];
        for (block, rows) in self.quantised.chunks(BLOCK * self.padded).enumerate() {
            let n = rows.len() / self.padded;
            simd::scan_i8(&q, rows, self.padded, &mut scores[..n]);
            let base = block * BLOCK;
            for (i, &s) in scores[..n].iter().enumerate() {
                let approx = s as f32 * self.scales[base + i];
                if approx > floor || shortlist.len() < SHORTLIST {
                    shortlist.push((approx, base + i));
                    if shortlist.len() > SHORTLIST {
                        let (min_at, _) = shortlist
                            .iter()
                            .enumerate()
                            .fold((0, f32::INFINITY), |(at, m), (j, (v, _))| if *v < m { (j, *v) } else { (at, m) });
                        shortlist.swap_remove(min_at);
                    }
                    if shortlist.len() == SHORTLIST {
                        floor = shortlist.iter().map(|(v, _)| *v).fold(f32::INFINITY, f32::min);
                    }
                }
            }
        }
        shortlist
            .into_iter()
            .map(|(_, row)| Hit { row, score: self.exact_score(unit, row) })
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }

    /// The exact float32 best row: the reference the int8 path is measured
    /// against (benchmarks and tests).
    pub fn best_exact(&self, unit: &[f32]) -> Option<Hit> {
        (0..self.entries.len())
            .map(|row| Hit { row, score: self.exact_score(unit, row) })
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }

    /// 1:1: the best exact score among `person`'s rows.
    pub fn best_of(&self, unit: &[f32], person: &str) -> Option<Hit> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.person == person)
            .map(|(row, _)| Hit { row, score: self.exact_score(unit, row) })
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
    }

    #[test]
    fn bad_vectors_are_refused() {
        assert!(normalised(&[0.0, 0.0]).is_none());
        assert!(normalised(&[f32::NAN, 1.0]).is_none());
        assert!(normalised(&[f32::INFINITY, 1.0]).is_none());
        let v = normalised(&[3.0, 4.0]).unwrap_or_default();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn int8_top1_agrees_with_exact_and_removal_keeps_rows_consistent() {
        let dim = 100; // not a multiple of 32: exercises padding
        let mut seed = 7u64;
        let mut g = Gallery::new(dim);
        let mut vecs = Vec::new();
        for i in 0..3000 {
            let v = normalised(&(0..dim).map(|_| rng(&mut seed)).collect::<Vec<_>>()).unwrap_or_default();
            g.push(
                Entry { template_id: format!("t{i}"), person: format!("p{}", i % 1500), consent_id: String::new() },
                &v,
            );
            vecs.push(v);
        }
        let mut agree = 0;
        for i in 0..200 {
            // A noisy copy of a stored template.
            let probe: Vec<f32> = vecs[i * 7].iter().map(|x| x + 0.05 * rng(&mut seed)).collect();
            let probe = normalised(&probe).unwrap_or_default();
            let fast = g.best(&probe).map(|h| h.row);
            let exact = g.best_exact(&probe).map(|h| h.row);
            assert_eq!(exact, Some(i * 7));
            agree += usize::from(fast == exact);
        }
        assert_eq!(agree, 200);
        assert_eq!(g.remove_person("p3"), 2);
        assert_eq!(g.len(), 2998);
        assert!(g.entries.iter().all(|e| e.person != "p3"));
        // Rows still line up with their vectors after swap-removal.
        for row in 0..g.len() {
            let i: usize = g.entries[row].template_id[1..].parse().unwrap_or(usize::MAX);
            assert!((g.exact_score(&vecs[i], row) - 1.0).abs() < 1e-4);
        }
    }
}
