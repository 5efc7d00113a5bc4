//! Inpainting masks: white (≥ 50 % grey) = repaint, black = keep, as AUTOMATIC1111 and diffusers read them.
//!
//! A mask file of any colour type is read as diffusers' `VaeImageProcessor(do_binarize=True,
//! do_convert_grayscale=True)` reads a PIL image: converted to 8-bit grey by PIL's `convert("L")` (ITU-R 601-2
//! luma in integer arithmetic, L = (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16; alpha ignored), then
//! L/255 ≥ 0.5, i.e. L ≥ 128, is repainted.
use std::path::Path;

use candle_core::{Device, Tensor};
use ldm_core::image::RgbImage;

use crate::error::Result;
use crate::init_image::{load_image, Pad};

/// A binary mask, row-major: `true` where the image is repainted.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub repaint: Vec<bool>,
}

/// PIL's RGB → L conversion.
pub fn pil_luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8
}

impl Mask {
    /// Binarises an image as diffusers' mask processor does.
    pub fn from_image(img: &RgbImage) -> Self {
        let repaint = img
            .data
            .chunks_exact(3)
            .map(|p| pil_luma(p[0], p[1], p[2]) >= 128)
            .collect();
        Self {
            width: img.width,
            height: img.height,
            repaint,
        }
    }

    /// Reads a mask file (PNG, JPEG or WebP; greyscale, RGB or RGBA). Errors name the `mask` field.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self::from_image(&load_image(path, "mask")?))
    }

    /// A mask that keeps everything.
    pub fn keep_all(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            repaint: vec![false; width * height],
        }
    }

    /// The mask of an outpainting run: this mask inside, repaint on the margins.
    pub fn pad(&self, pad: Pad) -> Self {
        let (w, h) = pad.padded(self.width, self.height);
        let mut repaint = vec![true; w * h];
        for y in 0..self.height {
            let row = (y + pad.top) * w + pad.left;
            repaint[row..row + self.width]
                .copy_from_slice(&self.repaint[y * self.width..(y + 1) * self.width]);
        }
        Self {
            width: w,
            height: h,
            repaint,
        }
    }

    /// Number of pixels repainted.
    pub fn count(&self) -> usize {
        self.repaint.iter().filter(|&&r| r).count()
    }

    /// [1, 1, H, W] f32: 1 = repaint, 0 = keep.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self
            .repaint
            .iter()
            .map(|&r| if r { 1.0 } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(
            v,
            (1, 1, self.height, self.width),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_luma_matches_pil_and_grey_is_unchanged() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        for (c, l) in [
            ([255, 0, 0], 76),
            ([0, 255, 0], 150),
            ([0, 0, 255], 29),
            ([255, 255, 255], 255),
            ([12, 200, 99], 132),
        ] {
            assert_eq!(pil_luma(c[0], c[1], c[2]), l, "{c:?}");
        }
        for v in 0..=255u8 {
            assert_eq!(pil_luma(v, v, v), v);
        }
    }

    #[test]
    fn binarises_at_128_and_pads_with_repaint() {
        let img = RgbImage {
            width: 3,
            height: 1,
            data: vec![127, 127, 127, 128, 128, 128, 255, 0, 0],
        };
        let m = Mask::from_image(&img);
        assert_eq!(m.repaint, vec![false, true, false]); // pure red is L 76
        let p = m.pad(Pad {
            left: 1,
            top: 0,
            right: 0,
            bottom: 1,
        });
        assert_eq!((p.width, p.height), (4, 2));
        assert_eq!(
            p.repaint,
            vec![true, false, true, false, true, true, true, true]
        );
        assert_eq!(p.count(), 6);
    }
}
