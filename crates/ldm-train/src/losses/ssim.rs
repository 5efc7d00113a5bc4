//! Structural similarity (Wang et al. 2004) and PSNR, for the L1 + SSIM reconstruction loss (used when no VGG
//! weights are given) and for the held-out evaluation of autoencoder training.
//!
//! SSIM here is scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=L, channel_axis=0)` (scikit-image 0.26):
//!
//! | symbol            | meaning                                                                 |
//! |-------------------|-------------------------------------------------------------------------|
//! | `w`               | separable Gaussian window, σ = 1.5, 11 taps (scipy truncate 3.5: radius 5) |
//! | `μx = w∗x`        | local means; `σx² = w∗x² − μx²`, `σxy = w∗(xy) − μx·μy` (population)     |
//! | `C1, C2`          | `(0.01·L)²`, `(0.03·L)²` with `L` the data range (2 for images in [−1, 1]) |
//! | `S`               | `(2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`           |
//!
//! skimage filters with reflected borders and then drops `(11 − 1)/2 = 5` pixels on every side before
//! averaging, so the pixels that count are exactly those whose window lies inside the image: we filter with a
//! "valid" convolution and average all of it. Channels are averaged (skimage's `channel_axis`), then images.
//! Everything is built from differentiable tensor ops, so [`ssim`] serves as a loss term too.
use candle_core::{DType, Device, Tensor};

use crate::{Result, TrainError};

/// Gaussian σ of the window.
pub const SSIM_SIGMA: f64 = 1.5;
/// Window side (scipy's `gaussian_filter` with truncate 3.5 and σ 1.5: radius `int(3.5·1.5 + 0.5) = 5`).
pub const SSIM_WIN: usize = 11;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// The normalised 1-D Gaussian taps of the window, `[SSIM_WIN]`.
pub fn gaussian_taps() -> Vec<f64> {
    let r = (SSIM_WIN / 2) as f64;
    let taps: Vec<f64> = (0..SSIM_WIN)
        .map(|i| {
            let d = i as f64 - r;
            (-0.5 * d * d / (SSIM_SIGMA * SSIM_SIGMA)).exp()
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// Separable "valid" Gaussian filtering of `[N, 1, H, W]` → `[N, 1, H − 10, W − 10]`.
fn filter(x: &Tensor, taps_v: &Tensor, taps_h: &Tensor) -> Result<Tensor> {
    let p = ldm_kernels::ConvParams::default();
    Ok(ldm_kernels::conv2d(
        &ldm_kernels::conv2d(x, taps_v, p)?,
        taps_h,
        p,
    )?)
}

/// The SSIM map `[B·C, 1, H − 10, W − 10]` of `x` and `y` `[B, C, H, W]` (f32, same shape).
pub fn ssim_map(x: &Tensor, y: &Tensor, data_range: f64) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if y.dims() != x.dims() {
        return Err(TrainError::invalid(
            "ssim",
            format!(
                "images of different shapes {:?} and {:?}",
                x.dims(),
                y.dims()
            ),
        ));
    }
    if h < SSIM_WIN || w < SSIM_WIN {
        return Err(TrainError::invalid(
            "ssim",
            format!("images of {h}x{w} pixels are smaller than the {SSIM_WIN}x{SSIM_WIN} window"),
        ));
    }
    if data_range <= 0.0 {
        return Err(TrainError::invalid(
            "ssim",
            format!("data range {data_range} must be positive"),
        ));
    }
    let dev = x.device();
    let taps: Vec<f32> = gaussian_taps().iter().map(|&t| t as f32).collect();
    let taps_v = Tensor::from_vec(taps.clone(), (1, 1, SSIM_WIN, 1), dev)?;
    let taps_h = Tensor::from_vec(taps, (1, 1, 1, SSIM_WIN), dev)?;
    let x = x.to_dtype(DType::F32)?.reshape((b * c, 1, h, w))?;
    let y = y.to_dtype(DType::F32)?.reshape((b * c, 1, h, w))?;
    let f = |t: &Tensor| filter(t, &taps_v, &taps_h);
    let (mx, my) = (f(&x)?, f(&y)?);
    let (mxx, myy, mxy) = (f(&x.sqr()?)?, f(&y.sqr()?)?, f(&(&x * &y)?)?);
    let vx = (mxx - mx.sqr()?)?;
    let vy = (myy - my.sqr()?)?;
    let vxy = (mxy - (&mx * &my)?)?;
    let c1 = (K1 * data_range).powi(2);
    let c2 = (K2 * data_range).powi(2);
    let a1 = ((&mx * &my)? * 2.0)? + c1;
    let a2 = (vxy * 2.0)? + c2;
    let b1 = ((mx.sqr()? + my.sqr()?)? + c1)?;
    let b2 = ((vx + vy)? + c2)?;
    Ok(((a1? * a2?)? / (b1 * b2)?)?)
}

/// Mean SSIM over pixels, channels and images: a scalar tensor, differentiable in `x` and `y`.
pub fn ssim(x: &Tensor, y: &Tensor, data_range: f64) -> Result<Tensor> {
    Ok(ssim_map(x, y, data_range)?.mean_all()?)
}

/// SSIM of each image of the batch (mean over its channels and pixels), for evaluation.
pub fn ssim_per_image(x: &Tensor, y: &Tensor, data_range: f64) -> Result<Vec<f64>> {
    let b = x.dim(0)?;
    let map = ssim_map(x, y, data_range)?; // [B·C, 1, h, w]
    let per = map.reshape((b, ()))?.to_dtype(DType::F64)?.mean(1)?;
    Ok(per.to_vec1::<f64>()?)
}

/// Peak signal-to-noise ratio `10·log10(L² / MSE)` of each image (skimage's `peak_signal_noise_ratio` with
/// `data_range = L`); an exact reconstruction gives `f64::INFINITY`.
pub fn psnr_per_image(x: &Tensor, y: &Tensor, data_range: f64) -> Result<Vec<f64>> {
    if y.dims() != x.dims() {
        return Err(TrainError::invalid(
            "psnr",
            format!(
                "images of different shapes {:?} and {:?}",
                x.dims(),
                y.dims()
            ),
        ));
    }
    let b = x.dim(0)?;
    let d = (x.to_dtype(DType::F64)? - y.to_dtype(DType::F64)?)?;
    let mse = d.sqr()?.reshape((b, ()))?.mean(1)?.to_vec1::<f64>()?;
    Ok(mse
        .into_iter()
        .map(|m| 10.0 * (data_range * data_range / m).log10())
        .collect())
}

/// A helper for callers holding images on another device: SSIM and PSNR of each image, computed on the CPU.
pub fn eval_metrics(x: &Tensor, y: &Tensor, data_range: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let (x, y) = (x.to_device(&Device::Cpu)?, y.to_device(&Device::Cpu)?);
    Ok((
        ssim_per_image(&x, &y, data_range)?,
        psnr_per_image(&x, &y, data_range)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_have_ssim_one_and_infinite_psnr() -> Result<()> {
        let x = Tensor::randn(0f32, 0.5, (2, 3, 16, 16), &Device::Cpu)?;
        let s = ssim_per_image(&x, &x, 2.0)?;
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6), "{s:?}");
        assert!(psnr_per_image(&x, &x, 2.0)?.iter().all(|p| p.is_infinite()));
        Ok(())
    }

    #[test]
    fn taps_are_normalised_and_symmetric() {
        let t = gaussian_taps();
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((t[0] - t[10]).abs() < 1e-15 && t[5] > t[4]);
    }

    #[test]
    fn small_images_are_refused() -> Result<()> {
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let err = ssim(&x, &x, 2.0).expect_err("8x8 < window");
        assert!(err.to_string().contains("smaller than"), "{err}");
        Ok(())
    }
}
