//! Box–Muller on blocks of 16 uniforms, exactly as PyTorch's CPU `normal_` kernel computes it for float32
//! tensors of 16 or more elements (aten/src/ATen/native/cpu/DistributionTemplates.h, `NormalFill16`).
//!
//! Box & Muller (1958): for u₁ ∈ (0, 1] and u₂ ∈ [0, 1),
//!   r = √(−2 ln u₁),  θ = 2π u₂,  n₁ = r cos θ,  n₂ = r sin θ
//! are independent N(0, 1). A block holds 16 uniforms d[0..16]; lane j ∈ 0..8 pairs u₁ = 1 − d[j] with
//! u₂ = d[j + 8] and writes n₁ to d[j], n₂ to d[j + 8].
//!
//! PyTorch has two versions, and they round differently (up to a few ulp), so both are reproduced:
//! * [`Avx2`](super::NormalKernel::Avx2): `NormalFill16<float>` with AVX2 intrinsics and the Cephes-derived
//!   `log256_ps` / `sincos256_ps` of avx_mathfun.h, in float32. The shipped binary is built by GCC with FMA
//!   contraction, so some mul/add pairs are fused; which ones was read off the disassembly of
//!   `libtorch_cpu.so` (torch 2.15.0) and is written out below with `mul_add`. The polynomial constants are
//!   the exact bit patterns found in that binary.
//! * [`Default`](super::NormalKernel::Default): the scalar loop with libm `logf`, `sinf`/`cosf` (GCC merges
//!   them into `sincosf`, which glibc computes identically), θ computed in double, and `fmaf` for r·cos θ·σ + μ.
//!
//! The AVX2 version is computed with AVX2+FMA intrinsics when the CPU has them, and otherwise by a portable
//! scalar emulation that performs the same float operations in the same order (`f32::mul_add` is the correctly
//! rounded fused multiply-add on every platform). The two agree bit for bit (tested on all 2²⁴ inputs).

// The lane functions spell out `a = a op b` to mirror the intrinsic sequence they reproduce.
#![allow(clippy::assign_op_pattern)]

/// float32 bit patterns of the constants used by avx_mathfun.h, as compiled into libtorch_cpu.so.
mod c {
    pub const ONE: f32 = 1.0;
    pub const HALF: f32 = 0.5;
    pub const MIN_NORM_POS: u32 = 0x0080_0000;
    pub const INV_MANT_MASK: u32 = !0x7f80_0000;
    pub const SIGN_MASK: u32 = 0x8000_0000;
    pub const INV_SIGN_MASK: u32 = !0x8000_0000;
    pub const SQRTHF: u32 = 0x3f35_04f3; // 0.707106781186547524
    pub const LOG_P: [u32; 9] = [
        0x3d90_21bb, // 7.0376836292E-2
        0xbdeb_d1b8, // -1.1514610310E-1
        0x3def_251a, // 1.1676998740E-1
        0xbdfe_5d4f, // -1.2420140846E-1
        0x3e11_e9bf, // 1.4249322787E-1
        0xbe2a_ae50, // -1.6668057665E-1
        0x3e4c_ceac, // 2.0000714765E-1
        0xbe7f_fffc, // -2.4999993993E-1
        0x3eaa_aaaa, // 3.3333331174E-1
    ];
    pub const LOG_Q1: u32 = 0xb95e_8083; // -2.12194440e-4
    pub const LOG_Q2: u32 = 0x3f31_8000; // 0.693359375
    pub const FOPI: u32 = 0x3fa2_f983; // 4/π = 1.27323954473516
    pub const MINUS_DP1: u32 = 0xbf49_0000; // -0.78515625
    pub const MINUS_DP2: u32 = 0xb97d_a000; // -2.4187564849853515625e-4
    pub const MINUS_DP3: u32 = 0xb322_2169; // -3.77489497744594108e-8
    pub const SINCOF_P: [u32; 3] = [0xb94c_a1f9, 0x3c08_839e, 0xbe2a_aaa3];
    pub const COSCOF_P: [u32; 3] = [0x37cc_f5ce, 0xbab6_061a, 0x3d2a_aaa5];
    /// `(float)(2.0f * c10::pi<double>)`
    pub const TWO_PI: u32 = 0x40c9_0fdb;
}

#[inline(always)]
fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// `_mm256_cvttps_epi32` on one lane: truncation, and 0x8000_0000 for NaN or out-of-range inputs.
#[inline(always)]
fn cvtt(x: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&x) {
        x as i32
    } else {
        i32::MIN // also for NaN
    }
}

/// `log256_ps` on one lane (natural log; NaN for x ≤ 0), with the FMA fusions of the shipped binary.
#[inline(always)]
pub(crate) fn log_lane(x: f32) -> f32 {
    let invalid = x <= 0.0;
    // maxps(x, m): x when x > m, else m (also for NaN x).
    let x = if x > f(c::MIN_NORM_POS) {
        x
    } else {
        f(c::MIN_NORM_POS)
    };
    let imm0 = ((x.to_bits() >> 23) as i32).wrapping_sub(0x7f);
    let mut x = f((x.to_bits() & c::INV_MANT_MASK) | c::HALF.to_bits());
    let mut e = imm0 as f32 + c::ONE;
    let mask = x < f(c::SQRTHF);
    let tmp = if mask { x } else { 0.0 };
    x = x + -c::ONE;
    e = e - if mask { c::ONE } else { 0.0 };
    x = x + tmp;
    let z = x * x;
    let mut y = f(c::LOG_P[0]);
    for &p in &c::LOG_P[1..] {
        y = y.mul_add(x, f(p));
    }
    let eq1 = e * f(c::LOG_Q1);
    y = y * x;
    y = y.mul_add(z, eq1);
    y = (-z).mul_add(c::HALF, y);
    let r = e.mul_add(f(c::LOG_Q2), x + y);
    if invalid {
        f(u32::MAX)
    } else {
        r
    }
}

/// `sincos256_ps` on one lane: (sin x, cos x), with the FMA fusions of the shipped binary.
#[inline(always)]
pub(crate) fn sincos_lane(x: f32) -> (f32, f32) {
    let sign_bit_sin = x.to_bits() & c::SIGN_MASK;
    let mut x = f(x.to_bits() & c::INV_SIGN_MASK);
    let j = (cvtt(x * f(c::FOPI)).wrapping_add(1)) & !1;
    let y = j as f32;
    let swap_sign_bit_sin = ((j & 4) as u32) << 29;
    let poly_mask = j & 2 == 0;
    x = y.mul_add(f(c::MINUS_DP1), x);
    x = y.mul_add(f(c::MINUS_DP2), x);
    x = y.mul_add(f(c::MINUS_DP3), x);
    let sign_bit_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;
    let sign_bit_sin = sign_bit_sin ^ swap_sign_bit_sin;
    let z = x * x;
    let half_z = z * c::HALF;
    // cos polynomial, valid on [0, π/4]
    let mut yc = f(c::COSCOF_P[0]).mul_add(z, f(c::COSCOF_P[1]));
    yc = yc.mul_add(z, f(c::COSCOF_P[2]));
    yc = z * yc;
    yc = z.mul_add(yc, -half_z);
    yc = yc + c::ONE;
    // sin polynomial, valid on [0, π/4]
    let mut ys = f(c::SINCOF_P[0]).mul_add(z, f(c::SINCOF_P[1]));
    ys = ys.mul_add(z, f(c::SINCOF_P[2]));
    ys = z * ys;
    ys = x.mul_add(ys, x);
    // select; the masked-out term is +0.0, as the and/andnot of the SIMD code give
    let ysin2 = if poly_mask { ys } else { 0.0 };
    let ysin1 = if poly_mask { 0.0 } else { yc };
    let yc = yc - ysin1;
    let ys = ys - ysin2;
    let s = ysin2 + ysin1;
    let cs = ys + yc;
    (
        f(s.to_bits() ^ sign_bit_sin),
        f(cs.to_bits() ^ sign_bit_cos),
    )
}

/// `NormalFill16<float>` of the AVX2 build, one lane at a time (portable; bit-identical to [`fill16_avx2`]).
pub(crate) fn fill16_avx2_emulated(d: &mut [f32; 16], mean: f32, std: f32) {
    for j in 0..8 {
        let u1 = c::ONE - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * log_lane(u1)).sqrt();
        let theta = f(c::TWO_PI) * u2;
        let (sin, cos) = sincos_lane(theta);
        d[j] = (radius * cos).mul_add(std, mean);
        d[j + 8] = (radius * sin).mul_add(std, mean);
    }
}

/// `NormalFill16<float>` of the default (scalar, non-AVX2) build.
pub(crate) fn fill16_default(d: &mut [f32; 16], mean: f32, std: f32) {
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
        d[j] = (radius * theta.cos()).mul_add(std, mean);
        d[j + 8] = (radius * theta.sin()).mul_add(std, mean);
    }
}

/// Whether this CPU can run [`fill16_avx2`] (decided once).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `NormalFill16<float>` of the AVX2 build: AVX2+FMA intrinsics where available, else the emulation.
pub(crate) fn fill16_avx2(d: &mut [f32; 16], mean: f32, std: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe { simd::fill16(d, mean, std) };
        return;
    }
    fill16_avx2_emulated(d, mean, std);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    //! The same computation as the lane functions above, eight lanes at a time.
    use super::{c, f};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn splat_bits(bits: u32) -> __m256 {
        _mm256_castsi256_ps(_mm256_set1_epi32(bits as i32))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn log(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(c::ONE);
        let invalid = _mm256_cmp_ps::<_CMP_LE_OS>(x, _mm256_setzero_ps());
        let x = _mm256_max_ps(x, splat_bits(c::MIN_NORM_POS));
        let imm0 = _mm256_srli_epi32::<23>(_mm256_castps_si256(x));
        let x = _mm256_and_ps(x, splat_bits(c::INV_MANT_MASK));
        let x = _mm256_or_ps(x, _mm256_set1_ps(c::HALF));
        let imm0 = _mm256_sub_epi32(imm0, _mm256_set1_epi32(0x7f));
        let e = _mm256_add_ps(_mm256_cvtepi32_ps(imm0), one);
        let mask = _mm256_cmp_ps::<_CMP_LT_OS>(x, splat_bits(c::SQRTHF));
        let tmp = _mm256_and_ps(x, mask);
        let x = _mm256_add_ps(x, _mm256_set1_ps(-c::ONE));
        let e = _mm256_sub_ps(e, _mm256_and_ps(one, mask));
        let x = _mm256_add_ps(x, tmp);
        let z = _mm256_mul_ps(x, x);
        let mut y = splat_bits(c::LOG_P[0]);
        for &p in &c::LOG_P[1..] {
            y = _mm256_fmadd_ps(y, x, splat_bits(p));
        }
        let eq1 = _mm256_mul_ps(e, splat_bits(c::LOG_Q1));
        let y = _mm256_mul_ps(y, x);
        let y = _mm256_fmadd_ps(y, z, eq1);
        let y = _mm256_fnmadd_ps(z, _mm256_set1_ps(c::HALF), y);
        let r = _mm256_fmadd_ps(e, splat_bits(c::LOG_Q2), _mm256_add_ps(x, y));
        _mm256_or_ps(r, invalid)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sincos(x: __m256) -> (__m256, __m256) {
        let sign_bit_sin = _mm256_and_ps(x, splat_bits(c::SIGN_MASK));
        let x = _mm256_and_ps(x, splat_bits(c::INV_SIGN_MASK));
        let j = _mm256_cvttps_epi32(_mm256_mul_ps(x, splat_bits(c::FOPI)));
        let j = _mm256_and_si256(
            _mm256_add_epi32(j, _mm256_set1_epi32(1)),
            _mm256_set1_epi32(!1),
        );
        let y = _mm256_cvtepi32_ps(j);
        let swap_sign_bit_sin = _mm256_slli_epi32::<29>(_mm256_and_si256(j, _mm256_set1_epi32(4)));
        let poly_mask = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
            _mm256_and_si256(j, _mm256_set1_epi32(2)),
            _mm256_setzero_si256(),
        ));
        let x = _mm256_fmadd_ps(y, splat_bits(c::MINUS_DP1), x);
        let x = _mm256_fmadd_ps(y, splat_bits(c::MINUS_DP2), x);
        let x = _mm256_fmadd_ps(y, splat_bits(c::MINUS_DP3), x);
        let jc = _mm256_sub_epi32(j, _mm256_set1_epi32(2));
        let sign_bit_cos = _mm256_castsi256_ps(_mm256_slli_epi32::<29>(_mm256_andnot_si256(
            jc,
            _mm256_set1_epi32(4),
        )));
        let sign_bit_sin = _mm256_xor_ps(sign_bit_sin, _mm256_castsi256_ps(swap_sign_bit_sin));
        let z = _mm256_mul_ps(x, x);
        let half_z = _mm256_mul_ps(z, _mm256_set1_ps(c::HALF));
        let yc = _mm256_fmadd_ps(splat_bits(c::COSCOF_P[0]), z, splat_bits(c::COSCOF_P[1]));
        let yc = _mm256_fmadd_ps(yc, z, splat_bits(c::COSCOF_P[2]));
        let yc = _mm256_mul_ps(z, yc);
        let yc = _mm256_fmsub_ps(z, yc, half_z);
        let yc = _mm256_add_ps(yc, _mm256_set1_ps(c::ONE));
        let ys = _mm256_fmadd_ps(splat_bits(c::SINCOF_P[0]), z, splat_bits(c::SINCOF_P[1]));
        let ys = _mm256_fmadd_ps(ys, z, splat_bits(c::SINCOF_P[2]));
        let ys = _mm256_mul_ps(z, ys);
        let ys = _mm256_fmadd_ps(x, ys, x);
        let ysin2 = _mm256_and_ps(poly_mask, ys);
        let ysin1 = _mm256_andnot_ps(poly_mask, yc);
        let yc = _mm256_sub_ps(yc, ysin1);
        let ys = _mm256_sub_ps(ys, ysin2);
        let s = _mm256_add_ps(ysin2, ysin1);
        let cs = _mm256_add_ps(ys, yc);
        (
            _mm256_xor_ps(s, sign_bit_sin),
            _mm256_xor_ps(cs, sign_bit_cos),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn fill16(d: &mut [f32; 16], mean: f32, std: f32) {
        let p = d.as_mut_ptr();
        let u1 = _mm256_sub_ps(_mm256_set1_ps(c::ONE), _mm256_loadu_ps(p));
        let u2 = _mm256_loadu_ps(p.add(8));
        let radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0), log(u1)));
        let theta = _mm256_mul_ps(_mm256_set1_ps(f(c::TWO_PI)), u2);
        let (sin, cos) = sincos(theta);
        let n1 = _mm256_mul_ps(radius, cos);
        let n2 = _mm256_mul_ps(radius, sin);
        let (mean, std) = (_mm256_set1_ps(mean), _mm256_set1_ps(std));
        _mm256_storeu_ps(p, _mm256_fmadd_ps(n1, std, mean));
        _mm256_storeu_ps(p.add(8), _mm256_fmadd_ps(n2, std, mean));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All 2²⁴ uniforms the kernel can see, k·2⁻²⁴, through both the AVX2 intrinsics and the emulation:
    /// u₁ = 1 − k·2⁻²⁴ into log, θ = 2π·k·2⁻²⁴ into sincos. The lanes are independent, so this covers every
    /// input of the whole block kernel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_intrinsics_equal_emulation_on_every_uniform() {
        use std::arch::x86_64::*;
        if !has_avx2_fma() {
            eprintln!("skipped: CPU lacks AVX2/FMA");
            return;
        }
        let mut mismatches = 0usize;
        let mut u = [0f32; 8];
        let (mut lg, mut sn, mut cs) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for block in 0..(1u32 << 21) {
            for (l, v) in u.iter_mut().enumerate() {
                *v = ((block * 8 + l as u32) as f32) * (1.0 / 16_777_216.0);
            }
            // SAFETY: AVX2 and FMA checked above; the arrays hold 8 floats each.
            unsafe {
                let uv = _mm256_loadu_ps(u.as_ptr());
                let u1 = _mm256_sub_ps(_mm256_set1_ps(1.0), uv);
                _mm256_storeu_ps(lg.as_mut_ptr(), simd::log(u1));
                let (s, c) = simd::sincos(_mm256_mul_ps(_mm256_set1_ps(f(c::TWO_PI)), uv));
                _mm256_storeu_ps(sn.as_mut_ptr(), s);
                _mm256_storeu_ps(cs.as_mut_ptr(), c);
            }
            for l in 0..8 {
                let (s, c) = sincos_lane(f(c::TWO_PI) * u[l]);
                if log_lane(1.0 - u[l]).to_bits() != lg[l].to_bits()
                    || s.to_bits() != sn[l].to_bits()
                    || c.to_bits() != cs[l].to_bits()
                {
                    mismatches += 1;
                }
            }
        }
        assert_eq!(mismatches, 0);
    }

    /// The whole block (sqrt, θ scaling, final r·cos θ·σ + μ) through both paths, including σ ≠ 1, μ ≠ 0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_block_equals_emulated_block() {
        if !has_avx2_fma() {
            eprintln!("skipped: CPU lacks AVX2/FMA");
            return;
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..100_000 {
            let mut a = [0f32; 16];
            for v in a.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = ((state >> 40) as u32 & 0x00ff_ffff) as f32 / 16_777_216.0;
            }
            let mut b = a;
            let (mean, std) = if i % 2 == 0 { (0.0, 1.0) } else { (0.25, 3.0) };
            // SAFETY: AVX2 and FMA checked above.
            unsafe { simd::fill16(&mut a, mean, std) };
            fill16_avx2_emulated(&mut b, mean, std);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "block {i}");
        }
    }

    #[test]
    fn cephes_functions_are_accurate() {
        // Not the point (bit-exactness with torch is), but guards against a wrong constant or sign.
        for k in 1..=1000 {
            let u = k as f32 / 1000.0;
            assert!(
                (log_lane(u) - u.ln()).abs() <= 2e-7 * (1.0 + u.ln().abs()),
                "log({u})"
            );
            let t = u * std::f32::consts::TAU;
            let (s, c) = sincos_lane(t);
            assert!(
                (s - t.sin()).abs() <= 3e-7 && (c - t.cos()).abs() <= 3e-7,
                "sincos({t})"
            );
        }
        assert!(log_lane(0.0).is_nan() && log_lane(-1.0).is_nan());
    }
}
