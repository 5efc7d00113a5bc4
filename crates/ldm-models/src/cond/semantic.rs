//! Semantic label maps for the semantic-synthesis models (landscapes, `semantic_synthesis256/512`).
//!
//! The original data pipeline (`taming/data/sflckr.py::SegmentationBase`, taming-transformers@3ba01b2) opens the
//! segmentation PNG with PIL, asserts mode `"L"` (8-bit greyscale whose values are class indices), and builds
//! `onehot = np.eye(n_labels)[segmentation]` with `n_labels = 182` (COCO-stuff); the LDM's `get_input` turns the
//! `[B, H, W, n]` array into `[B, n, H, W]` floats. A label ≥ `n_labels` makes that indexing fail.
//!
//! Here a label map is read from a PNG without any colour conversion: 8- or 16-bit greyscale (sample value =
//! class index, lower bit depths likewise) or an indexed/palette PNG (palette index = class index, the colours are
//! only for viewing). RGB or alpha images are refused: their colours are not class indices.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{CondError, Result};

/// A map of class indices, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemanticMap {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u16>,
    /// Where the map came from (a path or a name), for error messages.
    pub origin: String,
}

impl SemanticMap {
    /// Reads a greyscale or palette PNG of class indices.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| CondError::NotALabelMap {
            path: path.to_path_buf(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_png(&bytes, path)
    }

    /// Decodes PNG bytes; `path` names the source in errors.
    pub fn from_png(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| CondError::NotALabelMap {
            path: PathBuf::from(path),
            reason,
        };
        if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(bad("not a PNG image (a semantic map must be a lossless PNG of class indices: 8/16-bit greyscale or palette)".into()));
        }
        let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
        dec.set_transformations(png::Transformations::IDENTITY);
        let mut reader = dec
            .read_info()
            .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
        match info.color_type {
            png::ColorType::Grayscale | png::ColorType::Indexed => {}
            other => {
                return Err(bad(format!(
                    "a {other:?} PNG is not a label map; expected greyscale or palette (indexed) pixels holding class indices"
                )))
            }
        }
        let (width, height) = (info.width as usize, info.height as usize);
        let depth = info.bit_depth as usize; // 1, 2, 4, 8 or 16
        let mut labels = Vec::with_capacity(width * height);
        for row in buf.chunks(info.line_size).take(height) {
            for x in 0..width {
                let v = match depth {
                    16 => u16::from_be_bytes([row[2 * x], row[2 * x + 1]]),
                    8 => row[x] as u16,
                    d => {
                        let per_byte = 8 / d;
                        let byte = row[x / per_byte];
                        let shift = 8 - d * (x % per_byte + 1);
                        ((byte >> shift) & ((1u8 << d) - 1)) as u16
                    }
                };
                labels.push(v);
            }
        }
        Ok(Self {
            width,
            height,
            labels,
            origin: path.display().to_string(),
        })
    }

    /// From class indices, row-major (`labels.len()` must be `width · height`).
    pub fn from_labels(
        width: usize,
        height: usize,
        labels: Vec<u16>,
        origin: &str,
    ) -> Result<Self> {
        if labels.len() != width * height {
            return Err(CondError::NotALabelMap {
                path: PathBuf::from(origin),
                reason: format!(
                    "{} labels for a {width}x{height} map ({} expected)",
                    labels.len(),
                    width * height
                ),
            });
        }
        Ok(Self {
            width,
            height,
            labels,
            origin: origin.to_string(),
        })
    }

    /// The first label ≥ `n_classes`, as an error naming its position.
    pub fn check(&self, n_classes: usize) -> Result<()> {
        match self.labels.iter().position(|&l| l as usize >= n_classes) {
            None => Ok(()),
            Some(i) => Err(CondError::LabelOutOfRange {
                origin: self.origin.clone(),
                label: self.labels[i] as usize,
                x: i % self.width.max(1),
                y: i / self.width.max(1),
                n_classes,
            }),
        }
    }

    /// One-hot encodes a batch of equally sized maps: `[B, n_classes, H, W]` f32, as
    /// `rearrange(np.eye(n_classes)[maps], "b h w c -> b c h w")`.
    pub fn one_hot(maps: &[SemanticMap], n_classes: usize, device: &Device) -> Result<Tensor> {
        let Some(first) = maps.first() else {
            return Err(CondError::Config("one_hot of an empty batch".into()));
        };
        let size = (first.width, first.height);
        for m in maps {
            if (m.width, m.height) != size {
                return Err(CondError::MapSizeMismatch {
                    first: size,
                    other: (m.width, m.height),
                });
            }
            m.check(n_classes)?;
        }
        let plane = first.width * first.height;
        let mut data = vec![0f32; maps.len() * n_classes * plane];
        for (b, m) in maps.iter().enumerate() {
            let base = b * n_classes * plane;
            for (p, &l) in m.labels.iter().enumerate() {
                data[base + l as usize * plane + p] = 1.0;
            }
        }
        Ok(Tensor::from_vec(
            data,
            (maps.len(), n_classes, first.height, first.width),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(depth);
            if color == png::ColorType::Indexed {
                enc.set_palette(vec![0u8; 3 * 16]);
            }
            let mut wr = enc.write_header().expect("test png header");
            wr.write_image_data(data).expect("test png data");
        }
        out
    }

    #[test]
    fn reads_sample_values_of_every_greyscale_and_palette_depth() -> Result<()> {
        let p = Path::new("mem.png");
        // 16-bit greyscale, big-endian samples 1 and 300
        let png16 = encode(
            2,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &[0, 1, 1, 44],
        );
        assert_eq!(SemanticMap::from_png(&png16, p)?.labels, vec![1, 300]);
        // 4-bit palette, 3 pixels per row (rows padded to whole bytes): indices 15, 2, 7 / 0, 1, 9
        let png4 = encode(
            3,
            2,
            png::ColorType::Indexed,
            png::BitDepth::Four,
            &[0xF2, 0x70, 0x01, 0x90],
        );
        assert_eq!(
            SemanticMap::from_png(&png4, p)?.labels,
            vec![15, 2, 7, 0, 1, 9]
        );
        // 1-bit greyscale: 10 pixels, 1 0 1 1 0 0 0 1 | 1 0
        let png1 = encode(
            10,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            &[0b1011_0001, 0b1000_0000],
        );
        assert_eq!(
            SemanticMap::from_png(&png1, p)?.labels,
            vec![1, 0, 1, 1, 0, 0, 0, 1, 1, 0]
        );
        let m = SemanticMap::from_png(&png16, p)?;
        let e = m
            .check(182)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("label 300 at (x 1, y 0)"), "{e}");
        Ok(())
    }

    #[test]
    fn one_hot_places_each_label_in_its_channel() -> Result<()> {
        let m = SemanticMap::from_labels(2, 1, vec![2, 0], "m")?;
        let t = SemanticMap::one_hot(&[m], 3, &Device::Cpu)?; // [1, 3, 1, 2]
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
        );
        Ok(())
    }
}
