//! AVX-512 kernels (F for f32, BW for the i8 path). Masked loads handle the tail without a
//! scalar loop. Only reachable through [`super::Kernels::for_isa`], which checks `avx512f` and
//! `avx512bw` at run time first. The intrinsics are stable since Rust 1.89.

use std::arch::x86_64::*;

fn tail_mask(rem: usize) -> __mmask16 {
    ((1u32 << rem) - 1) as __mmask16
}

/// # Safety
/// The CPU must support AVX-512F; `a.len() == b.len()`.
#[target_feature(enable = "avx512f")]
unsafe fn dot_block_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1, mut s2, mut s3) =
        (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 64 <= n {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 32)), _mm512_loadu_ps(pb.add(i + 32)), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 48)), _mm512_loadu_ps(pb.add(i + 48)), s3);
        i += 64;
    }
    while i + 16 <= n {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
        i += 16;
    }
    if i < n {
        let m = tail_mask(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), s1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)))
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn l1_block_impl(a: &[f32]) -> f32 {
    let n = a.len();
    let pa = a.as_ptr();
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        s0 = _mm512_add_ps(s0, _mm512_abs_ps(_mm512_loadu_ps(pa.add(i))));
        s1 = _mm512_add_ps(s1, _mm512_abs_ps(_mm512_loadu_ps(pa.add(i + 16))));
        i += 32;
    }
    while i + 16 <= n {
        s0 = _mm512_add_ps(s0, _mm512_abs_ps(_mm512_loadu_ps(pa.add(i))));
        i += 16;
    }
    if i < n {
        s1 = _mm512_add_ps(s1, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), pa.add(i))));
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

/// # Safety
/// The CPU must support AVX-512F and AVX-512BW; `a.len() == b.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_i8_impl(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i + 64 <= n {
        let a0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pa.add(i).cast()));
        let b0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb.add(i).cast()));
        let a1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pa.add(i + 32).cast()));
        let b1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb.add(i + 32).cast()));
        s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(a0, b0));
        s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(a1, b1));
        i += 64;
    }
    while i + 32 <= n {
        let a0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pa.add(i).cast()));
        let b0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb.add(i).cast()));
        s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(a0, b0));
        i += 32;
    }
    let mut total = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
    while i < n {
        total = total.wrapping_add(i32::from(*pa.add(i)) * i32::from(*pb.add(i)));
        i += 1;
    }
    total
}

// Safe wrappers: sound because `Kernels::for_isa(Isa::Avx512)` only hands them out after
// `is_x86_feature_detected!("avx512f")` and `("avx512bw")` succeeded.

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
