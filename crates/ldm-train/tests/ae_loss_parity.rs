//! Gradient parity of the autoencoder losses with the original PyTorch classes.
//!
//! Fixture: `fixtures/train-ae-loss/`, made by `tools/fixtures/make_ae_loss.py` from
//! CompVis/latent-diffusion@a506df5 (`LPIPSWithDiscriminator`, Encoder/Decoder, DiagonalGaussianDistribution) and
//! CompVis/taming-transformers@3ba01b2 (`VQLPIPSWithDiscriminator`, `NLayerDiscriminator`, LPIPS,
//! `VectorQuantizer2`), torch 2.x in /opt/ldmvenv: a tiny KL autoencoder with mid attention, a tiny VQ
//! autoencoder, a PatchGAN with ndf 8, a reduced-width VGG16 and random LPIPS heads as `.pth` files.
//!
//! Tolerances (f32 against f32):
//! * losses, λ and log values: `|x − y| ≤ max(1e-5·|x + y|, 1e-6)`;
//! * gradients, per element: `|x − y| ≤ max(1e-3·|x + y|, 1e-5·max(1, ‖ref‖∞), 1e-7·G)` with `‖ref‖∞` the
//!   largest reference value of that tensor and `G` the largest over all gradients of the step (the KL loss
//!   sums over pixels, its gradients reach O(1000)). The `G` floor is for gradients that are zero in exact
//!   arithmetic and rounding noise in both frameworks: biases right before a GroupNorm of one channel per group
//!   (the norm removes them) and the key biases of attention (softmax is shift-invariant).
//! * reconstructions and BatchNorm running statistics: `|x − y| ≤ max(1e-4·|x + y|, 1e-5)`;
//! * SSIM and PSNR against scikit-image (float64): `|x − y| ≤ 1e-5`.
//!
//! Each check prints the worst ratio |x − y| / bound (≤ 1 passes); run with `--nocapture` to see them.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ldm_models::autoencoder::{
    AttnType, AutoencoderKl, AutoencoderKlConfig, DdConfig, VqModel, VqModelConfig,
};
use ldm_train::losses::{
    psnr_per_image, ssim, ssim_per_image, DiscLoss, DiscriminatorConfig, KlLossConfig, LastLayer,
    Lpips, LpipsWithDiscriminator, Perceptual, PixelLoss, VqLossConfig, VqLpipsWithDiscriminator,
};
use serde_json::Value;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/train-ae-loss")
}

struct Fixture {
    t: HashMap<String, Tensor>,
    meta: Value,
}

fn fixture() -> R<Fixture> {
    let t = candle_core::safetensors::load(dir().join("ae_loss.safetensors"), &Device::Cpu)?;
    let meta = serde_json::from_str(&std::fs::read_to_string(dir().join("ae_loss.json"))?)?;
    Ok(Fixture { t, meta })
}

impl Fixture {
    fn get(&self, k: &str) -> R<Tensor> {
        Ok(self
            .t
            .get(k)
            .ok_or_else(|| format!("fixture lacks `{k}`"))?
            .to_dtype(DType::F32)?)
    }

    fn num(&self, path: &[&str]) -> R<f64> {
        let mut v = &self.meta;
        for p in path {
            v = v.get(p).ok_or_else(|| format!("json lacks {path:?}"))?;
        }
        v.as_f64()
            .ok_or_else(|| format!("{path:?} is not a number").into())
    }

    /// Puts the `prefix.*` tensors into the VarMap as `into.*` variables (f32).
    fn fill(&self, vm: &VarMap, prefix: &str, into: &str) -> R<usize> {
        let mut data = vm.data().lock().map_err(|_| "poisoned")?;
        let mut n = 0;
        for (k, v) in &self.t {
            if let Some(rest) = k.strip_prefix(prefix) {
                data.insert(
                    format!("{into}{rest}"),
                    Var::from_tensor(&v.to_dtype(DType::F32)?)?,
                );
                n += 1;
            }
        }
        Ok(n)
    }
}

fn check_scalar(what: &str, ours: f64, want: f64) -> R<()> {
    let bound = (1e-5 * (ours + want).abs()).max(1e-6);
    let ratio = (ours - want).abs() / bound;
    println!("{what}: ours {ours}, torch {want}, ratio {ratio:.3}");
    if ratio > 1.0 {
        return Err(format!("{what}: {ours} vs {want}").into());
    }
    Ok(())
}

/// Checks every (name, ours, torch) triple, reporting all before failing.
fn check_all(what: &str, checks: &[(String, f64, f64)]) -> R<()> {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(k, o, w)| check_scalar(&format!("{what} {k}"), *o, *w).is_err())
        .map(|(k, _, _)| k.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: {failed:?} differ").into())
    }
}

/// The absolute part of a tolerance.
#[derive(Clone, Copy)]
enum Floor {
    Abs(f64),
    /// `max(a·max(1, ‖want‖∞), b)`.
    Grad(f64, f64),
}

/// Worst `|x−y| / max(r·|x+y|, floor)` over the elements.
fn check_tensor(what: &str, ours: &Tensor, want: &Tensor, r: f64, floor: Floor) -> R<f64> {
    if ours.dims() != want.dims() {
        return Err(format!("{what}: shape {:?} vs {:?}", ours.dims(), want.dims()).into());
    }
    let o = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let inf = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    let a = match floor {
        Floor::Abs(a) => a,
        Floor::Grad(a, b) => (a * inf.max(1.0)).max(b),
    };
    let mut worst = 0f64;
    for (x, y) in o.iter().zip(w.iter()) {
        let ratio = (x - y).abs() / (r * (x + y).abs()).max(a);
        if !ratio.is_finite() {
            worst = f64::INFINITY;
        } else if ratio > worst {
            worst = ratio;
        }
    }
    if worst > 1.0 {
        return Err(format!("{what}: worst ratio {worst} (‖ref‖∞ {inf})").into());
    }
    Ok(worst)
}

fn lpips() -> R<Perceptual> {
    Ok(Perceptual::Lpips(Box::new(Lpips::load(
        &dir().join("vgg16.pth"),
        &dir().join("lpips_vgg.pth"),
        &Device::Cpu,
    )?)))
}

fn disc_cfg() -> DiscriminatorConfig {
    DiscriminatorConfig {
        input_nc: 3,
        ndf: 8,
        n_layers: 3,
    }
}

fn dd(ch_mult: Vec<usize>, num_res_blocks: usize, double_z: bool, attn: AttnType) -> DdConfig {
    DdConfig {
        ch: 32,
        out_ch: 3,
        ch_mult,
        num_res_blocks,
        attn_resolutions: vec![],
        in_channels: 3,
        resolution: 32,
        z_channels: 4,
        double_z,
        num_groups: 32,
        attn_type: attn,
    }
}

/// Compares the gradient of every `grad_prefix*` fixture tensor with that of the variable `var_prefix*`;
/// returns the worst ratio and the count.
fn check_grads(
    f: &Fixture,
    vm: &VarMap,
    grads: &GradStore,
    grad_prefix: &str,
    var_prefix: &str,
) -> R<(f64, usize)> {
    let data = vm.data().lock().map_err(|_| "poisoned")?;
    let (mut worst, mut n) = (0f64, 0);
    let mut keys: Vec<&String> = f.t.keys().filter(|k| k.starts_with(grad_prefix)).collect();
    keys.sort();
    let mut g_max = 0f64;
    for k in &keys {
        g_max = g_max.max(f.get(k)?.abs()?.max_all()?.to_scalar::<f32>()? as f64);
    }
    for k in keys {
        let name = match &k[grad_prefix.len()..] {
            "logvar" => "loss.logvar".to_string(), // the loss's own parameter
            rest => format!("{var_prefix}{rest}"),
        };
        let var = data
            .get(&name)
            .ok_or_else(|| format!("no variable `{name}`"))?;
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient for `{name}`"))?;
        let w = check_tensor(&name, g, &f.get(k)?, 1e-3, Floor::Grad(1e-5, 1e-7 * g_max))?;
        worst = worst.max(w);
        n += 1;
    }
    Ok((worst, n))
}

fn check_running(f: &Fixture, vm: &VarMap, prefix: &str) -> R<()> {
    let data = vm.data().lock().map_err(|_| "poisoned")?;
    let mut n = 0;
    for (k, want) in f.t.iter().filter(|(k, _)| k.starts_with(prefix)) {
        let name = format!("loss.discriminator.{}", &k[prefix.len()..]);
        let var = data
            .get(&name)
            .ok_or_else(|| format!("no variable `{name}`"))?;
        check_tensor(&name, var.as_tensor(), want, 1e-4, Floor::Abs(1e-5))?;
        n += 1;
    }
    assert_eq!(n, 6, "three BatchNorms, mean and var each");
    Ok(())
}

#[test]
fn kl_loss_matches_lpips_with_discriminator() -> R<()> {
    let f = fixture()?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    f.fill(&vm, "kl.ae.", "")?;
    f.fill(&vm, "disc.", "loss.discriminator.")?;
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let ae_cfg = AutoencoderKlConfig {
        embed_dim: 4,
        ddconfig: dd(vec![1, 1], 1, true, AttnType::Vanilla),
    };
    let ae = AutoencoderKl::new(&ae_cfg, vb.clone())?;
    let c = |k: &str| f.num(&["kl", "config", k]);
    let cfg = KlLossConfig {
        disc_start: c("disc_start")? as u64,
        logvar_init: c("logvar_init")?,
        kl_weight: c("kl_weight")?,
        perceptual_weight: c("perceptual_weight")?,
        disc_factor: c("disc_factor")?,
        disc_weight: c("disc_weight")?,
        disc_loss: DiscLoss::Hinge,
        discriminator: disc_cfg(),
    };
    let loss = LpipsWithDiscriminator::new(cfg, lpips()?, vb.pp("loss"))?;
    assert!(loss.perceptual().notice().is_none());
    let step = f.num(&["kl", "global_step"])? as u64;
    let x = f.get("x")?;

    let posterior = ae.encode(&x)?;
    let z = posterior.sample(&f.get("kl.noise")?)?;
    let h = ae.decode_features(&z)?;
    let last = LastLayer {
        input: &h,
        conv: ae.decoder_conv_out(),
    };
    let out = loss.generator_step(&x, &posterior, last, step)?;
    let w = check_tensor(
        "reconstructions",
        &out.reconstructions,
        &f.get("kl.xrec")?,
        1e-4,
        Floor::Abs(1e-5),
    )?;
    println!("reconstructions worst ratio {w:.3}");
    let mut checks = vec![("loss".to_string(), out.loss, f.num(&["kl", "loss"])?)];
    for (k, v) in &out.log {
        let want = match k.strip_suffix("_grad_norm") {
            Some(n) => f.num(&["kl", "grad_norms", n])?,
            None => f.num(&["kl", "log", k])?,
        };
        checks.push((format!("log {k}"), *v, want));
    }
    check_all("kl generator", &checks)?;
    let (worst, n) = check_grads(&f, &vm, &out.grads, "kl.grad.", "")?;
    println!("KL generator: {n} gradients, worst ratio {worst:.3}");
    assert!(n > 50);

    let d = loss.discriminator_step(&x, &out.reconstructions, step)?;
    let d_loss = d.loss.to_scalar::<f32>()? as f64;
    check_scalar("kl disc loss", d_loss, f.num(&["kl", "disc_loss"])?)?;
    for (k, v) in &d.log {
        check_scalar(
            &format!("kl disc log {k}"),
            *v,
            f.num(&["kl", "disc_log", k])?,
        )?;
    }
    let grads = d.loss.backward()?;
    let (worst, n) = check_grads(&f, &vm, &grads, "kl.disc_grad.", "loss.discriminator.")?;
    println!("KL discriminator: {n} gradients, worst ratio {worst:.3}");
    assert_eq!(
        n, 13,
        "conv weights 0, 2, 5, 8, 11, biases 0 and 11, three BatchNorms"
    );
    check_running(&f, &vm, "kl.disc_running.")?;
    Ok(())
}

#[test]
fn vq_loss_matches_vqlpips_with_discriminator() -> R<()> {
    let f = fixture()?;
    let dev = Device::Cpu;
    let vm = VarMap::new();
    f.fill(&vm, "vq.ae.", "")?;
    f.fill(&vm, "disc.", "loss.discriminator.")?;
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let model_cfg = VqModelConfig {
        embed_dim: 4,
        n_embed: 16,
        ddconfig: dd(vec![1], 0, false, AttnType::None),
    };
    let model = VqModel::new(&model_cfg, vb.clone())?;
    let c = |k: &str| f.num(&["vq", "config", k]);
    let cfg = VqLossConfig {
        disc_start: c("disc_start")? as u64,
        codebook_weight: c("codebook_weight")?,
        perceptual_weight: c("perceptual_weight")?,
        pixel_loss: PixelLoss::L1,
        disc_factor: c("disc_factor")?,
        disc_weight: c("disc_weight")?,
        disc_loss: DiscLoss::Hinge,
        discriminator: disc_cfg(),
    };
    let loss = VqLpipsWithDiscriminator::new(cfg, lpips()?, vb.pp("loss"))?;
    let step = f.num(&["vq", "global_step"])? as u64;
    let x = f.get("x")?;

    let h = model.encode(&x)?;
    let q = model
        .quantizer()
        .forward_train(&h, f.num(&["vq", "beta"])?, true)?;
    let want_idx =
        f.t.get("vq.indices")
            .ok_or("no indices")?
            .to_dtype(DType::U32)?;
    let differ = q
        .indices
        .ne(&want_idx)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert_eq!(differ, 0.0, "codebook indices differ at {differ} pixels");
    let feats = model.decode_features(&q.z_q)?;
    let last = LastLayer {
        input: &feats,
        conv: model.decoder_conv_out(),
    };
    let out = loss.generator_step(&x, &q.loss, last, step)?;
    check_tensor(
        "vq reconstructions",
        &out.reconstructions,
        &f.get("vq.xrec")?,
        1e-4,
        Floor::Abs(1e-5),
    )?;
    let mut checks = vec![("loss".to_string(), out.loss, f.num(&["vq", "loss"])?)];
    for (k, v) in &out.log {
        let want = match k.strip_suffix("_grad_norm") {
            Some(n) => f.num(&["vq", "grad_norms", n])?,
            None => f.num(&["vq", "log", k])?,
        };
        checks.push((format!("log {k}"), *v, want));
    }
    check_all("vq generator", &checks)?;
    let (worst, n) = check_grads(&f, &vm, &out.grads, "vq.grad.", "")?;
    println!("VQ generator: {n} gradients, worst ratio {worst:.3}");
    assert!(n > 20);

    let d = loss.discriminator_step(&x, &out.reconstructions, step)?;
    let d_loss = d.loss.to_scalar::<f32>()? as f64;
    check_scalar("vq disc loss", d_loss, f.num(&["vq", "disc_loss"])?)?;
    for (k, v) in &d.log {
        check_scalar(
            &format!("vq disc log {k}"),
            *v,
            f.num(&["vq", "disc_log", k])?,
        )?;
    }
    let grads = d.loss.backward()?;
    let (worst, n) = check_grads(&f, &vm, &grads, "vq.disc_grad.", "loss.discriminator.")?;
    println!("VQ discriminator: {n} gradients, worst ratio {worst:.3}");
    assert_eq!(
        n, 13,
        "conv weights 0, 2, 5, 8, 11, biases 0 and 11, three BatchNorms"
    );
    check_running(&f, &vm, "vq.disc_running.")?;
    Ok(())
}

#[test]
fn ssim_and_psnr_match_skimage() -> R<()> {
    let f = fixture()?;
    let x = f.get("x")?;
    let y = f.get("kl.xrec")?;
    let s = ssim_per_image(&x, &y, 2.0)?;
    let p = psnr_per_image(&x, &y, 2.0)?;
    for i in 0..2 {
        let want_s = f.meta["ssim"][i].as_f64().ok_or("ssim")?;
        let want_p = f.meta["psnr"][i].as_f64().ok_or("psnr")?;
        println!(
            "image {i}: ssim {} vs {want_s}, psnr {} vs {want_p}",
            s[i], p[i]
        );
        assert!((s[i] - want_s).abs() <= 1e-5, "ssim {} vs {want_s}", s[i]);
        assert!((p[i] - want_p).abs() <= 1e-5, "psnr {} vs {want_p}", p[i]);
    }
    // The differentiable form: gradient of the mean SSIM with respect to the reconstruction.
    let yv = Var::from_tensor(&y)?;
    let m = ssim(&x, yv.as_tensor(), 2.0)?;
    check_scalar(
        "mean ssim",
        m.to_scalar::<f32>()? as f64,
        f.num(&["ssim_torch_mean"])?,
    )?;
    let g = m.backward()?;
    let gy = g.get(yv.as_tensor()).ok_or("no ssim gradient")?;
    let w = check_tensor(
        "ssim gradient",
        gy,
        &f.get("ssim.grad_y")?,
        1e-3,
        Floor::Grad(1e-8, 0.0),
    )?;
    println!("ssim gradient worst ratio {w:.3}");
    Ok(())
}
