//! A table of weight names: each diffusers tensor name next to the canonical (original LDM `.ckpt`) name it
//! becomes, the shapes on both sides, and the value conversion between them (STYLE P5: the other key scheme is a
//! table-driven `KeyMap` with its own tests).
//!
//! The table is built from a config, so it knows every expected key and shape before any file is opened. That
//! makes loading strict (STYLE P6): [`KeyMap::to_canonical`] and [`KeyMap::to_diffusers`] collect all missing,
//! misshapen and unknown keys and fail once with a [`KeyReport`].
use std::collections::{HashMap, HashSet};

use candle_core::Tensor;

use super::error::{ImportError, KeyReport, MissingKey, Result, ShapeMismatch};

/// How a diffusers tensor becomes (part of) its canonical tensor. Every conversion is exact (no arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conversion {
    /// Same shape, same values.
    Identity,
    /// Same values in the same row-major order, another shape: a diffusers `Linear` weight `[C, C]` is the
    /// original 1x1 convolution `[C, C, 1, 1]` (VAE mid-block attention).
    Reshape,
    /// The diffusers tensor is block `index` of `count` equal blocks along dim 0 of the canonical tensor
    /// (OpenCLIP's fused `in_proj_weight` = rows of q, k, v).
    RowBlock { index: usize, count: usize },
    /// The canonical tensor's dim 0 is `heads` groups of `count` equal blocks; the diffusers tensor is block
    /// `index` of every group, concatenated, in the diffusers shape (same element count). This is the
    /// head-interleaved fused `qkv` 1-D conv `[3C, C, 1]` of the legacy LDM `AttentionBlock` (`QKVAttentionLegacy`:
    /// rows are head, then q/k/v, then row) against diffusers' `to_q`/`to_k`/`to_v` `[C, C]`; `heads = 1` is
    /// the plain q/k/v split (`QKVAttention`).
    HeadBlock {
        index: usize,
        count: usize,
        heads: usize,
    },
}

impl Conversion {
    /// `(index, count)` of a conversion that fills one block of a fused canonical tensor.
    pub fn block(&self) -> Option<(usize, usize)> {
        match *self {
            Conversion::RowBlock { index, count } | Conversion::HeadBlock { index, count, .. } => {
                Some((index, count))
            }
            _ => None,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub diffusers: String,
    pub diffusers_shape: Vec<usize>,
    pub canonical: String,
    pub canonical_shape: Vec<usize>,
    pub conversion: Conversion,
}

/// A bidirectional, injective map between diffusers and canonical weight names (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    entries: Vec<Entry>,
    by_diffusers: HashMap<String, usize>,
    /// canonical key -> entry indices, in block order for [`Conversion::RowBlock`]
    by_canonical: HashMap<String, Vec<usize>>,
    /// legacy diffusers name -> current diffusers name (accepted on input, never produced)
    aliases: HashMap<String, String>,
    /// diffusers keys that may be present and are dropped (buffers such as `position_ids`)
    ignored_diffusers: HashSet<String>,
    /// canonical keys that may be present and are dropped
    ignored_canonical: HashSet<String>,
}

impl KeyMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one row; fails if either name (or canonical block) is already claimed.
    pub fn push(&mut self, entry: Entry) -> Result<()> {
        if self.by_diffusers.contains_key(&entry.diffusers)
            || self.aliases.contains_key(&entry.diffusers)
        {
            return Err(ImportError::Duplicate {
                key: entry.diffusers,
            });
        }
        let parts = self
            .by_canonical
            .get(&entry.canonical)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let clash = parts.iter().any(|&i| {
            let other = &self.entries[i];
            let same_kind = std::mem::discriminant(&other.conversion)
                == std::mem::discriminant(&entry.conversion);
            match (other.conversion.block(), entry.conversion.block()) {
                (Some((a, n)), Some((b, m))) if same_kind => {
                    a == b || n != m || other.canonical_shape != entry.canonical_shape
                }
                _ => true,
            }
        });
        if clash {
            return Err(ImportError::Duplicate {
                key: entry.canonical,
            });
        }
        let i = self.entries.len();
        self.by_diffusers.insert(entry.diffusers.clone(), i);
        self.by_canonical
            .entry(entry.canonical.clone())
            .or_default()
            .push(i);
        let canonical = entry.canonical.clone();
        self.entries.push(entry);
        let entries = &self.entries;
        if let Some(parts) = self.by_canonical.get_mut(&canonical) {
            parts.sort_by_key(|&j| entries[j].conversion.block().map_or(0, |(index, _)| index));
        }
        Ok(())
    }

    /// Adds a tensor whose name changes and whose value does not.
    pub fn rename(&mut self, diffusers: &str, canonical: &str, shape: &[usize]) -> Result<()> {
        self.push(Entry {
            diffusers: diffusers.to_string(),
            diffusers_shape: shape.to_vec(),
            canonical: canonical.to_string(),
            canonical_shape: shape.to_vec(),
            conversion: Conversion::Identity,
        })
    }

    /// `weight` `[out, in]` and optionally `bias` `[out]` of a linear layer.
    pub fn linear(&mut self, d: &str, c: &str, out: usize, inp: usize, bias: bool) -> Result<()> {
        self.rename(&format!("{d}.weight"), &format!("{c}.weight"), &[out, inp])?;
        if bias {
            self.rename(&format!("{d}.bias"), &format!("{c}.bias"), &[out])?;
        }
        Ok(())
    }

    /// `weight` `[out, in, k, k]` and `bias` `[out]` of a 2-D convolution.
    pub fn conv(&mut self, d: &str, c: &str, out: usize, inp: usize, k: usize) -> Result<()> {
        self.rename(
            &format!("{d}.weight"),
            &format!("{c}.weight"),
            &[out, inp, k, k],
        )?;
        self.rename(&format!("{d}.bias"), &format!("{c}.bias"), &[out])
    }

    /// `weight` and `bias` `[channels]` of a GroupNorm or LayerNorm.
    pub fn norm(&mut self, d: &str, c: &str, channels: usize) -> Result<()> {
        self.rename(&format!("{d}.weight"), &format!("{c}.weight"), &[channels])?;
        self.rename(&format!("{d}.bias"), &format!("{c}.bias"), &[channels])
    }

    /// A diffusers `Linear` `[out, in]` (+ bias) stored in the original as a 1x1 conv `[out, in, 1, 1]`.
    pub fn linear_as_conv1x1(&mut self, d: &str, c: &str, out: usize, inp: usize) -> Result<()> {
        self.push(Entry {
            diffusers: format!("{d}.weight"),
            diffusers_shape: vec![out, inp],
            canonical: format!("{c}.weight"),
            canonical_shape: vec![out, inp, 1, 1],
            conversion: Conversion::Reshape,
        })?;
        self.rename(&format!("{d}.bias"), &format!("{c}.bias"), &[out])
    }

    /// Accepts `legacy` as another diffusers name of the already present key `current` (input only).
    pub fn alias(&mut self, legacy: &str, current: &str) -> Result<()> {
        if self.by_diffusers.contains_key(legacy) || self.aliases.contains_key(legacy) {
            return Err(ImportError::Duplicate {
                key: legacy.to_string(),
            });
        }
        if !self.by_diffusers.contains_key(current) {
            return Err(ImportError::Duplicate {
                key: format!("{legacy} (alias of unknown `{current}`)"),
            });
        }
        self.aliases.insert(legacy.to_string(), current.to_string());
        Ok(())
    }

    /// Lets a diffusers file contain `key` (a buffer, not a weight); it is dropped.
    pub fn ignore_diffusers(&mut self, key: &str) {
        self.ignored_diffusers.insert(key.to_string());
    }

    /// Lets a canonical file contain `key` (a buffer, not a weight); it is dropped.
    pub fn ignore_canonical(&mut self, key: &str) {
        self.ignored_canonical.insert(key.to_string());
    }

    /// Whether `key` is a diffusers buffer that [`KeyMap::to_canonical`] drops.
    pub fn ignores_diffusers(&self, key: &str) -> bool {
        self.ignored_diffusers.contains(key)
    }

    /// Whether `key` is a canonical tensor that [`KeyMap::to_diffusers`] drops.
    pub fn ignores_canonical(&self, key: &str) -> bool {
        self.ignored_canonical.contains(key)
    }

    /// The same map with `prefix` put before every canonical name (e.g. `model.diffusion_model.`).
    pub fn with_canonical_prefix(&self, prefix: &str) -> KeyMap {
        let mut out = self.clone();
        for e in &mut out.entries {
            e.canonical = format!("{prefix}{}", e.canonical);
        }
        out.by_canonical = self
            .by_canonical
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
            .collect();
        out.ignored_canonical = self
            .ignored_canonical
            .iter()
            .map(|k| format!("{prefix}{k}"))
            .collect();
        out
    }

    /// All rows, in module order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The row of a diffusers key (legacy aliases accepted).
    pub fn entry(&self, diffusers: &str) -> Option<&Entry> {
        let d = self
            .aliases
            .get(diffusers)
            .map_or(diffusers, String::as_str);
        self.by_diffusers.get(d).map(|&i| &self.entries[i])
    }

    /// The canonical name of a diffusers key (legacy aliases accepted).
    pub fn canonical_key(&self, diffusers: &str) -> Option<&str> {
        self.entry(diffusers).map(|e| e.canonical.as_str())
    }

    /// The diffusers name(s) of a canonical key: one, or the blocks of a fused tensor in order.
    pub fn diffusers_keys(&self, canonical: &str) -> Vec<&str> {
        self.by_canonical
            .get(canonical)
            .map(|v| {
                v.iter()
                    .map(|&i| self.entries[i].diffusers.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `(diffusers key, shape)` for every row, in module order.
    pub fn diffusers_manifest(&self) -> Vec<(String, Vec<usize>)> {
        self.entries
            .iter()
            .map(|e| (e.diffusers.clone(), e.diffusers_shape.clone()))
            .collect()
    }

    /// `(canonical key, shape)` for every canonical tensor (fused tensors once), in module order.
    pub fn canonical_manifest(&self) -> Vec<(String, Vec<usize>)> {
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .filter(|e| seen.insert(e.canonical.as_str()))
            .map(|e| (e.canonical.clone(), e.canonical_shape.clone()))
            .collect()
    }

    /// Renames and converts diffusers tensors to canonical ones, in module order. Fails with every missing,
    /// misshapen and unknown key at once; ignored buffers are dropped, legacy names accepted.
    pub fn to_canonical(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut report = KeyReport {
            naming: "diffusers",
            ..KeyReport::default()
        };
        let mut found: Vec<Option<Tensor>> = vec![None; self.entries.len()];
        for (key, t) in tensors {
            let key = self.aliases.get(&key).cloned().unwrap_or(key);
            match self.by_diffusers.get(&key) {
                Some(&i) if found[i].is_some() => {
                    report.unused.push(format!("{key} (given twice)"))
                }
                Some(&i) => {
                    let expected = &self.entries[i].diffusers_shape;
                    if t.dims() != expected.as_slice() {
                        report.shape.push(ShapeMismatch {
                            key,
                            expected: expected.clone(),
                            found: t.dims().to_vec(),
                        });
                    }
                    found[i] = Some(t);
                }
                None if self.ignored_diffusers.contains(&key) => {}
                None => report.unused.push(key),
            }
        }
        for (e, t) in self.entries.iter().zip(&found) {
            if t.is_none() {
                report.missing.push(MissingKey {
                    key: e.diffusers.clone(),
                    expected: e.diffusers_shape.clone(),
                });
            }
        }
        if !report.is_empty() {
            report.unused.sort();
            return Err(ImportError::Keys(Box::new(report)));
        }
        let mut out = Vec::with_capacity(self.by_canonical.len());
        let mut done = HashSet::new();
        for e in &self.entries {
            if !done.insert(e.canonical.as_str()) {
                continue;
            }
            let parts = &self.by_canonical[&e.canonical];
            let t = match e.conversion {
                Conversion::Identity => take(&found, parts[0]),
                Conversion::Reshape => {
                    take(&found, parts[0]).reshape(e.canonical_shape.as_slice())?
                }
                Conversion::RowBlock { count, .. } => {
                    if parts.len() != count {
                        return Err(ImportError::IncompleteFusion {
                            key: e.canonical.clone(),
                            have: parts.len(),
                            want: count,
                        });
                    }
                    let blocks: Vec<Tensor> = parts.iter().map(|&i| take(&found, i)).collect();
                    Tensor::cat(&blocks, 0)?
                }
                Conversion::HeadBlock { count, heads, .. } => {
                    if parts.len() != count {
                        return Err(ImportError::IncompleteFusion {
                            key: e.canonical.clone(),
                            have: parts.len(),
                            want: count,
                        });
                    }
                    let grouped = head_grouped_shape(&e.canonical_shape, count, heads);
                    let mut one = grouped.clone();
                    one[1] = 1;
                    let blocks = parts
                        .iter()
                        .map(|&i| take(&found, i).reshape(one.as_slice()))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&blocks, 1)?.reshape(e.canonical_shape.as_slice())?
                }
            };
            out.push((e.canonical.clone(), t));
        }
        Ok(out)
    }

    /// The inverse of [`KeyMap::to_canonical`]: canonical tensors to diffusers ones, in module order.
    pub fn to_diffusers(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut report = KeyReport {
            naming: "canonical",
            ..KeyReport::default()
        };
        let mut found: HashMap<String, Tensor> = HashMap::new();
        for (key, t) in tensors {
            match self.by_canonical.get(&key) {
                Some(_) if found.contains_key(&key) => {
                    report.unused.push(format!("{key} (given twice)"))
                }
                Some(parts) => {
                    let expected = &self.entries[parts[0]].canonical_shape;
                    if t.dims() != expected.as_slice() {
                        report.shape.push(ShapeMismatch {
                            key: key.clone(),
                            expected: expected.clone(),
                            found: t.dims().to_vec(),
                        });
                    }
                    found.insert(key, t);
                }
                None if self.ignored_canonical.contains(&key) => {}
                None => report.unused.push(key),
            }
        }
        for (key, shape) in self.canonical_manifest() {
            if !found.contains_key(&key) {
                report.missing.push(MissingKey {
                    key,
                    expected: shape,
                });
            }
        }
        if !report.is_empty() {
            report.unused.sort();
            return Err(ImportError::Keys(Box::new(report)));
        }
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let t = found
                .get(&e.canonical)
                .expect("invariant: every canonical key was checked present");
            let t = match e.conversion {
                Conversion::Identity => t.clone(),
                Conversion::Reshape => t.reshape(e.diffusers_shape.as_slice())?,
                Conversion::RowBlock { index, .. } => {
                    let rows = e.diffusers_shape.first().copied().unwrap_or(0);
                    t.narrow(0, index * rows, rows)?
                }
                Conversion::HeadBlock {
                    index,
                    count,
                    heads,
                } => {
                    let grouped = head_grouped_shape(&e.canonical_shape, count, heads);
                    t.reshape(grouped.as_slice())?
                        .narrow(1, index, 1)?
                        .reshape(e.diffusers_shape.as_slice())?
                }
            };
            out.push((e.diffusers.clone(), t));
        }
        Ok(out)
    }
}

/// `[heads, count, rows, rest]` for a canonical shape whose dim 0 is `heads · count · rows`.
fn head_grouped_shape(canonical: &[usize], count: usize, heads: usize) -> Vec<usize> {
    let dim0 = canonical.first().copied().unwrap_or(0);
    let rest: usize = canonical.iter().skip(1).product();
    vec![heads, count, dim0 / (heads * count).max(1), rest]
}

fn take(found: &[Option<Tensor>], i: usize) -> Tensor {
    found[i]
        .clone()
        .expect("invariant: every diffusers key was checked present")
}

/// Maps diffusers tensors to canonical ones (shorthand for [`KeyMap::to_canonical`]).
pub fn map_tensors(
    map: &KeyMap,
    tensors: impl IntoIterator<Item = (String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    map.to_canonical(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(shape: &[usize], start: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| start + i as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("test tensor")
    }

    fn small_map() -> KeyMap {
        let mut m = KeyMap::new();
        m.conv("conv_in", "input_blocks.0.0", 4, 2, 3)
            .expect("conv");
        m.linear_as_conv1x1("attn.to_q", "attn.q", 3, 3).expect("q");
        for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            m.push(Entry {
                diffusers: format!("sa.{name}.weight"),
                diffusers_shape: vec![2, 5],
                canonical: "attn.in_proj_weight".into(),
                canonical_shape: vec![6, 5],
                conversion: Conversion::RowBlock { index: i, count: 3 },
            })
            .expect("block");
        }
        m.alias("attn.query.weight", "attn.to_q.weight")
            .expect("alias");
        m.ignore_diffusers("position_ids");
        m
    }

    fn diffusers_tensors() -> Vec<(String, Tensor)> {
        vec![
            ("conv_in.weight".into(), t(&[4, 2, 3, 3], 0.)),
            ("conv_in.bias".into(), t(&[4], 100.)),
            ("attn.query.weight".into(), t(&[3, 3], 200.)),
            ("attn.to_q.bias".into(), t(&[3], 300.)),
            ("sa.v_proj.weight".into(), t(&[2, 5], 600.)),
            ("sa.q_proj.weight".into(), t(&[2, 5], 400.)),
            ("sa.k_proj.weight".into(), t(&[2, 5], 500.)),
            ("position_ids".into(), t(&[1, 7], 0.)),
        ]
    }

    #[test]
    fn push_rejects_a_second_claim_on_either_side() {
        let mut m = small_map();
        assert!(matches!(
            m.rename("conv_in.bias", "other", &[4]),
            Err(ImportError::Duplicate { .. })
        ));
        assert!(matches!(
            m.rename("other", "input_blocks.0.0.bias", &[4]),
            Err(ImportError::Duplicate { .. })
        ));
        let dup_block = Entry {
            diffusers: "sa.q2.weight".into(),
            diffusers_shape: vec![2, 5],
            canonical: "attn.in_proj_weight".into(),
            canonical_shape: vec![6, 5],
            conversion: Conversion::RowBlock { index: 1, count: 3 },
        };
        assert!(matches!(
            m.push(dup_block),
            Err(ImportError::Duplicate { .. })
        ));
    }

    #[test]
    fn to_canonical_renames_reshapes_fuses_and_round_trips() -> Result<()> {
        let m = small_map();
        let out = m.to_canonical(diffusers_tensors())?;
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "input_blocks.0.0.weight",
                "input_blocks.0.0.bias",
                "attn.q.weight",
                "attn.q.bias",
                "attn.in_proj_weight"
            ]
        );
        let q = &out[2].1;
        assert_eq!(q.dims(), &[3, 3, 1, 1]);
        assert_eq!(
            q.flatten_all()?.to_vec1::<f32>()?,
            t(&[9], 200.).to_vec1::<f32>()?
        );
        let fused = out[4].1.to_vec2::<f32>()?;
        assert_eq!(fused[0][0], 400.);
        assert_eq!(fused[2][0], 500.);
        assert_eq!(fused[5][4], 609.);

        let back = m.to_diffusers(out)?;
        let want: HashMap<String, Tensor> = diffusers_tensors()
            .into_iter()
            .filter(|(k, _)| k != "position_ids")
            .map(|(k, v)| {
                (
                    if k == "attn.query.weight" {
                        "attn.to_q.weight".to_string()
                    } else {
                        k
                    },
                    v,
                )
            })
            .collect();
        assert_eq!(back.len(), want.len());
        for (k, v) in back {
            let w = &want[&k];
            assert_eq!(v.dims(), w.dims(), "{k}");
            let d = (v.to_dtype(DType::F32)? - w)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{k}");
        }
        Ok(())
    }

    #[test]
    fn to_canonical_reports_all_problems_at_once() {
        let mut ts = diffusers_tensors();
        ts.retain(|(k, _)| k != "conv_in.bias" && k != "sa.k_proj.weight");
        ts[0].1 = t(&[4, 2, 1, 1], 0.);
        ts.push(("stray.weight".into(), t(&[1], 0.)));
        ts.push(("attn.to_q.weight".into(), t(&[3, 3], 0.))); // twice, via its alias too
        let err = small_map().to_canonical(ts).expect_err("must fail");
        let ImportError::Keys(r) = err else {
            panic!("wrong error {err}")
        };
        let missing: Vec<&str> = r.missing.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(missing, ["conv_in.bias", "sa.k_proj.weight"]);
        assert_eq!(r.missing[0].expected, vec![4]);
        assert_eq!(r.shape.len(), 1);
        assert_eq!(r.shape[0].key, "conv_in.weight");
        assert_eq!(r.shape[0].found, vec![4, 2, 1, 1]);
        assert_eq!(r.unused, ["attn.to_q.weight (given twice)", "stray.weight"]);
        assert!(r
            .to_string()
            .starts_with("2 missing, 1 with wrong shape, 2 unused"));
    }

    #[test]
    fn prefix_and_lookups_work_in_both_directions() {
        let m = small_map().with_canonical_prefix("model.diffusion_model.");
        assert_eq!(
            m.canonical_key("attn.query.weight"),
            Some("model.diffusion_model.attn.q.weight")
        );
        assert_eq!(
            m.diffusers_keys("model.diffusion_model.attn.in_proj_weight"),
            ["sa.q_proj.weight", "sa.k_proj.weight", "sa.v_proj.weight"]
        );
        assert_eq!(m.canonical_manifest().len(), 5);
        assert_eq!(m.diffusers_manifest().len(), 7);
    }
}
