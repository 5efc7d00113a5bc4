//! Losses of first-stage (autoencoder) training: the KL and VQ autoencoder losses with their PatchGAN
//! discriminator and adaptive weight ([`autoencoder`]), LPIPS on VGG16 ([`lpips`], [`vgg`]), and SSIM/PSNR
//! for the fallback loss term and for evaluation ([`ssim`]).
pub mod autoencoder;
pub mod discriminator;
pub mod lpips;
pub mod ssim;
pub mod vgg;

pub use autoencoder::{
    DiscriminatorStep, GeneratorStep, KlLossConfig, LastLayer, LpipsWithDiscriminator, Perceptual,
    PixelLoss, VqLossConfig, VqLpipsWithDiscriminator, SSIM_FALLBACK_NOTICE,
};
pub use discriminator::{DiscLoss, DiscriminatorConfig, NLayerDiscriminator};
pub use lpips::Lpips;
pub use ssim::{psnr_per_image, ssim, ssim_per_image};
pub use vgg::Vgg16Features;
