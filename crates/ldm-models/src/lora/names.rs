//! Kohya LoRA module names ↔ ldm-rs canonical weight keys.
//!
//! kohya sd-scripts (`networks/lora.py`) names a module by its diffusers path with `.` → `_` after a prefix:
//! `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` for the UNet, `lora_te_text_model_
//! encoder_layers_0_self_attn_q_proj` for the text encoder (SD1 and SD2 alike: kohya loads SD2's OpenCLIP tower as
//! a transformers `CLIPTextModel`). AUTOMATIC1111 (`extensions-builtin/Lora/networks.py`) also accepts the
//! original LDM paths, `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`, and puts SD2's
//! `q_proj`/`k_proj`/`v_proj` into the rows of OpenCLIP's fused `attn.in_proj_weight` (q, k, v order).
//!
//! The diffusers names come from the import tables ([`crate::import::unet_key_map_for`],
//! [`crate::import::clip_key_map_for`], [`crate::import::open_clip_key_map_for`]): each table row whose
//! diffusers key is `<module>.weight` gives the kohya name of `<module>` and the canonical key (with the q/k/v
//! block for fused tensors). The LDM names are the canonical keys themselves. Only weights present in the
//! store become targets.
use std::collections::HashMap;

use ldm_core::weights::WeightStore;

use crate::import::{self, Conversion, Heads, KeyMap, UnetArch};
use crate::text::{TextConfig, TextLayout};
use crate::unet::{HeadSpec, UnetConfig};

/// Prefix of the UNet's kohya module names.
pub const KOHYA_UNET: &str = "lora_unet_";
/// Prefix of the (SD1/SD2) text encoder's kohya module names.
pub const KOHYA_TE: &str = "lora_te_";

/// The weight one LoRA module patches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTarget {
    /// Canonical key, e.g. `model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`.
    pub key: String,
    /// Shape of the canonical tensor (as models see it).
    pub shape: Vec<usize>,
    /// `Some((index, count))`: the module is row block `index` of `count` equal blocks of a fused tensor
    /// (SD2's `in_proj_weight`: q, k, v).
    pub block: Option<(usize, usize)>,
}

impl LoraTarget {
    /// The shape the module's `up @ down` must have: the weight's, or one row block of it.
    pub fn module_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        if let (Some((_, count)), Some(rows)) = (self.block, s.first_mut()) {
            *rows /= count.max(1);
        }
        s
    }
}

/// Which text encoder a model has, for its LoRA names.
#[derive(Debug, Clone, Copy)]
pub struct TextTarget<'a> {
    pub config: &'a TextConfig,
    pub layout: TextLayout,
}

/// Kohya module name → the weight it patches, for one model.
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    by_name: HashMap<String, LoraTarget>,
    /// Unfused canonical key → the kohya name written for it (the diffusers form where there is one).
    names: HashMap<String, String>,
}

impl LoraTargets {
    pub fn new() -> Self {
        Self::default()
    }

    /// The names of an SD-style model: the UNet's diffusers names (when `unet` has a diffusers equivalent),
    /// the UNet's LDM names (every 2-D+ weight under `model.diffusion_model.`), and the text encoder's names.
    pub fn for_model(
        store: &WeightStore,
        unet: Option<&UnetConfig>,
        text: Option<TextTarget<'_>>,
    ) -> Self {
        let mut t = Self::new();
        if let Some(map) = unet.and_then(unet_arch).and_then(|a| {
            import::unet_key_map_for(&a)
                .ok()
                .map(|m| m.with_canonical_prefix(import::UNET_PREFIX))
        }) {
            t.add_key_map(KOHYA_UNET, &map, store);
        }
        t.add_canonical(KOHYA_UNET, import::UNET_PREFIX, store);
        if let Some(text) = text {
            let arch = clip_arch(text.config);
            let map = match text.layout {
                TextLayout::Hf => import::clip_key_map_for(&arch)
                    .map(|m| m.with_canonical_prefix(import::CLIP_PREFIX)),
                TextLayout::OpenClip => import::open_clip_key_map_for(&arch)
                    .map(|m| m.with_canonical_prefix(import::OPEN_CLIP_PREFIX)),
            };
            if let Ok(map) = map {
                t.add_key_map(KOHYA_TE, &map, store);
            }
        }
        t
    }

    /// Adds `prefix + <diffusers module, . → _>` for every row of `map` (canonical keys already prefixed) whose
    /// diffusers key is a `.weight` of 2 or more dimensions and whose canonical key is in `store`.
    pub fn add_key_map(&mut self, prefix: &str, map: &KeyMap, store: &WeightStore) {
        for e in map.entries() {
            let Some(module) = e.diffusers.strip_suffix(".weight") else {
                continue;
            };
            let block = match e.conversion {
                Conversion::Identity | Conversion::Reshape => None,
                Conversion::RowBlock { index, count } => Some((index, count)),
                // head-interleaved legacy qkv (not in SD models): not a row block, not patchable per module
                Conversion::HeadBlock { .. } => continue,
            };
            let Some(shape) = store.shape(&e.canonical) else {
                continue;
            };
            if e.diffusers_shape.len() < 2 || shape.len() < 2 {
                continue;
            }
            let target = LoraTarget {
                key: e.canonical.clone(),
                shape: shape.to_vec(),
                block,
            };
            self.insert(format!("{prefix}{}", module.replace('.', "_")), target);
        }
    }

    /// Adds `prefix + <canonical key under canonical_prefix without .weight, . → _>` for every 2-D+ weight of
    /// `store` under `canonical_prefix` (AUTOMATIC1111's LDM-style names).
    pub fn add_canonical(&mut self, prefix: &str, canonical_prefix: &str, store: &WeightStore) {
        let keys: Vec<String> = store
            .keys_under(canonical_prefix)
            .map(str::to_string)
            .collect();
        for rel in keys {
            let Some(module) = rel.strip_suffix(".weight") else {
                continue;
            };
            let key = format!("{canonical_prefix}{rel}");
            let Some(shape) = store.shape(&key).filter(|s| s.len() >= 2) else {
                continue;
            };
            let target = LoraTarget {
                key,
                shape: shape.to_vec(),
                block: None,
            };
            self.insert(format!("{prefix}{}", module.replace('.', "_")), target);
        }
    }

    /// Registers `name` unless it is taken (the first registration wins: diffusers names before LDM names).
    fn insert(&mut self, name: String, target: LoraTarget) {
        if self.by_name.contains_key(&name) {
            return;
        }
        if target.block.is_none() {
            self.names
                .entry(target.key.clone())
                .or_insert_with(|| name.clone());
        }
        self.by_name.insert(name, target);
    }

    /// The weight a kohya module patches.
    pub fn get(&self, module: &str) -> Option<&LoraTarget> {
        self.by_name.get(module)
    }

    /// The kohya name written for an (unfused) canonical weight key.
    pub fn kohya_name(&self, canonical: &str) -> Option<&str> {
        self.names.get(canonical).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The diffusers-side description of a canonical UNet config, for its key table. `None` for UNets diffusers'
/// `UNet2DConditionModel` does not express (no cross-attention, scale-shift norm, resblock up/down, ...): those
/// take LDM names only.
fn unet_arch(c: &UnetConfig) -> Option<UnetArch> {
    let context_dim = c.context_dim?;
    if c.use_scale_shift_norm
        || c.resblock_updown
        || !c.conv_resample
        || c.use_new_attention_order
        || c.num_attention_blocks.is_some()
    {
        return None;
    }
    let levels = c.channel_mult.len();
    Some(UnetArch {
        in_channels: c.in_channels,
        out_channels: c.out_channels,
        model_channels: c.model_channels,
        channel_mult: c.channel_mult.clone(),
        res_blocks: vec![c.num_res_blocks; levels],
        attention_levels: c.attention_levels.clone(),
        heads: match c.heads {
            HeadSpec::Count(n) => Heads::Count(n),
            HeadSpec::Dim(d) => Heads::Dim(d),
        },
        transformer_depth: vec![c.transformer_depth; levels],
        context_dim,
        linear_projection: c.use_linear_in_transformer,
        norm_groups: c.num_groups,
        num_classes: c.num_classes,
        disable_self_attentions: c
            .disable_self_attentions
            .clone()
            .unwrap_or_else(|| vec![false; levels]),
        disable_middle_self_attn: c.disable_middle_self_attn,
        upcast_attention: false,
        ignored: Vec::new(),
    })
}

/// The text encoder's key-table description (names depend only on the sizes).
fn clip_arch(c: &TextConfig) -> import::ClipArch {
    import::ClipArch {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden,
        intermediate_size: c.intermediate,
        layers: c.layers,
        heads: c.heads,
        max_positions: c.max_positions,
        activation: match c.activation {
            crate::text::Activation::QuickGelu => import::Activation::QuickGelu,
            _ => import::Activation::Gelu,
        },
        layer_norm_eps: 1e-5,
        ignored: Vec::new(),
    }
}
