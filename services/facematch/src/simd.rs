//! The inner loop of the gallery scan: dot products of an int8 query with
//! int8 rows. AVX2 when the CPU has it (checked once at run time), a portable
//! loop otherwise; both give the same integer result.
#![allow(unsafe_code)]

/// Dot product of two int8 vectors of equal length whose entries lie in
/// [-127, 127] (the quantiser never emits -128).
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() == b.len() && a.len().is_multiple_of(32) && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above) and the slices are
            // of equal length, a multiple of 32, as `dot_avx2` requires.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Scores every row of `rows` (row-major, `dim` int8 each) against `query`
/// into `out` (one i32 per row).
pub fn scan_i8(query: &[i8], rows: &[i8], dim: usize, out: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if dim.is_multiple_of(32)
            && query.len() == dim
            && rows.len() == dim * out.len()
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: AVX2 is present; every row slice has `dim` entries, a
            // multiple of 32, like the query.
            unsafe { scan_avx2(query, rows, dim, out) };
            return;
        }
    }
    for (row, o) in rows.chunks_exact(dim).zip(out.iter_mut()) {
        *o = dot_portable(query, row);
    }
}

/// Sum of all bytes of `buf`: a pure streaming read, used by the benchmark
/// to measure read bandwidth with the same instruction set as the scan.
pub fn read_sum(buf: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if buf.len().is_multiple_of(128) && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the length is a multiple of 128.
            return unsafe { read_sum_avx2(buf) };
        }
    }
    buf.iter().map(|&b| u64::from(b)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_sum_avx2(buf: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_si256(); 4];
    let p = buf.as_ptr();
    let mut i = 0;
    while i + 128 <= buf.len() {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 128 <= len, so each 32-byte load is in bounds.
            let v = unsafe { _mm256_loadu_si256(p.add(i + 32 * k).cast()) };
            *a = _mm256_add_epi64(*a, _mm256_sad_epu8(v, zero));
        }
        i += 128;
    }
    let mut lanes = [0u64; 4];
    for a in acc {
        let mut out = [0u64; 4];
        // SAFETY: `out` has room for 32 bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), a) };
        for (l, o) in lanes.iter_mut().zip(out) {
            *l += o;
        }
    }
    lanes.iter().sum()
}

/// The reference implementation (and the fallback).
pub fn dot_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(query: &[i8], rows: &[i8], dim: usize, out: &mut [i32]) {
    for (row, o) in rows.chunks_exact(dim).zip(out.iter_mut()) {
        // SAFETY: same preconditions as this function's.
        *o = unsafe { dot_avx2(query, row) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc0 = _mm256_setzero_si256();
    let mut acc1 = _mm256_setzero_si256();
    let n = a.len();
    let pa = a.as_ptr();
    let pb = b.as_ptr();
    let mut i = 0;
    // Two independent accumulators hide the latency of maddubs/madd.
    while i + 64 <= n {
        // SAFETY: i + 64 <= n and both slices have n bytes; unaligned loads.
        let (x0, y0, x1, y1) = unsafe {
            (
                _mm256_loadu_si256(pa.add(i).cast()),
                _mm256_loadu_si256(pb.add(i).cast()),
                _mm256_loadu_si256(pa.add(i + 32).cast()),
                _mm256_loadu_si256(pb.add(i + 32).cast()),
            )
        };
        // |x| * (y with x's sign): u8 x i8 products summed in pairs to i16
        // (at most 2 * 127 * 127, no saturation), then pairs to i32.
        let p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(y0, x0));
        let p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(y1, x1));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
        i += 64;
    }
    while i + 32 <= n {
        // SAFETY: i + 32 <= n.
        let (x, y) = unsafe { (_mm256_loadu_si256(pa.add(i).cast()), _mm256_loadu_si256(pb.add(i).cast())) };
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(y, x));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p, ones));
        i += 32;
    }
    let acc = _mm256_add_epi32(acc0, acc1);
    let lo = _mm256_castsi256_si128(acc);
    let hi = _mm256_extracti128_si256(acc, 1);
    let s = _mm_add_epi32(lo, hi);
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_agrees_with_the_reference() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            i8::try_from(i64::from(seed % 255) - 127).unwrap_or(0)
        };
        for dim in [32usize, 64, 96, 512] {
            let a: Vec<i8> = (0..dim).map(|_| next()).collect();
            let rows: Vec<i8> = (0..dim * 7).map(|_| next()).collect();
            let mut out = vec![0; 7];
            scan_i8(&a, &rows, dim, &mut out);
            for (r, o) in rows.chunks_exact(dim).zip(&out) {
                assert_eq!(*o, dot_portable(&a, r));
                assert_eq!(dot_i8(&a, r), dot_portable(&a, r));
            }
        }
        let bytes: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(read_sum(&bytes), bytes.iter().map(|&b| u64::from(b)).sum::<u64>());
        // Extremes do not saturate.
        let a = vec![127i8; 512];
        let b = vec![-127i8; 512];
        assert_eq!(dot_i8(&a, &b), -127 * 127 * 512);
    }
}
