//! Input images of img2img and inpainting: reading them, turning them into the VAE's input, and padding them
//! for outpainting.
//!
//! As diffusers' `VaeImageProcessor.preprocess` does for a PIL image of the requested size: bytes / 255 in f32,
//! then 2x − 1, [1, 3, H, W]. Images are never resized: a side that is not a multiple of the model's size
//! multiple is refused by [`crate::request::ImageRequest::validate`] (crop or pad the image instead).
use std::path::Path;

use candle_core::{Device, Tensor};
use ldm_core::image::RgbImage;

use crate::error::{PipelineError, Result};
use crate::request::MAX_SIDE;

/// Reads a PNG, JPEG or WebP file (alpha dropped, greyscale expanded to RGB). A missing file or one that is
/// not an image is an invalid request naming `field`.
pub fn load_image(path: &Path, field: &'static str) -> Result<RgbImage> {
    RgbImage::load(path).map_err(|e| PipelineError::invalid(field, e.to_string()))
}

/// The VAE's input for `img`: [1, 3, H, W] in [−1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let x = img.to_tensor(device)?; // [3, H, W] in [0, 1]
    Ok(x.affine(2.0, -1.0)?.unsqueeze(0)?)
}

/// Outpainting margins in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad {
    pub left: usize,
    pub top: usize,
    pub right: usize,
    pub bottom: usize,
}

impl Pad {
    /// `L,T,R,B` (pixels), or one number for all four sides.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: String| PipelineError::invalid("pad", why);
        let parts: Vec<usize> = text
            .split(',')
            .map(|p| {
                p.trim().parse::<usize>().map_err(|_| {
                    bad(format!(
                        "`{text}` is not L,T,R,B (four whole numbers of pixels) or one number"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let pad = match parts[..] {
            [n] => Self {
                left: n,
                top: n,
                right: n,
                bottom: n,
            },
            [left, top, right, bottom] => Self {
                left,
                top,
                right,
                bottom,
            },
            _ => {
                return Err(bad(format!(
                    "`{text}` has {} numbers; expected L,T,R,B or one number",
                    parts.len()
                )))
            }
        };
        if [pad.left, pad.top, pad.right, pad.bottom]
            .iter()
            .any(|&p| p > MAX_SIDE)
        {
            return Err(bad(format!("`{text}`: a margin is larger than {MAX_SIDE}")));
        }
        Ok(pad)
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// The size of a `width` × `height` image once padded.
    pub fn padded(&self, width: usize, height: usize) -> (usize, usize) {
        (
            width + self.left + self.right,
            height + self.top + self.bottom,
        )
    }
}

/// `img` extended by `pad`, the new pixels copying the nearest edge pixel (numpy's `mode="edge"`): the fill
/// keeps the border colours, so the encoded latents of the padding continue the image instead of adding hard
/// black or grey edges (the padding is repainted anyway: its mask is white).
pub fn pad_edge(img: &RgbImage, pad: Pad) -> RgbImage {
    let (w, h) = pad.padded(img.width, img.height);
    if img.width == 0 || img.height == 0 {
        return img.clone();
    }
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let sy = y.saturating_sub(pad.top).min(img.height - 1);
        for x in 0..w {
            let sx = x.saturating_sub(pad.left).min(img.width - 1);
            let i = (sy * img.width + sx) * 3;
            data.extend_from_slice(&img.data[i..i + 3]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_parses_four_or_one_and_refuses_the_rest() {
        assert_eq!(
            Pad::parse("1,2,3,4").expect("pad"),
            Pad {
                left: 1,
                top: 2,
                right: 3,
                bottom: 4
            }
        );
        assert_eq!(Pad::parse("8").expect("pad").bottom, 8);
        for bad in ["", "1,2", "1,2,3,4,5", "-1,0,0,0", "a", "99999"] {
            assert!(Pad::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn edge_padding_replicates_the_border() {
        // 2x1 image: red, blue
        let img = RgbImage {
            width: 2,
            height: 1,
            data: vec![255, 0, 0, 0, 0, 255],
        };
        let p = pad_edge(
            &img,
            Pad {
                left: 1,
                top: 1,
                right: 2,
                bottom: 0,
            },
        );
        assert_eq!((p.width, p.height), (5, 2));
        let red = [255u8, 0, 0];
        let blue = [0u8, 0, 255];
        let row: Vec<u8> = [red, red, blue, blue, blue].concat();
        assert_eq!(p.data, [row.clone(), row].concat());
    }
}
