//! The fixtures of `vae.rs` with Winograd's F(4×4, 3×3) forced onto every 3×3 convolution, at the same
//! tolerance (|x − y| ≤ max(1e-4·|x + y|, 1e-5)): at their default size threshold the tiny models take it only in
//! their full-resolution layers. A test binary of its own, because the setting is global to the process.
use candle_core::Result;
use ldm_kernels::{set_conv_algorithm, ConvAlgorithm};

mod common;
mod kl_fixture;
use kl_fixture::check_vae_fixture;

#[test]
fn sd1_tiny_first_stage_with_winograd_everywhere_matches_diffusers() -> Result<()> {
    set_conv_algorithm(ConvAlgorithm::Winograd);
    check_vae_fixture("sd1-tiny", 1e-5)
}

#[test]
fn sd2v_tiny_first_stage_with_winograd_everywhere_matches_diffusers() -> Result<()> {
    set_conv_algorithm(ConvAlgorithm::Winograd);
    check_vae_fixture("sd2v-tiny", 1e-5)
}
