//! Portable kernels: eight independent accumulators (a fixed summation order the compiler can
//! keep in registers), also the reference the SIMD paths are tested against.

pub(super) fn dot_block(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

pub(super) fn sum_sq_block(a: &[f32]) -> f32 {
    dot_block(a, a)
}

pub(super) fn l1_block(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let ra = ca.remainder();
    for x in ca {
        for i in 0..8 {
            acc[i] += x[i].abs();
        }
    }
    acc.iter().sum::<f32>() + ra.iter().map(|x| x.abs()).sum::<f32>()
}

pub(super) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).fold(0i32, |s, (&x, &y)| s.wrapping_add(i32::from(x) * i32::from(y)))
}
