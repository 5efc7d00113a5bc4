//! Layout-to-image conditioning (Rombach et al. 2022, §4.3.1 and App. D.3): the boxes of a scene become a
//! sequence of discrete tokens, which the `BERTEmbedder` transformer (`use_tokenizer: false`, `vocab_size 8192`,
//! `max_seq_len 92` in `models/ldm/layout2img-openimages256/config.yaml`) encodes for cross-attention.
//!
//! The tokens are exactly those of taming-transformers' `ObjectsBoundingBoxConditionalBuilder`
//! (`taming/data/conditional_builder/objects_bbox.py`, `objects_center_points.py`, `utils.py`, @3ba01b2):
//!
//! | original                                 | here                                                    |
//! |------------------------------------------|---------------------------------------------------------|
//! | `no_sections = int(sqrt(no_tokens))`     | the coordinate grid is `no_sections × no_sections`      |
//! | `tokenize_coordinates(x, y)`             | `round(y·(s−1))·s + round(x·(s−1))`, round half to even |
//! | `none = no_tokens − 1`                   | padding token of absent objects                         |
//! | `object_representation`                  | `class + no_object_classes · modifier`, modifier bits 1 group-of, 2 occluded, 4 depiction, 8 inside |
//! | object triple                            | `(representation, token(x0, y0), token(x1, y1))`       |
//! | `pad_list(…, no_max_objects)`            | `(none, none, none)` up to `no_max_objects` triples     |
//! | `encode_crop` → `_crop_encoder`          | two more tokens, the crop box; at inference the full image `(token(0,0), token(1,1))` |
//!
//! Differences, deliberate: the training-time `random.shuffle` of the objects is not done (the given order is
//! kept); more than `no_max_objects` objects are an error instead of a warning and truncation; boxes outside
//! [0, 1] or with `x1 < x0` / `y1 < y0` are errors instead of being clamped. Kept as the original: a box of zero
//! width or height has no overlap with the crop and is dropped (`filter_annotations`), and modifier flags that
//! the config does not use are ignored.
//!
//! For classifier-free guidance the unconditional sequence is [`LayoutBuilder::unconditional`]: no objects (all
//! `none`) but the same crop tokens.
//!
//! ## JSON input ([`LayoutObject::parse_json`])
//! ```json
//! [
//!   {"class": 12, "box": [0.1, 0.2, 0.5, 0.9]},
//!   {"class": "Car", "box": [0.5, 0.5, 1.0, 1.0], "group_of": true}
//! ]
//! ```
//! `box` is `[x0, y0, x1, y1]` relative to the image (0 = left/top, 1 = right/bottom). `class` is the dataset's
//! class number (`category_no`, 0-based) or a name looked up in the class-name list given to the builder.
//! Optional booleans `group_of`, `occluded`, `depiction`, `inside` (default false) set the modifier bits.
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{CondError, Result};

/// The builder's parameters (`AnnotatedObjectsDataset` arguments in taming's data configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutConfig {
    pub no_object_classes: usize,
    pub no_max_objects: usize,
    pub no_tokens: usize,
    pub encode_crop: bool,
    pub use_group_parameter: bool,
    pub use_additional_parameters: bool,
}

impl LayoutConfig {
    /// The Open Images layout model (`layout2img-openimages256`: vocabulary 8192, sequence 92 = 30·3 + 2) with the
    /// builder flags of taming's `open_images_scene_images_transformer.yaml`. The number of classes is that of
    /// the dataset's category list, which the released config does not state.
    pub fn openimages_layout2img(no_object_classes: usize) -> Self {
        Self {
            no_object_classes,
            no_max_objects: 30,
            no_tokens: 8192,
            encode_crop: true,
            use_group_parameter: true,
            use_additional_parameters: true,
        }
    }

    /// Tokens per sequence: `3 · no_max_objects (+ 2 with encode_crop)` (the original's `embedding_dim`).
    pub fn sequence_length(&self) -> usize {
        3 * self.no_max_objects + if self.encode_crop { 2 } else { 0 }
    }

    /// The side of the coordinate grid, `int(sqrt(no_tokens))`.
    pub fn no_sections(&self) -> usize {
        let mut s = (self.no_tokens as f64).sqrt() as usize;
        // guard the float sqrt against off-by-one at perfect squares
        while (s + 1) * (s + 1) <= self.no_tokens {
            s += 1;
        }
        while s * s > self.no_tokens {
            s -= 1;
        }
        s
    }

    /// The padding token, `no_tokens − 1`.
    pub fn none(&self) -> u32 {
        self.no_tokens.saturating_sub(1) as u32
    }
}

/// How a layout object names its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ObjectClass {
    /// The dataset's 0-based class number.
    Id(usize),
    /// A name from the builder's class-name list.
    Name(String),
}

/// One box of a layout, `box = [x0, y0, x1, y1]` in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutObject {
    pub class: ObjectClass,
    #[serde(rename = "box")]
    pub bbox: [f64; 4],
    #[serde(default)]
    pub group_of: bool,
    #[serde(default)]
    pub occluded: bool,
    #[serde(default)]
    pub depiction: bool,
    #[serde(default)]
    pub inside: bool,
}

impl LayoutObject {
    pub fn new(class: ObjectClass, bbox: [f64; 4]) -> Self {
        Self {
            class,
            bbox,
            group_of: false,
            occluded: false,
            depiction: false,
            inside: false,
        }
    }

    /// Parses the JSON layout format (a list of objects, see the module docs).
    pub fn parse_json(text: &str) -> Result<Vec<LayoutObject>> {
        serde_json::from_str(text).map_err(|e| CondError::LayoutJson(e.to_string()))
    }
}

/// Turns layouts into token ids.
#[derive(Debug, Clone)]
pub struct LayoutBuilder {
    config: LayoutConfig,
    class_names: Option<Vec<String>>,
}

impl LayoutBuilder {
    /// `class_names`, when given, lists the `no_object_classes` names in class-number order.
    pub fn new(config: LayoutConfig, class_names: Option<Vec<String>>) -> Result<Self> {
        let c = &config;
        if c.no_sections() < 2 {
            return Err(CondError::Config(format!(
                "layout no_tokens {} gives a coordinate grid of side {} (at least 2 needed)",
                c.no_tokens,
                c.no_sections()
            )));
        }
        if c.no_object_classes == 0 {
            return Err(CondError::Config("layout: no_object_classes is 0".into()));
        }
        if let Some(names) = &class_names {
            if names.len() != c.no_object_classes {
                return Err(CondError::Config(format!(
                    "layout: {} class names for {} classes",
                    names.len(),
                    c.no_object_classes
                )));
            }
        }
        Ok(Self {
            config,
            class_names,
        })
    }

    pub fn config(&self) -> &LayoutConfig {
        &self.config
    }

    /// `tokenize_coordinates`: Python's `int(round(v · (s − 1)))` rounds half to even.
    pub fn tokenize_coordinates(&self, x: f64, y: f64) -> u32 {
        let s = self.config.no_sections();
        let q = |v: f64| (v * (s - 1) as f64).round_ties_even() as usize;
        (q(y) * s + q(x)) as u32
    }

    fn class_number(&self, index: usize, class: &ObjectClass) -> Result<usize> {
        let n = self.config.no_object_classes;
        match class {
            ObjectClass::Id(id) if *id < n => Ok(*id),
            ObjectClass::Id(id) => Err(CondError::BadObject {
                index,
                reason: format!("class {id} is out of range: the model has {n} classes (0..={})", n - 1),
            }),
            ObjectClass::Name(name) => match &self.class_names {
                None => Err(CondError::BadObject {
                    index,
                    reason: format!("class name `{name}` given but the model has no class-name list; use the class number"),
                }),
                Some(names) => names
                    .iter()
                    .position(|c| c == name)
                    .or_else(|| names.iter().position(|c| c.eq_ignore_ascii_case(name)))
                    .ok_or_else(|| CondError::BadObject {
                        index,
                        reason: format!("unknown class `{name}`"),
                    }),
            },
        }
    }

    fn representation(&self, class: usize, o: &LayoutObject) -> usize {
        let c = &self.config;
        let mut modifier = 0;
        if c.use_group_parameter && o.group_of {
            modifier |= 1;
        }
        if c.use_additional_parameters {
            if o.occluded {
                modifier |= 2;
            }
            if o.depiction {
                modifier |= 4;
            }
            if o.inside {
                modifier |= 8;
            }
        }
        class + c.no_object_classes * modifier
    }

    /// One layout → `sequence_length()` token ids.
    pub fn build(&self, objects: &[LayoutObject]) -> Result<Vec<u32>> {
        let c = &self.config;
        if objects.len() > c.no_max_objects {
            return Err(CondError::TooManyObjects {
                count: objects.len(),
                max: c.no_max_objects,
            });
        }
        let none = c.none();
        let mut tokens = Vec::with_capacity(c.sequence_length());
        for (index, o) in objects.iter().enumerate() {
            let class = self.class_number(index, &o.class)?;
            let [x0, y0, x1, y1] = o.bbox;
            if !o
                .bbox
                .iter()
                .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
            {
                return Err(CondError::BadObject {
                    index,
                    reason: format!("box {:?} is outside [0, 1] (boxes are [x0, y0, x1, y1] relative to the image)", o.bbox),
                });
            }
            if x1 < x0 || y1 < y0 {
                return Err(CondError::BadObject {
                    index,
                    reason: format!(
                        "box {:?} has x1 < x0 or y1 < y0 (boxes are [x0, y0, x1, y1])",
                        o.bbox
                    ),
                });
            }
            // The original stores (x0, y0, w, h); keep its float operations.
            let (w, h) = (x1 - x0, y1 - y0);
            // filter_annotations against the full crop (0, 0, 1, 1)
            let x_overlap = ((x0 + w).min(1.0) - x0.max(0.0)).max(0.0);
            let y_overlap = ((y0 + h).min(1.0) - y0.max(0.0)).max(0.0);
            if x_overlap * y_overlap <= 0.0 {
                continue;
            }
            // rescale_annotations with the full crop
            let rx0 = x0.clamp(0.0, 1.0);
            let ry0 = y0.clamp(0.0, 1.0);
            let rw = w.min(1.0 - rx0);
            let rh = h.min(1.0 - ry0);
            let repr = self.representation(class, o);
            if repr >= c.no_tokens {
                return Err(CondError::BadObject {
                    index,
                    reason: format!(
                        "class {class} with its flags gives token {repr}, outside the vocabulary of {} tokens",
                        c.no_tokens
                    ),
                });
            }
            tokens.push(repr as u32);
            tokens.push(self.tokenize_coordinates(rx0, ry0));
            tokens.push(self.tokenize_coordinates(rx0 + rw, ry0 + rh));
        }
        tokens.resize(3 * c.no_max_objects, none);
        if c.encode_crop {
            tokens.push(self.tokenize_coordinates(0.0, 0.0));
            tokens.push(self.tokenize_coordinates(1.0, 1.0));
        }
        Ok(tokens)
    }

    /// The sequence of an empty layout (all objects `none`, the crop tokens kept): the unconditional input.
    pub fn unconditional(&self) -> Vec<u32> {
        let c = &self.config;
        let mut tokens = vec![c.none(); 3 * c.no_max_objects];
        if c.encode_crop {
            tokens.push(self.tokenize_coordinates(0.0, 0.0));
            tokens.push(self.tokenize_coordinates(1.0, 1.0));
        }
        tokens
    }

    /// Builds a batch of layouts into a `[B, sequence_length]` u32 tensor.
    pub fn build_batch(&self, layouts: &[Vec<LayoutObject>], device: &Device) -> Result<Tensor> {
        let len = self.config.sequence_length();
        let mut ids = Vec::with_capacity(layouts.len() * len);
        for l in layouts {
            ids.extend(self.build(l)?);
        }
        Ok(Tensor::from_vec(ids, (layouts.len(), len), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openimages_grid_and_sequence() -> Result<()> {
        let b = LayoutBuilder::new(LayoutConfig::openimages_layout2img(300), None)?;
        let c = b.config();
        assert_eq!(
            (c.no_sections(), c.none(), c.sequence_length()),
            (90, 8191, 92)
        );
        assert_eq!(b.tokenize_coordinates(0.0, 0.0), 0);
        assert_eq!(b.tokenize_coordinates(1.0, 1.0), 89 * 90 + 89);
        assert_eq!(b.tokenize_coordinates(1.0, 0.0), 89);
        // 0.5 · 89 = 44.5 rounds to the even 44, as Python's round()
        assert_eq!(b.tokenize_coordinates(0.5, 0.0), 44);
        let uc = b.unconditional();
        assert_eq!(&uc[88..], &[8191, 8191, 0, 8099]);
        Ok(())
    }

    #[test]
    fn perfect_square_vocabularies_use_the_full_grid() {
        let cfg = LayoutConfig {
            no_object_classes: 2,
            no_max_objects: 1,
            no_tokens: 16,
            encode_crop: false,
            use_group_parameter: false,
            use_additional_parameters: false,
        };
        assert_eq!(cfg.no_sections(), 4);
        assert_eq!(
            LayoutConfig {
                no_tokens: 15,
                ..cfg
            }
            .no_sections(),
            3
        );
    }
}
