//! `TorchRng`: PyTorch's CPU generator (`CPUGeneratorImpl`) and its `randn` / `rand` for float32, bit for bit.
//!
//! What `torch.randn(shape)` does on the CPU (torch 2.x, aten/src/ATen/native/cpu/DistributionTemplates.h):
//!
//! * numel ≥ 16 (`normal_fill`): draw numel uniforms u = (random() & (2²⁴−1))·2⁻²⁴ into the output, then turn
//!   each full block of 16 into normals with Box–Muller (see [`box_muller`](super::box_muller)). If numel is
//!   not a multiple of 16, draw 16 *fresh* uniforms into the last 16 positions (overwriting normals already
//!   made there) and transform that block again. So numel + 16·[numel mod 16 ≠ 0] words are consumed.
//! * numel < 16: one `at::normal_distribution<double>` sample per element, in order. A sample takes two
//!   53-bit uniforms from `random64()`, u₁ then u₂, r = √(−2·log1p(−u₂)), θ = 2π·u₁, returns r·cos θ and
//!   caches r·sin θ in the generator; the next such sample returns the cache instead (and clears it). The
//!   cache lives across calls and is untouched by the numel ≥ 16 path; seeding clears it.
//!
//! Notation: `random()` = one MT19937 word, `random64()` = two words, first one high.

use super::box_muller::{fill16_avx2, fill16_default};
use super::mt19937::{InvalidRngState, Mt19937, Mt19937State};
use super::NoiseRng;

/// Which of PyTorch's CPU normal kernels to reproduce for float32 draws of 16 or more numbers.
///
/// The two round a few thousand values per million differently (by up to a few ulp), so the choice matters
/// for bit-exact reproduction. Smaller draws and `rand` do not depend on it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum NormalKernel {
    /// PyTorch's AVX2 kernel (float32 Cephes log/sincos). Torch uses it on every x86-64 CPU with AVX2 and FMA,
    /// AVX-512 CPUs included (the distribution kernels have no AVX-512 build; dispatch falls back to AVX2).
    /// Computed exactly on any CPU: with intrinsics where AVX2+FMA exist, by emulation elsewhere.
    #[default]
    Avx2,
    /// PyTorch's portable scalar kernel (libm `logf`/`sinf`/`cosf`): used by torch on x86 CPUs without AVX2,
    /// under `ATEN_CPU_CAPABILITY=default`, and on builds for other architectures (e.g. aarch64 Linux wheels,
    /// unverified here). Bit-exactness assumes the same libm as torch's (verified with glibc 2.36).
    Default,
}

/// A PyTorch CPU generator: `TorchRng::new(s).randn(n)` equals `torch.manual_seed(s); torch.randn(n)` (and
/// `torch.randn(n, generator=torch.Generator("cpu").manual_seed(s))`) bit for bit, and successive calls equal
/// successive torch calls on the same generator.
///
/// Seeds are `u64` like torch's; a negative Python seed `s` corresponds to `s as u64` (two's complement), as
/// `Generator.manual_seed` reads it. Only the low 32 bits reach the Mersenne Twister.
#[derive(Clone, Debug)]
pub struct TorchRng {
    engine: Mt19937,
    /// `CPUGeneratorImpl::next_double_normal_sample_`
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

/// Everything a [`TorchRng`] holds, for checkpoints: [`TorchRng::from_state`] of it draws exactly the numbers the
/// saved generator would have drawn next. The cached second Box–Muller value of the double-precision path is kept
/// as its bit pattern, so it survives any text serialization exactly. (The float32 path of 16 or more numbers
/// carries nothing between calls.)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchRngState {
    pub engine: Mt19937State,
    /// `f64::to_bits` of `CPUGeneratorImpl::next_double_normal_sample_`, if one is cached.
    pub next_double_normal_bits: Option<u64>,
    pub kernel: NormalKernel,
}

/// 2⁻²⁴ and 2⁻⁵³: the steps of torch's float and double uniforms.
const F32_STEP: f32 = 1.0 / 16_777_216.0;
const F64_STEP: f64 = 1.0 / 9_007_199_254_740_992.0;

impl TorchRng {
    /// A generator as after `torch.manual_seed(seed)`, reproducing the AVX2 kernel (see [`NormalKernel`]).
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::Avx2)
    }

    /// A generator as after `torch.manual_seed(seed)`, reproducing the given normal kernel.
    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            engine: Mt19937::new(seed),
            next_double_normal: None,
            kernel,
        }
    }

    /// `generator.manual_seed(seed)`: restarts the engine and drops the cached normal sample.
    pub fn manual_seed(&mut self, seed: u64) {
        self.engine = Mt19937::new(seed);
        self.next_double_normal = None;
    }

    /// The seed last set (`generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.engine.seed()
    }

    /// The complete generator state (see [`TorchRngState`]).
    pub fn state(&self) -> TorchRngState {
        TorchRngState {
            engine: self.engine.state(),
            next_double_normal_bits: self.next_double_normal.map(f64::to_bits),
            kernel: self.kernel,
        }
    }

    /// A generator that continues exactly where the one whose [`state`](Self::state) was taken stood.
    pub fn from_state(state: &TorchRngState) -> Result<Self, InvalidRngState> {
        Ok(Self {
            engine: Mt19937::from_state(&state.engine)?,
            next_double_normal: state.next_double_normal_bits.map(f64::from_bits),
            kernel: state.kernel,
        })
    }

    /// The normal kernel this generator reproduces.
    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// One raw 32-bit word (`CPUGeneratorImpl::random`).
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two raw words, the first in the high half (`CPUGeneratorImpl::random64`).
    pub fn random_u64(&mut self) -> u64 {
        self.engine.next_u64()
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: 24 random bits scaled to [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * F32_STEP
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: 53 random bits scaled to [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.engine.next_u64() & 0x001f_ffff_ffff_ffff) as f64 * F64_STEP
    }

    /// `at::normal_distribution<double>(0, 1)` with the generator's cached second value.
    fn normal_f64(&mut self) -> f64 {
        // `transformation::normal(v, mean, std)` = v·std + mean; with (0, 1) this maps −0 to +0 and nothing else.
        if let Some(cached) = self.next_double_normal.take() {
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }

    /// Fills `out` as `torch.randn(out.len())` would (float32, contiguous).
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        let fill: fn(&mut [f32; 16], f32, f32) = match self.kernel {
            NormalKernel::Avx2 => fill16_avx2,
            NormalKernel::Default => fill16_default,
        };
        let mut blocks = out.chunks_exact_mut(16);
        for block in &mut blocks {
            if let Ok(block) = <&mut [f32; 16]>::try_from(block) {
                fill(block, 0.0, 1.0);
            }
        }
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
        if n % 16 != 0 {
            // Recompute the last 16 values from fresh uniforms.
            let mut tail = [0f32; 16];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            fill(&mut tail, 0.0, 1.0);
            out[n - 16..].copy_from_slice(&tail);
        }
    }

    /// Fills `out` as `torch.rand(out.len())` would (float32 uniforms on [0, 1), 24 bits each).
    pub fn rand_into(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
    }

    /// `torch.rand(n)`.
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.rand_into(&mut out);
        out
    }
}

impl NoiseRng for TorchRng {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.randn_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_consumption_follows_torch() {
        // numel ≥ 16 uses numel words, plus 16 when numel % 16 ≠ 0; numel < 16 uses 4 words per pair.
        for (n, words) in [
            (16usize, 16u32),
            (32, 32),
            (17, 33),
            (100, 116),
            (1, 4),
            (2, 4),
            (3, 8),
            (15, 32),
        ] {
            let mut a = TorchRng::new(3);
            let mut b = TorchRng::new(3);
            let _ = a.randn(n);
            for _ in 0..words {
                b.random_u32();
            }
            assert_eq!(a.random_u32(), b.random_u32(), "n = {n}");
        }
    }

    #[test]
    fn cached_normal_survives_large_draws_and_dies_on_reseed() {
        let mut a = TorchRng::new(11);
        let first = a.randn(1)[0];
        let mut b = TorchRng::new(11);
        let pair = b.randn(2);
        assert_eq!(first.to_bits(), pair[0].to_bits());
        let _ = a.randn(64); // does not touch the cache
        let second = a.randn(1)[0];
        assert_eq!(second.to_bits(), pair[1].to_bits());
        let mut c = TorchRng::new(11);
        let _ = c.randn(1);
        c.manual_seed(11);
        assert_eq!(c.randn(1)[0].to_bits(), first.to_bits());
    }

    #[test]
    fn restored_state_draws_the_same_numbers() {
        // Odd-sized small draws leave a cached normal; large draws leave the engine mid-block.
        let mut a = TorchRng::new(1234);
        let _ = a.randn(3);
        let _ = a.randn(100);
        let _ = a.rand(5);
        assert!(a.state().next_double_normal_bits.is_some());
        let json = serde_json::to_string(&a.state()).expect("serializable");
        let ahead: Vec<u32> = [a.randn(1), a.randn(37), a.rand(7), a.randn(2000)]
            .concat()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let state: TorchRngState = serde_json::from_str(&json).expect("deserializable");
        let mut b = TorchRng::from_state(&state).expect("valid state");
        let again: Vec<u32> = [b.randn(1), b.randn(37), b.rand(7), b.randn(2000)]
            .concat()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(ahead, again);
        assert_eq!(b.initial_seed(), 1234);
        assert_eq!(b.kernel(), NormalKernel::Avx2);
    }

    #[test]
    fn kernels_agree_to_a_few_ulp_and_look_normal() {
        let a = TorchRng::with_kernel(5, NormalKernel::Avx2).randn(1 << 16);
        let b = TorchRng::with_kernel(5, NormalKernel::Default).randn(1 << 16);
        let mut max_diff = 0f32;
        for (x, y) in a.iter().zip(&b) {
            max_diff = max_diff.max((x - y).abs() / (1.0 + x.abs()));
        }
        assert!(max_diff < 1e-5, "{max_diff}");
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "mean {mean} var {var}"
        );
    }
}
