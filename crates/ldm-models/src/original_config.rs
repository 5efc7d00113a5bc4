//! The original LDM / Stable Diffusion inference YAML (`v1-inference.yaml`, `v2-inference-v.yaml`, the CompVis
//! latent-diffusion configs), read as data. Nothing here instantiates a class from a `target:` string: the targets
//! are matched against the few that ldm-rs knows and anything else is an error naming it (STYLE P4, §2.6).
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {origin}: {reason}")]
    Invalid { origin: String, reason: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// `model.params.unet_config.params` of the original YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalUnet {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Downsampling factors (1, 2, 4, ...) at which attention is used.
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    /// -1 when not given.
    pub num_heads: i64,
    /// -1 when not given.
    pub num_head_channels: i64,
    pub transformer_depth: usize,
    pub context_dim: Option<usize>,
    pub use_linear_in_transformer: bool,
    pub use_spatial_transformer: bool,
}

/// `first_stage_config` of the original YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalFirstStage {
    pub target: String,
    pub embed_dim: usize,
    pub z_channels: usize,
    pub double_z: bool,
    pub resolution: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
}

/// The text encoder named by `cond_stage_config.target`.
#[derive(Debug, Clone, PartialEq)]
pub enum OriginalTextEncoder {
    /// `ldm.modules.encoders.modules.FrozenCLIPEmbedder` (SD 1.x).
    Clip { num_heads: Option<usize> },
    /// `ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder` (SD 2.x); `layer` is "last" or "penultimate".
    OpenClip {
        layer: String,
        num_heads: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Parameterization {
    Eps,
    V,
}

/// A parsed original inference config.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalConfig {
    pub target: String,
    pub linear_start: f64,
    pub linear_end: f64,
    pub timesteps: usize,
    pub scale_factor: f64,
    pub parameterization: Parameterization,
    /// `crossattn`, `hybrid` (inpainting: concat + crossattn), `concat`, ...
    pub conditioning_key: Option<String>,
    pub unet: OriginalUnet,
    pub first_stage: OriginalFirstStage,
    pub text: Option<OriginalTextEncoder>,
}

const LATENT_DIFFUSION: &str = "ldm.models.diffusion.ddpm.LatentDiffusion";
const LATENT_INPAINT: &str = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion";
const AUTOENCODER_KL: &str = "ldm.models.autoencoder.AutoencoderKL";
const CLIP: &str = "ldm.modules.encoders.modules.FrozenCLIPEmbedder";
const OPEN_CLIP: &str = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder";

impl OriginalConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |reason: String| ConfigError::Invalid {
            origin: origin.to_string(),
            reason,
        };
        let docs =
            YamlLoader::load_from_str(text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
        let root = docs.first().ok_or_else(|| bad("empty YAML".into()))?;
        let model = &root["model"];
        if model.is_badvalue() {
            return Err(bad("no `model:` section".into()));
        }
        let target = req_str(model, "target", "model").map_err(&bad)?;
        if target != LATENT_DIFFUSION && target != LATENT_INPAINT {
            return Err(bad(format!("unknown model target `{target}`")));
        }
        let p = &model["params"];
        let parameterization = match opt_str(p, "parameterization").as_deref() {
            None | Some("eps") => Parameterization::Eps,
            Some("v") => Parameterization::V,
            Some(other) => return Err(bad(format!("unknown parameterization `{other}`"))),
        };
        let u = &p["unet_config"]["params"];
        let unet = OriginalUnet {
            in_channels: req_usize(u, "in_channels", "unet_config").map_err(&bad)?,
            out_channels: req_usize(u, "out_channels", "unet_config").map_err(&bad)?,
            model_channels: req_usize(u, "model_channels", "unet_config").map_err(&bad)?,
            attention_resolutions: usize_list(u, "attention_resolutions").map_err(&bad)?,
            num_res_blocks: req_usize(u, "num_res_blocks", "unet_config").map_err(&bad)?,
            channel_mult: usize_list(u, "channel_mult").map_err(&bad)?,
            num_heads: u["num_heads"].as_i64().unwrap_or(-1),
            num_head_channels: u["num_head_channels"].as_i64().unwrap_or(-1),
            transformer_depth: opt_usize(u, "transformer_depth").unwrap_or(1),
            context_dim: opt_usize(u, "context_dim"),
            use_linear_in_transformer: u["use_linear_in_transformer"].as_bool().unwrap_or(false),
            use_spatial_transformer: u["use_spatial_transformer"].as_bool().unwrap_or(false),
        };
        let fs = &p["first_stage_config"];
        let fs_target = req_str(fs, "target", "first_stage_config").map_err(&bad)?;
        if fs_target != AUTOENCODER_KL {
            return Err(bad(format!("unknown first-stage target `{fs_target}`")));
        }
        let dd = &fs["params"]["ddconfig"];
        let first_stage = OriginalFirstStage {
            target: fs_target,
            embed_dim: req_usize(&fs["params"], "embed_dim", "first_stage_config").map_err(&bad)?,
            z_channels: req_usize(dd, "z_channels", "ddconfig").map_err(&bad)?,
            double_z: dd["double_z"].as_bool().unwrap_or(true),
            resolution: opt_usize(dd, "resolution").unwrap_or(256),
            in_channels: opt_usize(dd, "in_channels").unwrap_or(3),
            out_ch: opt_usize(dd, "out_ch").unwrap_or(3),
            ch: req_usize(dd, "ch", "ddconfig").map_err(&bad)?,
            ch_mult: usize_list(dd, "ch_mult").map_err(&bad)?,
            num_res_blocks: req_usize(dd, "num_res_blocks", "ddconfig").map_err(&bad)?,
            attn_resolutions: usize_list(dd, "attn_resolutions").map_err(&bad)?,
        };
        let cs = &p["cond_stage_config"];
        let text = match cs["target"].as_str() {
            None => None,
            Some(CLIP) => Some(OriginalTextEncoder::Clip {
                num_heads: opt_usize(&cs["params"], "num_heads"),
            }),
            Some(OPEN_CLIP) => Some(OriginalTextEncoder::OpenClip {
                layer: opt_str(&cs["params"], "layer").unwrap_or_else(|| "last".into()),
                num_heads: opt_usize(&cs["params"], "num_heads"),
            }),
            Some(other) => return Err(bad(format!("unknown cond_stage target `{other}`"))),
        };
        Ok(Self {
            target,
            linear_start: p["linear_start"].as_f64().unwrap_or(0.00085),
            linear_end: p["linear_end"].as_f64().unwrap_or(0.012),
            timesteps: opt_usize(p, "timesteps").unwrap_or(1000),
            scale_factor: num(&p["scale_factor"]).unwrap_or(1.0),
            parameterization,
            conditioning_key: opt_str(p, "conditioning_key"),
            unet,
            first_stage,
            text,
        })
    }
}

fn num(y: &Yaml) -> Option<f64> {
    match y {
        Yaml::Real(_) => y.as_f64(),
        Yaml::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

fn opt_str(y: &Yaml, key: &str) -> Option<String> {
    y[key].as_str().map(|s| s.to_string())
}

fn req_str(y: &Yaml, key: &str, section: &str) -> std::result::Result<String, String> {
    opt_str(y, key).ok_or_else(|| format!("`{section}` has no string `{key}`"))
}

fn opt_usize(y: &Yaml, key: &str) -> Option<usize> {
    y[key].as_i64().and_then(|v| usize::try_from(v).ok())
}

fn req_usize(y: &Yaml, key: &str, section: &str) -> std::result::Result<usize, String> {
    opt_usize(y, key).ok_or_else(|| format!("`{section}` has no non-negative integer `{key}`"))
}

fn usize_list(y: &Yaml, key: &str) -> std::result::Result<Vec<usize>, String> {
    match &y[key] {
        Yaml::Array(items) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| format!("`{key}` holds a non-integer"))
            })
            .collect(),
        Yaml::BadValue | Yaml::Null => Ok(Vec::new()),
        _ => Err(format!("`{key}` is not a list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml (abridged: only
    // keys ldm-rs reads, plus a few it must ignore).
    const V2_V: &str = r#"
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"#;

    #[test]
    fn reads_sd2_v_config() -> Result<()> {
        let c = OriginalConfig::parse(V2_V, "v2")?;
        assert_eq!(c.parameterization, Parameterization::V);
        assert_eq!(c.scale_factor, 0.18215);
        assert_eq!(c.unet.num_head_channels, 64);
        assert_eq!(c.unet.num_heads, -1);
        assert_eq!(c.unet.attention_resolutions, vec![4, 2, 1]);
        assert!(c.unet.use_linear_in_transformer);
        assert_eq!(c.first_stage.ch_mult, vec![1, 2, 4, 4]);
        assert_eq!(
            c.text,
            Some(OriginalTextEncoder::OpenClip {
                layer: "penultimate".into(),
                num_heads: None
            })
        );
        Ok(())
    }

    #[test]
    fn unknown_targets_are_named_not_instantiated() {
        let y = V2_V.replace("ldm.models.diffusion.ddpm.LatentDiffusion", "os.system");
        let e = OriginalConfig::parse(&y, "evil.yaml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("unknown model target `os.system`") && e.contains("evil.yaml"),
            "{e}"
        );
        let e = OriginalConfig::parse("model: [", "broken.yaml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not valid YAML"), "{e}");
    }
}
