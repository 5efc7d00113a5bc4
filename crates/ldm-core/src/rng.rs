//! Random numbers for sampling. Randomness is always an argument (STYLE P7), never global.
//!
//! [`TorchRng`] reproduces PyTorch's CPU generator bit for bit (MT19937 + torch's normal kernels), so a seed
//! gives the same initial latents and sampler noise as `torch.manual_seed(seed)` / `torch.Generator("cpu")`
//! does in diffusers.

mod box_muller;
pub mod mt19937;
mod torch;

pub use mt19937::{InvalidRngState, Mt19937, Mt19937State};
pub use torch::{NormalKernel, TorchRng, TorchRngState};

/// A source of standard-normal noise, drawn in the order a sampler asks for it.
pub trait NoiseRng {
    /// `n` independent N(0, 1) samples, as one `torch.randn(n)` call would give them.
    fn randn(&mut self, n: usize) -> Vec<f32>;
}
