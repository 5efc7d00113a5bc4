//! Images ↔ tensors, and PNG files that carry their generation parameters.
//!
//! Pixel values follow diffusers' `postprocess`/`numpy_to_pil`: a float image in [0, 1] becomes bytes by
//! `round(x · 255)` after clamping. The `parameters` text chunk is written as AUTOMATIC1111 writes it (through
//! PIL): a `tEXt` chunk when the text is Latin-1, an uncompressed `iTXt` chunk otherwise.
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// From a float tensor `[3, H, W]` with values in [0, 1] (clamped).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (c, height, width) = t.dims3()?;
        if c != 3 {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "expected 3 channels, got {c}"
            ))));
        }
        let hwc = t
            .to_dtype(DType::F32)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let data = hwc
            .iter()
            .map(|&x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// As a float tensor `[3, H, W]` in [0, 1] on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let f: Vec<f32> = self.data.iter().map(|&b| b as f32 / 255.0).collect();
        Ok(Tensor::from_vec(f, (self.height, self.width, 3), device)?
            .permute((2, 0, 1))?
            .contiguous()?)
    }

    /// Reads a PNG, JPEG or WebP file (alpha is dropped).
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Image {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| err(format!("not a readable image: {e}")))?;
        let rgb = img.to_rgb8();
        Ok(Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            data: rgb.into_raw(),
        })
    }

    /// Encodes as PNG with optional text chunks `(keyword, text)`.
    pub fn to_png(&self, texts: &[(&str, &str)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (key, text) in texts {
                if text.chars().all(|c| (c as u32) < 256) {
                    enc.add_text_chunk(key.to_string(), text.to_string())
                        .map_err(png_err)?;
                } else {
                    enc.add_itxt_chunk(key.to_string(), text.to_string())
                        .map_err(png_err)?;
                }
            }
            let mut w = enc.write_header().map_err(png_err)?;
            w.write_image_data(&self.data).map_err(png_err)?;
            w.finish().map_err(png_err)?;
        }
        Ok(out)
    }

    /// Writes a PNG atomically: a temporary file beside `path`, then a rename, so a failure never leaves a
    /// half-written image or clobbers an existing one.
    pub fn save_png(&self, path: &Path, texts: &[(&str, &str)]) -> Result<()> {
        let bytes = self.to_png(texts)?;
        write_atomic(path, &bytes)
    }
}

/// Reads the text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file.
pub fn png_texts(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = dec.read_info().map_err(png_err)?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        out.push((t.keyword.clone(), t.get_text().map_err(png_err)?));
    }
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().map_err(png_err)?));
    }
    Ok(out)
}

fn png_err(e: impl std::fmt::Display) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("png: {e}")))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantises_like_diffusers_and_round_trips_png_text() -> Result<()> {
        let t = Tensor::from_vec(
            vec![0.0f32, 0.5, 1.2, -0.1, 0.998, 0.002],
            (3, 1, 2),
            &Device::Cpu,
        )?;
        let img = RgbImage::from_tensor(&t)?;
        // pixel 0 = (0.0, 1.2→1, 0.998), pixel 1 = (0.5, -0.1→0, 0.002); round(x·255)
        assert_eq!(img.data, vec![0, 255, 254, 128, 0, 1]);
        let latin = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a";
        let png = img.to_png(&[("parameters", latin)])?;
        assert_eq!(
            png_texts(&png)?,
            vec![("parameters".to_string(), latin.to_string())]
        );
        let unicode = "一只猫 🐱";
        let png = img.to_png(&[("parameters", unicode)])?;
        assert_eq!(
            png_texts(&png)?,
            vec![("parameters".to_string(), unicode.to_string())]
        );
        Ok(())
    }

    #[test]
    fn failed_atomic_write_keeps_the_old_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("out.png");
        write_atomic(&path, b"old")?;
        // A target inside a missing folder fails and leaves nothing behind.
        assert!(write_atomic(&dir.path().join("missing/out.png"), b"new").is_err());
        assert_eq!(
            std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
            b"old"
        );
        Ok(())
    }
}
