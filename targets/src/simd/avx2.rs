//! AVX2 + FMA kernels (x86-64 since Haswell / Zen). Only reachable through
//! [`super::Kernels::for_isa`], which checks both features at run time first.

use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX and SSE3 (implied by AVX2).
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// The CPU must support AVX2 and FMA; `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1, mut s2, mut s3) =
        (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), s3);
        i += 32;
    }
    while i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn l1_block_impl(a: &[f32]) -> f32 {
    let n = a.len();
    let pa = a.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_add_ps(s0, _mm256_andnot_ps(sign, _mm256_loadu_ps(pa.add(i))));
        s1 = _mm256_add_ps(s1, _mm256_andnot_ps(sign, _mm256_loadu_ps(pa.add(i + 8))));
        i += 16;
    }
    while i + 8 <= n {
        s0 = _mm256_add_ps(s0, _mm256_andnot_ps(sign, _mm256_loadu_ps(pa.add(i))));
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    while i < n {
        s += (*pa.add(i)).abs();
        i += 1;
    }
    s
}

/// # Safety
/// The CPU must support AVX2; `a.len() == b.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_impl(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i + 32 <= n {
        // Sign-extend 16 i8 to i16, multiply pairwise and add adjacent pairs into i32 (exact:
        // |x*y| <= 2^14, so a pair fits easily).
        let a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(i).cast()));
        let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i).cast()));
        let a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(i + 16).cast()));
        let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(i + 16).cast()));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(a0, b0));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(a1, b1));
        i += 32;
    }
    let s = _mm256_add_epi32(s0, s1);
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    let mut total = _mm_cvtsi128_si32(s);
    while i < n {
        total = total.wrapping_add(i32::from(*pa.add(i)) * i32::from(*pb.add(i)));
        i += 1;
    }
    total
}

// Safe wrappers: sound because `Kernels::for_isa(Isa::Avx2Fma)` only hands them out after
// `is_x86_feature_detected!("avx2")` and `("fma")` succeeded.

pub(super) fn dot_block(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: see above; lengths are equal (checked by the public entry points).
    unsafe { dot_block_impl(a, b) }
}

pub(super) fn sum_sq_block(a: &[f32]) -> f32 {
    // SAFETY: see above.
    unsafe { dot_block_impl(a, a) }
}

pub(super) fn l1_block(a: &[f32]) -> f32 {
    // SAFETY: see above.
    unsafe { l1_block_impl(a) }
}

pub(super) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    // SAFETY: see above.
    unsafe { dot_i8_impl(a, b) }
}
