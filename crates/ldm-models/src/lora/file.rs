//! Reading a kohya LoRA safetensors file: per module `<name>.lora_down.weight` `[r, in]` (`[r, in, k, k]` for
//! convolutions), `<name>.lora_up.weight` `[out, r]` (`[out, r, 1, 1]`) and an optional scalar `<name>.alpha`.
//! The module's weight change is ΔW = (alpha / r) · up @ down (alpha absent: alpha = r), as kohya sd-scripts
//! (`LoRAModule.scale`), AUTOMATIC1111 (`NetworkModule.calc_scale`) and ComfyUI apply it.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use ldm_core::weights::SafetensorsFile;

use super::error::{LoraError, Result};

/// One LoRA module as stored (tensors in f32 on the CPU).
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub name: String,
    /// `[r, in]` or `[r, in, k, k]`
    pub down: Tensor,
    /// `[out, r]` or `[out, r, 1, 1]`
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / r (1 without an alpha).
    pub fn scale(&self) -> f64 {
        let r = self.rank() as f64;
        self.alpha.unwrap_or(r) / r
    }

    /// The shape of `up @ down`: `[out, in]` or `[out, in, k, k]`.
    pub fn delta_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.dims()[0]];
        s.extend_from_slice(&self.down.dims()[1..]);
        s
    }

    /// (alpha / r) · up @ down, in f32, of shape [`LoraModule::delta_shape`].
    pub fn delta(&self) -> Result<Tensor> {
        let (out, r) = (self.up.dims()[0], self.rank());
        let up = self.up.reshape((out, r))?;
        let down = self.down.flatten_from(1)?;
        let d = (up.matmul(&down)? * self.scale())?;
        Ok(d.reshape(self.delta_shape())?)
    }
}

/// A kohya LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    /// Sorted by name.
    pub modules: Vec<LoraModule>,
    /// The safetensors `__metadata__` (kohya's `ss_*` training settings).
    pub metadata: HashMap<String, String>,
}

const STRAY: &str = "a tensor that is not part of a kohya LoRA";

/// What a tensor of a LoRA-like file is.
enum Part {
    Down,
    Up,
    Alpha,
    Other(&'static str),
}

/// Classifies a tensor name `<module>.<suffix>`.
fn classify(name: &str) -> (String, Part) {
    let (module, suffix) = name.split_once('.').unwrap_or((name, ""));
    // diffusers/PEFT naming keeps the module path dotted: `unet.down_blocks.0...lora.down.weight`, `lora_A`
    let peft = [
        ".lora_A.",
        ".lora_B.",
        ".lora.down.",
        ".lora.up.",
        "lora_linear_layer",
    ];
    if peft.iter().any(|p| name.contains(p)) {
        return (
            module.to_string(),
            Part::Other("a diffusers/PEFT-format LoRA (dotted module paths, `lora_A`/`lora_B` or `lora.down`)"),
        );
    }
    let part = match suffix {
        "lora_down.weight" => Part::Down,
        "lora_up.weight" => Part::Up,
        "alpha" => Part::Alpha,
        "lora_mid.weight" => Part::Other("LyCORIS LoCon with a Tucker core (`lora_mid`)"),
        "dora_scale" => Part::Other("DoRA (`dora_scale`)"),
        "diff" | "diff_b" => Part::Other("a LyCORIS full-weight difference (`diff`)"),
        "w_norm" | "b_norm" => Part::Other("a LyCORIS norm network (`w_norm`)"),
        "on_input" | "weight" => Part::Other("(IA)³ (`weight`/`on_input`)"),
        s if s.starts_with("hada_") => Part::Other("LyCORIS LoHa (`hada_*`)"),
        s if s.starts_with("lokr_") => Part::Other("LyCORIS LoKr (`lokr_*`)"),
        s if s.starts_with("oft_") => Part::Other("OFT (`oft_*`)"),
        s if ["a1.", "a2.", "b1.", "b2."]
            .iter()
            .any(|p| s.starts_with(p)) =>
        {
            Part::Other("LyCORIS GLoRA")
        }
        _ if module == "bundle_emb" => {
            Part::Other("textual-inversion embeddings bundled in a LoRA")
        }
        _ => Part::Other(STRAY),
    };
    (module.to_string(), part)
}

#[derive(Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Reads and checks `path`: every tensor must belong to a LoRA module, every module needs `lora_down` and
/// `lora_up` of the same rank.
pub fn read_lora(path: &Path) -> Result<LoraFile> {
    let file = SafetensorsFile::open(path)?;
    let mut names: Vec<&str> = file.names().collect();
    names.sort_unstable();
    if names.is_empty() {
        return Err(LoraError::NotLora {
            path: path.to_path_buf(),
            reason: "it holds no tensors".into(),
        });
    }
    let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
    let mut other: BTreeMap<&'static str, (String, usize)> = BTreeMap::new();
    for name in &names {
        let (module, part) = classify(name);
        let slot = modules.entry(module.clone()).or_default();
        match part {
            Part::Down => slot.down = Some(name.to_string()),
            Part::Up => slot.up = Some(name.to_string()),
            Part::Alpha => slot.alpha = Some(name.to_string()),
            Part::Other(kind) => other.entry(kind).or_insert((module, 0)).1 += 1,
        }
    }
    let unsupported =
        |kind: &'static str, (module, count): (String, usize)| LoraError::Unsupported {
            path: path.to_path_buf(),
            kind,
            module,
            count,
        };
    // A LyCORIS/PEFT part fails the file, even beside plain LoRA modules: applying half a network would be wrong.
    if let Some(kind) = other.keys().copied().find(|k| *k != STRAY) {
        return Err(unsupported(kind, other[kind].clone()));
    }
    if !modules.values().any(|p| p.down.is_some() || p.up.is_some()) {
        return Err(LoraError::NotLora {
            path: path.to_path_buf(),
            reason: format!(
                "no `*.lora_down.weight` / `*.lora_up.weight` tensors; first tensor: `{}`",
                names[0]
            ),
        });
    }
    if let Some(stray) = other.remove(STRAY) {
        return Err(unsupported(STRAY, stray));
    }
    // modules with only tensors of another kind were reported above
    modules.retain(|_, p| p.down.is_some() || p.up.is_some() || p.alpha.is_some());
    let mut out = Vec::with_capacity(modules.len());
    for (module, parts) in modules {
        out.push(read_module(&file, path, module, parts)?);
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        modules: out,
        metadata: file.metadata().clone(),
    })
}

fn read_module(
    file: &SafetensorsFile,
    path: &Path,
    module: String,
    parts: Parts,
) -> Result<LoraModule> {
    let err = |reason: String| LoraError::Module {
        path: path.to_path_buf(),
        module: module.clone(),
        reason,
    };
    let (Some(down), Some(up)) = (&parts.down, &parts.up) else {
        let missing = if parts.down.is_none() {
            "lora_down.weight"
        } else {
            "lora_up.weight"
        };
        return Err(err(format!("`{missing}` is missing")));
    };
    let load = |name: &str| -> Result<Tensor> { Ok(file.load(name)?.to_dtype(DType::F32)?) };
    let (down, up) = (load(down)?, load(up)?);
    let (dd, ud) = (down.dims().to_vec(), up.dims().to_vec());
    if !matches!(dd.len(), 2 | 4) || ud.len() != dd.len() {
        return Err(err(format!(
            "lora_down {dd:?} and lora_up {ud:?} are not both 2-D (linear) or 4-D (conv)"
        )));
    }
    if ud.len() == 4 && (ud[2] != 1 || ud[3] != 1) {
        return Err(err(format!("lora_up {ud:?} is not a 1x1 convolution")));
    }
    if dd[0] == 0 {
        return Err(err("rank 0".into()));
    }
    if dd[0] != ud[1] {
        return Err(LoraError::RankMismatch {
            path: path.to_path_buf(),
            module,
            down: dd[0],
            up: ud[1],
        });
    }
    let alpha = match &parts.alpha {
        Some(name) => {
            let t = load(name)?;
            if t.elem_count() != 1 {
                return Err(err(format!("alpha has shape {:?}, not a scalar", t.dims())));
            }
            let a = t.flatten_all()?.to_vec1::<f32>()?[0] as f64;
            if !a.is_finite() {
                return Err(err(format!("alpha is {a}")));
            }
            Some(a)
        }
        None => None,
    };
    Ok(LoraModule {
        name: module,
        down,
        up,
        alpha,
    })
}
