//! `ldm train-autoencoder`: the first stage of the LDM paper (Sec. 3.1, App. G): an autoencoder trained with
//! L1 + perceptual reconstruction, a patch-based adversarial loss with the adaptive weight λ, and a KL term
//! (KL-f) or vector quantisation (VQ-f). The losses are [`crate::losses`]; this module runs them as the
//! original does per batch: an autoencoder step (Adam on encoder, decoder, quant convs and codebook), then a
//! discriminator step on a fresh reconstruction by the updated autoencoder (from `disc_start` on).
//!
//! At every evaluation it writes a reconstruction grid of held-out images (originals above, reconstructions
//! below) and logs their PSNR/SSIM; the finished model is exported as `model.safetensors` (the CompVis
//! autoencoder keys: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, `quantize.*`) with its YAML.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::autoencoder::{AutoencoderKl, VqModel};
use ldm_models::original_config::{OriginalFile, OriginalFirstStage};
use ldm_pipeline::spec::{first_stage_from_original, FirstStageSpec};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{restore_params, save_safetensors, snapshot, TrainCheckpoint};
use crate::data::{Dataset, ImageDataset, Loader, LoaderConfig, LoaderPosition};
use crate::error::{Result, TrainError};
use crate::grad::clip_grad_norm;
use crate::grid::save_grid;
use crate::init::SeededVarMap;
use crate::ldm::{adamw_config, lr_schedule};
use crate::log::JsonlLog;
use crate::losses::ssim::eval_metrics;
use crate::losses::{
    DiscLoss, DiscriminatorConfig, KlLossConfig, LastLayer, Lpips, LpipsWithDiscriminator,
    Perceptual, PixelLoss, VqLossConfig, VqLpipsWithDiscriminator,
};
use crate::optim::AdamW;
use crate::recipe::AutoencoderRecipe;
use crate::run::{
    after_step, close_run, load_checkpoint, open_run, Event, RunOptions, StepClock, Summary,
};
use crate::setup::{check_channels, match_channels, open_dataset, split_holdout, vars_under};

/// β of the VQ commitment term (the LDM/taming default).
const VQ_BETA: f64 = 0.25;
/// Held-out images shown in a reconstruction grid.
const GRID_IMAGES: usize = 8;

#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    recipe: String,
    loader: LoaderPosition,
}

enum Model {
    Kl(AutoencoderKl, LpipsWithDiscriminator),
    Vq(VqModel, VqLpipsWithDiscriminator),
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::invalid("model", e.to_string())
}

impl Model {
    fn kind(&self) -> &'static str {
        match self {
            Model::Kl(..) => "autoencoder-kl",
            Model::Vq(..) => "autoencoder-vq",
        }
    }

    /// One autoencoder (generator) step's loss and gradients; `rng` gives the posterior noise.
    fn generator_step(
        &self,
        x: &Tensor,
        step: u64,
        rng: &mut TorchRng,
    ) -> Result<crate::losses::GeneratorStep> {
        match self {
            Model::Kl(ae, loss) => {
                let post = ae.encode(x)?;
                let noise = noise_like(&post.mean, rng)?;
                let h = ae.decode_features(&post.sample(&noise)?)?;
                let last = LastLayer {
                    input: &h,
                    conv: ae.decoder_conv_out(),
                };
                loss.generator_step(x, &post, last, step)
            }
            Model::Vq(ae, loss) => {
                let q = ae
                    .quantizer()
                    .forward_train(&ae.encode(x)?, VQ_BETA, true)?;
                let h = ae.decode_features(&q.z_q)?;
                let last = LastLayer {
                    input: &h,
                    conv: ae.decoder_conv_out(),
                };
                loss.generator_step(x, &q.loss, last, step)
            }
        }
    }

    /// x̂ of the current weights: the posterior sample (KL, noise from `rng`) or the posterior mode
    /// (`rng = None`, evaluation); VQ quantises with the current codebook.
    fn reconstruct(&self, x: &Tensor, rng: Option<&mut TorchRng>) -> Result<Tensor> {
        Ok(match self {
            Model::Kl(ae, _) => {
                let post = ae.encode(x)?;
                let z = match rng {
                    Some(r) => post.sample(&noise_like(&post.mean, r)?)?,
                    None => post.mean.clone(),
                };
                ae.decode(&z)?
            }
            Model::Vq(ae, _) => {
                let q = ae
                    .quantizer()
                    .forward_train(&ae.encode(x)?, VQ_BETA, true)?;
                ae.decode_unquantized(&q.z_q)?
            }
        }
        .detach())
    }

    fn discriminator_loss(
        &self,
        x: &Tensor,
        rec: &Tensor,
        step: u64,
    ) -> Result<crate::losses::DiscriminatorStep> {
        match self {
            Model::Kl(_, l) => l.discriminator_step(x, rec, step),
            Model::Vq(_, l) => l.discriminator_step(x, rec, step),
        }
    }
}

fn noise_like(t: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
    Ok(Tensor::from_vec(rng.randn(t.elem_count()), t.shape(), t.device())?.to_dtype(t.dtype())?)
}

fn perceptual(recipe: &AutoencoderRecipe, device: &Device) -> Result<Perceptual> {
    match (&recipe.loss.vgg16, &recipe.loss.lpips) {
        (Some(vgg), Some(heads)) => Ok(Perceptual::Lpips(Box::new(Lpips::load(
            vgg, heads, device,
        )?))),
        _ => Ok(Perceptual::Ssim),
    }
}

fn build(
    recipe: &AutoencoderRecipe,
    varmap: &VarMap,
    device: &Device,
) -> Result<(Model, FirstStageSpec)> {
    let mut first = match OriginalFile::load(&recipe.model).map_err(model_err)? {
        OriginalFile::FirstStage(a) => a.first_stage,
        OriginalFile::Diffusion(_) => {
            return Err(TrainError::invalid(
                "model",
                format!(
                    "{} describes a diffusion model: train it with `ldm train`",
                    recipe.model.display()
                ),
            ))
        }
    };
    // A VQ autoencoder is trained as `VQModel` (taming's and LDM's autoencoder configs); whether `encode`
    // quantises (`VQModelInterface` does not) only matters to an LDM using it, whose own YAML says so.
    if let OriginalFirstStage::Vq(vq) = &mut first {
        vq.interface = true;
    }
    let spec = first_stage_from_original(&first).map_err(model_err)?;
    let vb = SeededVarMap::new(varmap.clone(), recipe.train.seed).var_builder(DType::F32, device);
    let l = &recipe.loss;
    if matches!(spec, FirstStageSpec::Identity { .. }) {
        return Err(TrainError::invalid(
            "model",
            "an identity first stage has nothing to train",
        ));
    }
    let in_ch = spec.image_channels();
    let disc = DiscriminatorConfig {
        input_nc: in_ch,
        ndf: l.disc_channels,
        n_layers: l.disc_layers,
    };
    if disc.output_side(recipe.data.size).is_none() {
        return Err(TrainError::invalid(
            "loss.disc_layers",
            format!(
                "a {}-layer PatchGAN discriminator needs images of at least {} px; these are {} px (use fewer \
                 disc_layers)",
                l.disc_layers,
                (1..4096)
                    .find(|&s| disc.output_side(s).is_some())
                    .unwrap_or(4096),
                recipe.data.size
            ),
        ));
    }
    let perc = perceptual(recipe, device)?;
    let model = match &spec {
        FirstStageSpec::Kl(c) => {
            let cfg = KlLossConfig {
                disc_start: l.disc_start,
                logvar_init: 0.0,
                kl_weight: l.kl_weight,
                perceptual_weight: l.perceptual_weight,
                disc_factor: 1.0,
                disc_weight: l.disc_weight,
                disc_loss: DiscLoss::Hinge,
                discriminator: disc,
            };
            Model::Kl(
                AutoencoderKl::new(c, vb.clone())?,
                LpipsWithDiscriminator::new(cfg, perc, vb.pp("loss"))?,
            )
        }
        FirstStageSpec::Vq(c) => {
            let cfg = VqLossConfig {
                disc_start: l.disc_start,
                codebook_weight: l.codebook_weight,
                perceptual_weight: l.perceptual_weight,
                pixel_loss: PixelLoss::L1,
                disc_factor: 1.0,
                disc_weight: l.disc_weight,
                disc_loss: DiscLoss::Hinge,
                discriminator: disc,
            };
            Model::Vq(
                VqModel::new(c, vb.clone())?,
                VqLpipsWithDiscriminator::new(cfg, perc, vb.pp("loss"))?,
            )
        }
        FirstStageSpec::Identity { .. } => unreachable!("refused above"),
    };
    Ok((model, spec))
}

/// Mean PSNR and SSIM of the held-out images (posterior mode), and a grid of the first few.
fn evaluate(
    model: &Model,
    held: &ImageDataset,
    channels: usize,
    batch: usize,
    grid: &Path,
) -> Result<(f64, f64)> {
    let (mut psnr, mut ssim) = (Vec::new(), Vec::new());
    let n = held.len();
    let mut shown: Option<(Tensor, Tensor)> = None;
    for start in (0..n).step_by(batch.max(1)) {
        let items: Vec<Tensor> = (start..(start + batch).min(n))
            .map(|i| held.get_plain(i).map(|s| s.image))
            .collect::<Result<_>>()?;
        let x = match_channels(&Tensor::stack(&items, 0)?, channels)?;
        let y = model.reconstruct(&x, None)?.clamp(-1f32, 1f32)?;
        let (x01, y01) = (((&x + 1.0)? / 2.0)?, ((&y + 1.0)? / 2.0)?);
        let (s, p) = eval_metrics(&x01, &y01, 1.0)?;
        ssim.extend(s);
        psnr.extend(p);
        if shown.is_none() {
            let k = x.dim(0)?.min(GRID_IMAGES);
            shown = Some((x01.narrow(0, 0, k)?, y01.narrow(0, 0, k)?));
        }
    }
    if let Some((a, b)) = shown {
        let k = a.dim(0)?;
        save_grid(&Tensor::cat(&[&a, &b], 0)?, k, grid)?;
    }
    let mean = |v: &[f64]| v.iter().filter(|x| x.is_finite()).sum::<f64>() / v.len().max(1) as f64;
    Ok((mean(&psnr), mean(&ssim)))
}

/// Runs (or resumes) autoencoder training as `recipe` describes.
pub fn train_autoencoder(
    recipe: &AutoencoderRecipe,
    recipe_text: &str,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let device = Device::Cpu;
    let t = &recipe.train;
    if t.grad_accum != 1 {
        return Err(TrainError::invalid(
            "train.grad_accum",
            "autoencoder training takes one batch per step (the adaptive weight is per batch): use 1",
        ));
    }
    let (ckpts, resume_from) = open_run(opts, t.keep_checkpoints)?;
    let varmap = VarMap::new();
    let (model, spec) = build(recipe, &varmap, &device)?;
    let channels = spec.image_channels();
    if let Model::Kl(_, l) = &model {
        if let Some(n) = l.perceptual().notice() {
            on_event(Event::Message(n.to_string()));
        }
    }
    if let Model::Vq(_, l) = &model {
        if let Some(n) = l.perceptual().notice() {
            on_event(Event::Message(n.to_string()));
        }
    }
    // The LDM's opt_ae: encoder, decoder, quant convs, codebook (not logvar); opt_disc: the discriminator's
    // weights (its BatchNorm running statistics are state, saved but not optimised).
    let all = vars_under(&varmap, &[""]);
    let ae_vars: Vec<(String, Var)> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("loss."))
        .cloned()
        .collect();
    let disc_vars: Vec<(String, Var)> = all
        .iter()
        .filter(|(k, _)| k.starts_with("loss.discriminator.") && !k.contains("running_"))
        .cloned()
        .collect();
    on_event(Event::Message(format!(
        "model: {} ({:.2} M parameters), discriminator {:.2} M",
        model.kind(),
        ae_vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>() as f64 / 1e6,
        disc_vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>() as f64 / 1e6,
    )));
    let (ds, report) = open_dataset(&recipe.data)?;
    if let Some(r) = report.filter(|r| !r.skipped.is_empty()) {
        on_event(Event::Message(format!("data: {r}")));
    }
    check_channels(&ds, channels)?;
    let (train, held) = split_holdout(ds, recipe.data.holdout, t.seed)?;
    on_event(Event::Message(format!(
        "data: {} training and {} held-out images of {}²",
        train.len(),
        held.as_ref().map_or(0, |h| h.len()),
        recipe.data.size
    )));
    let loader_cfg = LoaderConfig {
        batch_size: t.batch_size,
        shuffle: true,
        drop_last: train.len() >= t.batch_size,
        seed: t.seed,
    };
    let mut opt_ae = AdamW::new(ae_vars.clone(), adamw_config(t, t.lr))?;
    let disc_lr = recipe.loss.disc_lr.unwrap_or(t.lr);
    let mut opt_disc = AdamW::new(disc_vars.clone(), adamw_config(t, disc_lr))?;
    let schedule = lr_schedule(t);
    schedule.validate()?;

    let (mut step, mut rng, mut loader) = match &resume_from {
        Some(path) => {
            let (ck, state, rng): (_, RunState, _) = load_checkpoint(path, model.kind())?;
            restore_params(&all, &ck.model)?;
            for (slot, opt) in [("optim", &mut opt_ae), ("optim_disc", &mut opt_disc)] {
                if let Some(st) = ck.optimizers.get(slot) {
                    opt.load_state(st)?;
                }
            }
            on_event(Event::Message(format!(
                "resumed from {} at step {}",
                path.display(),
                ck.step
            )));
            (ck.step, rng, Loader::resume(loader_cfg, state.loader)?)
        }
        None => (
            0,
            TorchRng::new(t.seed),
            Loader::new(loader_cfg, train.len())?,
        ),
    };
    let total = opts.max_steps.unwrap_or(t.steps);
    let mut log = JsonlLog::append(&opts.out.join("train.jsonl"))?;
    let started = Instant::now();
    log.event(step, 0.0, if step > 0 { "resume" } else { "start" })?;
    on_event(Event::Start {
        from_step: step,
        total,
    });
    let save =
        |step: u64, rng: &TorchRng, loader: &Loader, a: &AdamW, d: &AdamW| -> Result<PathBuf> {
            let state = RunState {
                recipe: recipe_text.to_string(),
                loader: loader.position(),
            };
            ckpts.save(&TrainCheckpoint {
                model_kind: model.kind().into(),
                step,
                config: serde_json::to_string(&state)
                    .map_err(|e| TrainError::invalid("run state", e.to_string()))?,
                rng: BTreeMap::from([("noise".to_string(), rng.state())]),
                model: snapshot(&all)?,
                ema: None,
                optimizers: BTreeMap::from([
                    ("optim".to_string(), a.state()),
                    ("optim_disc".to_string(), d.state()),
                ]),
            })
        };
    let ae_plain: Vec<Var> = ae_vars.iter().map(|(_, v)| v.clone()).collect();
    let eval_every = if t.sample_every > 0 {
        t.sample_every
    } else {
        t.checkpoint_every
    };
    let (mut last_loss, mut interrupted) = (f64::NAN, false);
    let clock = StepClock {
        started,
        run_start: step,
        total,
    };
    while step < total {
        if opts.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let x = match_channels(&loader.next_batch(&train, &device)?.images, channels)?;
        let lr = schedule.lr_at(step, t.lr);
        let mut gen = model.generator_step(&x, step, &mut rng)?;
        if let Some(max) = t.clip_grad_norm {
            clip_grad_norm(&mut gen.grads, &ae_plain, max)?;
        }
        opt_ae.step(&gen.grads, lr)?;
        let mut vals: Vec<(String, f64)> = gen.log.into_iter().collect();
        if step >= recipe.loss.disc_start {
            // The original's optimizer_idx 1 pass: a new forward of the updated autoencoder.
            let rec = model.reconstruct(&x, Some(&mut rng))?;
            let d = model.discriminator_loss(&x, &rec, step)?;
            let grads = d.loss.backward()?;
            opt_disc.step(&grads, schedule.lr_at(step, disc_lr))?;
            vals.extend(d.log);
        }
        step += 1;
        last_loss = gen.loss;
        vals.push(("lr".into(), lr));
        let refs: Vec<(&str, f64)> = vals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let elapsed = after_step(
            t,
            &clock,
            &mut log,
            on_event,
            step,
            last_loss,
            lr,
            &refs,
            &mut || save(step, &rng, &loader, &opt_ae, &opt_disc),
        )?;
        if let Some(h) = &held {
            if step % eval_every == 0 && step < total {
                let grid = opts
                    .out
                    .join("samples")
                    .join(format!("recon-{step:06}.png"));
                let (psnr, ssim) = evaluate(&model, h, channels, t.batch_size, &grid)?;
                log.write("eval", step, elapsed, &[("psnr", psnr), ("ssim", ssim)])?;
                on_event(Event::Message(format!(
                    "step {step}: held-out PSNR {psnr:.2} dB, SSIM {ssim:.4}"
                )));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ckpt = save(step, &rng, &loader, &opt_ae, &opt_disc)?;
    let mut summary = close_run(
        &mut log,
        on_event,
        step,
        elapsed,
        interrupted,
        last_loss,
        ckpt,
    )?;
    if interrupted || step < t.steps {
        return Ok(summary);
    }
    if let Some(h) = &held {
        let grid = opts.out.join("reconstructions.png");
        let (psnr, ssim) = evaluate(&model, h, channels, t.batch_size, &grid)?;
        log.write("eval", step, elapsed, &[("psnr", psnr), ("ssim", ssim)])?;
        on_event(Event::Message(format!(
            "held-out PSNR {psnr:.2} dB, SSIM {ssim:.4} ({} images)",
            h.len()
        )));
        summary.samples = Some(grid);
    }
    let exported = opts.out.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = ae_vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    save_safetensors(
        &exported,
        &refs,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    let yaml =
        std::fs::read_to_string(&recipe.model).map_err(|e| TrainError::io(&recipe.model, e))?;
    ldm_core::image::write_atomic(&exported.with_extension("yaml"), yaml.as_bytes())?;
    on_event(Event::Saved(&exported));
    let curve = opts.out.join("loss.png");
    crate::plot::write_png(&curve, &crate::log::read_series(log.path(), "train")?)?;
    summary.exported = Some(exported);
    summary.loss_curve = Some(curve);
    Ok(summary)
}
