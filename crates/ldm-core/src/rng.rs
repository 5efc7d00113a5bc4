//! Random numbers for sampling. Randomness is always an argument (STYLE P7), never global.

/// A source of standard-normal noise, drawn in the order a sampler asks for it.
pub trait NoiseRng {
    /// `n` independent N(0, 1) samples, as one `torch.randn(n)` call would give them.
    fn randn(&mut self, n: usize) -> Vec<f32>;
}
