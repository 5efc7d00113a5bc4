//! `ldm info`: what a checkpoint is, read from its headers and configs (no weights are loaded).
use std::collections::BTreeMap;
use std::path::Path;

use ldm_pipeline::spec::{COND_PREFIX, UNET_PREFIX, VAE_PREFIX};
use ldm_pipeline::ConfigOverride;

pub fn run(path: &Path, config: Option<&ConfigOverride>) -> anyhow::Result<()> {
    let opened = ldm_pipeline::open(path, config)?;
    let spec = &opened.spec;
    let form = match &opened.form {
        ldm_pipeline::source::CheckpointForm::Safetensors(_) => "single-file safetensors",
        ldm_pipeline::source::CheckpointForm::Ckpt(_) => {
            "single-file PyTorch checkpoint (read without executing it)"
        }
        ldm_pipeline::source::CheckpointForm::Diffusers(_) => "diffusers folder",
    };
    println!("path:        {}", path.display());
    println!("form:        {form}");
    println!("model:       {}", spec.describe());
    println!("config:      {}", opened.config_source);
    println!(
        "latent:      {} channels, f = {}, scale {}",
        spec.latent_channels(),
        spec.vae_factor(),
        spec.latent_scale
    );
    println!("condition:   {}", spec.conditioning());
    println!("sizes:       multiples of {} pixels", spec.size_multiple());
    let cond_prefix = spec.clip().map_or(COND_PREFIX, |(_, _, p)| p);
    let components = [
        ("unet", UNET_PREFIX),
        ("first stage", VAE_PREFIX),
        ("cond stage", cond_prefix),
    ];
    let mut other: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut per: Vec<(usize, BTreeMap<String, usize>)> =
        vec![(0, BTreeMap::new()); components.len()];
    for key in opened.store.keys() {
        let n: usize = opened
            .store
            .shape(key)
            .map(|s| s.iter().product())
            .unwrap_or(0);
        let dtype = opened
            .store
            .dtype(key)
            .map(|d| format!("{d:?}").to_lowercase())
            .unwrap_or_default();
        match components
            .iter()
            .position(|(_, p)| key.starts_with(&format!("{p}.")))
        {
            Some(i) => {
                per[i].0 += n;
                *per[i].1.entry(dtype).or_default() += 1;
            }
            None => {
                let e = other.entry(dtype).or_default();
                e.0 += n;
                e.1 += 1;
            }
        }
    }
    for ((name, _), (params, dtypes)) in components.iter().zip(&per) {
        let d: Vec<String> = dtypes.iter().map(|(d, c)| format!("{c} {d}")).collect();
        println!(
            "{name:<13}{:>14} parameters  ({} tensors)",
            group(*params),
            d.join(", ")
        );
    }
    if !other.is_empty() {
        let total: usize = other.values().map(|v| v.0).sum();
        let count: usize = other.values().map(|v| v.1).sum();
        println!("{:<13}{:>14} values      ({count} tensors not used for inference: schedule buffers, EMA, ...)", "other", group(total));
    }
    Ok(())
}

/// 123456789 → "123,456,789".
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
