//! NEON kernels (every aarch64 Linux CPU), plus an int8 dot product using the Armv8.2 `sdot`
//! instruction (`dotprod`: Cortex-A76/A78AE, Neoverse). `vdotq_s32` is still unstable in Rust
//! 1.95 (`stdarch_neon_dotprod`), so `sdot` is emitted with inline assembly.

use std::arch::aarch64::*;
use std::arch::asm;

/// # Safety
/// The CPU must support NEON; `a.len() == b.len()`.
#[target_feature(enable = "neon")]
unsafe fn dot_block_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1, mut s2, mut s3) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 16 <= n {
        s0 = vfmaq_f32(s0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
        s1 = vfmaq_f32(s1, vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
        s2 = vfmaq_f32(s2, vld1q_f32(pa.add(i + 8)), vld1q_f32(pb.add(i + 8)));
        s3 = vfmaq_f32(s3, vld1q_f32(pa.add(i + 12)), vld1q_f32(pb.add(i + 12)));
        i += 16;
    }
    while i + 4 <= n {
        s0 = vfmaq_f32(s0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn l1_block_impl(a: &[f32]) -> f32 {
    let n = a.len();
    let pa = a.as_ptr();
    let (mut s0, mut s1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut i = 0;
    while i + 8 <= n {
        s0 = vaddq_f32(s0, vabsq_f32(vld1q_f32(pa.add(i))));
        s1 = vaddq_f32(s1, vabsq_f32(vld1q_f32(pa.add(i + 4))));
        i += 8;
    }
    while i + 4 <= n {
        s0 = vaddq_f32(s0, vabsq_f32(vld1q_f32(pa.add(i))));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(s0, s1));
    while i < n {
        s += (*pa.add(i)).abs();
        i += 1;
    }
    s
}

/// Plain NEON int8 dot: widening multiply to i16, pairwise accumulate into i32.
///
/// # Safety
/// The CPU must support NEON; `a.len() == b.len()`.
#[target_feature(enable = "neon")]
unsafe fn dot_i8_neon_impl(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (vdupq_n_s32(0), vdupq_n_s32(0));
    let mut i = 0;
    while i + 16 <= n {
        let (va, vb) = (vld1q_s8(pa.add(i)), vld1q_s8(pb.add(i)));
        s0 = vpadalq_s16(s0, vmull_s8(vget_low_s8(va), vget_low_s8(vb)));
        s1 = vpadalq_s16(s1, vmull_high_s8(va, vb));
        i += 16;
    }
    let mut total = vaddvq_s32(vaddq_s32(s0, s1));
    while i < n {
        total = total.wrapping_add(i32::from(*pa.add(i)) * i32::from(*pb.add(i)));
        i += 1;
    }
    total
}

/// `sdot` int8 dot: each instruction multiplies 16 i8 pairs and adds groups of four into the
/// four i32 lanes of the accumulator.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension; `a.len() == b.len()`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_i8_sdot_impl(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (vdupq_n_s32(0), vdupq_n_s32(0));
    let mut i = 0;
    while i + 32 <= n {
        let (a0, b0) = (vld1q_s8(pa.add(i)), vld1q_s8(pb.add(i)));
        let (a1, b1) = (vld1q_s8(pa.add(i + 16)), vld1q_s8(pb.add(i + 16)));
        asm!(
            "sdot {s0:v}.4s, {a0:v}.16b, {b0:v}.16b",
            "sdot {s1:v}.4s, {a1:v}.16b, {b1:v}.16b",
            s0 = inout(vreg) s0,
            s1 = inout(vreg) s1,
            a0 = in(vreg) a0,
            b0 = in(vreg) b0,
            a1 = in(vreg) a1,
            b1 = in(vreg) b1,
            options(pure, nomem, nostack, preserves_flags),
        );
        i += 32;
    }
    while i + 16 <= n {
        let (a0, b0) = (vld1q_s8(pa.add(i)), vld1q_s8(pb.add(i)));
        asm!(
            "sdot {s0:v}.4s, {a0:v}.16b, {b0:v}.16b",
            s0 = inout(vreg) s0,
            a0 = in(vreg) a0,
            b0 = in(vreg) b0,
            options(pure, nomem, nostack, preserves_flags),
        );
        i += 16;
    }
    let mut total = vaddvq_s32(vaddq_s32(s0, s1));
    while i < n {
        total = total.wrapping_add(i32::from(*pa.add(i)) * i32::from(*pb.add(i)));
        i += 1;
    }
    total
}

// Safe wrappers: NEON is mandatory on aarch64 Linux; the `sdot` wrapper is only handed out by
// `Kernels::for_isa(Isa::NeonDotprod)` after `is_aarch64_feature_detected!("dotprod")`.

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
    unsafe { dot_i8_neon_impl(a, b) }
}

pub(super) fn dot_i8_sdot(a: &[i8], b: &[i8]) -> i32 {
    // SAFETY: see above.
    unsafe { dot_i8_sdot_impl(a, b) }
}
