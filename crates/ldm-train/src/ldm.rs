//! `ldm train`: a latent diffusion model on a trained first stage (Rombach et al. 2022, Sec. 3.3, eq. (2)):
//! minimise E‖ε − ε_θ(z_t, t, τ_θ(y))‖² over latents z = scale · E(x) of the data, with the condition y
//! replaced by the null condition with probability `cond_drop` (classifier-free guidance, Ho & Salimans 2022).
//!
//! The networks are the inference ones ([`SdModels::build_with`]) on a `VarMap`: the UNet (and a class or
//! text encoder trained jointly, as in the paper) are trainable, the first stage and a CLIP text encoder are
//! frozen. A run folder holds `train.jsonl`, `checkpoints/` (atomic, resumable bit for bit), `samples/`, and at
//! the end `model.safetensors` + `model.yaml` (the original single-file layout, loadable by every inference
//! command) and `loss.png`.
//!
//! Fine-tuning: `init` names an existing checkpoint (e.g. a Stable Diffusion single file) whose weights replace
//! the random initialisation. With a `[lora]` section only low-rank adapters of the UNet's attention
//! projections are trained ([`crate::lora`]: the UNet of every step is rebuilt from W0 + (α/r)·U·D); checkpoints
//! hold the adapters, and the export is `lora.safetensors` in the kohya/AUTOMATIC1111 format instead of a model.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_core::weights::WeightStore;
use ldm_models::autoencoder::{Encoded, FirstStage};
use ldm_models::lora::LoraTargets;
use ldm_models::original_config::{OriginalConfig, OriginalFile};
use ldm_models::unet::Unet;
use ldm_pipeline::load::builtin_tokenizer;
use ldm_pipeline::spec::{CondSpec, FirstStageSpec, ModelSpec, TextSpec};
use ldm_pipeline::SdModels;
use ldm_sampling::schedule::Schedule;
use ldm_sampling::{PredictionType, SamplerKind};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{restore_params, save_safetensors, snapshot, TrainCheckpoint};
use crate::concat::{image_channels, ConcatTraining};
use crate::data::{Dataset, LatentCache, Loader, LoaderConfig, LoaderPosition};
use crate::diffusion::{dropout_mask, DiffusionObjective, Prediction};
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::grad::{clip_grad_norm, GradAccumulator};
use crate::init::SeededVarMap;
use crate::log::JsonlLog;
use crate::lora::{save_kohya, LoraBackend, LoraConfig, LoraSet};
use crate::lr::LrSchedule;
use crate::optim::{AdamW, AdamWConfig};
use crate::recipe::{LdmRecipe, LoraDtype, LoraRecipe, LoraTargetSet, LrDecay, TrainSettings};
use crate::run::{
    after_step, close_run, load_checkpoint, open_run, Event, RunOptions, StepClock, Summary,
};
use crate::setup::{load_into, open_dataset, open_store, vars_under};

const KIND: &str = "ldm";

/// What a checkpoint records besides weights, optimiser and generators.
#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    recipe: String,
    loader: LoaderPosition,
    latent_scale: f64,
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::invalid("model", e.to_string())
}

/// The LR schedule a recipe asks for.
pub fn lr_schedule(t: &TrainSettings) -> LrSchedule {
    match (t.lr_decay, t.warmup_steps) {
        (LrDecay::Constant, 0) => LrSchedule::Constant,
        (LrDecay::Constant, w) => LrSchedule::LinearWarmup { warmup_steps: w },
        (LrDecay::Cosine, w) => LrSchedule::Cosine {
            warmup_steps: w,
            total_steps: t.steps.max(w + 1),
            min_lr_ratio: 0.0,
        },
    }
}

/// AdamW settings of a recipe.
pub fn adamw_config(t: &TrainSettings, lr: f64) -> AdamWConfig {
    AdamWConfig {
        lr,
        beta1: t.betas.0,
        beta2: t.betas.1,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
    }
}

/// The model YAML of a recipe as a diffusion config.
fn diffusion_config(path: &Path) -> Result<OriginalConfig> {
    match OriginalFile::load(path).map_err(model_err)? {
        OriginalFile::Diffusion(cfg) => Ok(*cfg),
        OriginalFile::FirstStage(_) => Err(TrainError::invalid(
            "model",
            format!(
                "{} describes an autoencoder: train it with `ldm train-autoencoder`",
                path.display()
            ),
        )),
    }
}

/// A first-stage file as a store under `first_stage_model.`: an exported autoencoder (its own key names) or
/// a whole LDM/SD checkpoint (keys already prefixed).
fn first_stage_store(path: &Path) -> Result<WeightStore> {
    open_store(path, "first_stage_model.")
}

/// Trainable prefixes: the UNet, and the condition encoder where the paper trains it jointly.
fn trainable_prefixes(spec: &ModelSpec) -> Vec<&'static str> {
    let mut p = vec!["model.diffusion_model."];
    if matches!(
        spec.cond,
        CondSpec::Class(_) | CondSpec::Text(TextSpec::Bert(_)) | CondSpec::Layout { .. }
    ) {
        p.push("cond_stage_model.");
    }
    p
}

/// LoRA fine-tuning state: the trainable pairs and the frozen UNet weights they patch.
struct LoraTrain {
    set: LoraSet,
    backend: LoraBackend,
    save_dtype: DType,
}

impl LoraTrain {
    fn new(
        r: &LoraRecipe,
        store: &WeightStore,
        spec: &ModelSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let targets = LoraTargets::for_model(store, Some(&spec.unet), None);
        let keys = match r.targets {
            LoraTargetSet::Attention => LoraSet::default_keys(store),
        };
        if keys.is_empty() {
            return Err(TrainError::invalid(
                "lora.targets",
                format!(
                    "{}: the UNet has no attention projections to adapt",
                    store.origin()
                ),
            ));
        }
        let cfg = LoraConfig {
            rank: r.rank,
            alpha: r.alpha,
            seed,
        };
        let set = LoraSet::new(store, &targets, &keys, &cfg, device)?;
        let backend = LoraBackend::new(
            store,
            ldm_models::import::UNET_PREFIX,
            &set,
            DType::F32,
            device,
        )?;
        let save_dtype = match r.save_dtype {
            LoraDtype::F16 => DType::F16,
            LoraDtype::Bf16 => DType::BF16,
            LoraDtype::F32 => DType::F32,
        };
        Ok(Self {
            set,
            backend,
            save_dtype,
        })
    }

    /// The UNet with the adapters' current values (a graph of the LoRA `Var`s).
    fn unet(&self, spec: &ModelSpec) -> Result<Unet> {
        Unet::new(
            self.backend
                .var_builder()
                .pp(ldm_pipeline::spec::UNET_PREFIX),
            &spec.unet,
        )
        .map_err(model_err)
    }

    /// The pairs as named variables (kohya key names), for the optimiser, EMA and checkpoints.
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.set
            .layers()
            .iter()
            .flat_map(|l| {
                [
                    (format!("{}.lora_down.weight", l.name), l.down.clone()),
                    (format!("{}.lora_up.weight", l.name), l.up.clone()),
                ]
            })
            .collect()
    }
}

/// Everything a run needs, built from a recipe.
struct Setup {
    /// Set for LoRA fine-tuning: `trainable` then holds the adapters and `models.unet` is unused.
    lora: Option<LoraTrain>,
    spec: ModelSpec,
    models: SdModels,
    trainable: Vec<(String, Var)>,
    frozen: Vec<(String, Var)>,
    objective: DiffusionObjective,
    /// Channels joined to z_t (super-resolution, inpainting).
    concat: ConcatTraining,
    /// The YAML's `scale_by_std`: the latent scale is 1/std of the first batch's latents, stored in the
    /// checkpoint as `scale_factor`.
    scale_by_std: bool,
}

fn build(recipe: &LdmRecipe, device: &Device) -> Result<Setup> {
    let cfg = diffusion_config(&recipe.model)?;
    let fs_store = recipe
        .first_stage
        .as_deref()
        .map(first_stage_store)
        .transpose()?;
    let init_store = recipe
        .init
        .as_deref()
        .map(|p| open_store(p, ""))
        .transpose()?;
    let empty = WeightStore::new(recipe.model.display().to_string());
    let spec_store = init_store.as_ref().or(fs_store.as_ref()).unwrap_or(&empty);
    let spec = ModelSpec::from_original(&cfg, spec_store, &recipe.model.display().to_string())
        .map_err(model_err)?;
    let concat = ConcatTraining::new(&spec, &recipe.masks)?;
    let varmap = VarMap::new();
    let vb = SeededVarMap::new(varmap.clone(), recipe.train.seed).var_builder(DType::F32, device);
    let tokenizer = builtin_tokenizer(&spec).map_err(model_err)?;
    let models = SdModels::build_with(spec.clone(), tokenizer, vb, device).map_err(model_err)?;
    let prefixes = if recipe.lora.is_some() {
        vec!["model.diffusion_model."]
    } else {
        trainable_prefixes(&spec)
    };
    let all = vars_under(&varmap, &[""]);
    let (trainable, frozen): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)));
    // Frozen parts come from the first-stage file or the init checkpoint.
    let fs_vars: Vec<_> = frozen
        .iter()
        .filter(|(k, _)| k.starts_with("first_stage_model."))
        .cloned()
        .collect();
    let other_frozen: Vec<_> = frozen
        .iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .cloned()
        .collect();
    if !fs_vars.is_empty() {
        let store = fs_store.as_ref().or(init_store.as_ref()).ok_or_else(|| {
            TrainError::invalid(
                "first_stage",
                "this model has a first stage: name a trained autoencoder (`first_stage = ...`)",
            )
        })?;
        load_into(&fs_vars, store, true, "first stage")?;
    }
    if !other_frozen.is_empty() {
        let store = init_store.as_ref().ok_or_else(|| {
            TrainError::invalid(
                "init",
                "the frozen text encoder needs weights: name a checkpoint holding it (`init = ...`)",
            )
        })?;
        load_into(&other_frozen, store, true, "frozen text encoder")?;
    }
    let mut models = models;
    let (trainable, lora) = match (&recipe.lora, &init_store) {
        (Some(r), Some(store)) => {
            // The UNet's weights live (once) in the LoRA backend; the VarMap copy is dropped with `trainable`.
            let l = LoraTrain::new(r, store, &spec, recipe.train.seed, device)?;
            models.unet = l.unet(&spec)?;
            (l.named_vars(), Some(l))
        }
        (Some(_), None) => {
            return Err(TrainError::invalid(
                "lora",
                "LoRA fine-tuning adapts an existing model: name it with `init = ...`",
            ))
        }
        (None, store) => {
            if let Some(store) = store {
                load_into(&trainable, store, true, "trained model")?;
            }
            (trainable, None)
        }
    };
    let schedule = Schedule::from_config(&spec.scheduler, SamplerKind::Ddim).map_err(model_err)?;
    let prediction = match spec.prediction() {
        PredictionType::Epsilon => Prediction::Epsilon,
        PredictionType::VPrediction => Prediction::V,
    };
    Ok(Setup {
        lora,
        objective: DiffusionObjective::new(schedule, prediction).with_loss_type(cfg.loss_type),
        concat,
        scale_by_std: cfg.scale_by_std,
        spec,
        models,
        trainable,
        frozen,
    })
}

/// One latent per example: the posterior moments (KL: mean and log-variance, concatenated on channels) or the
/// latent (VQ: before quantisation, as the LDM's `get_first_stage_encoding` uses; identity: the image).
fn encode_moments(first_stage: &FirstStage, x: &Tensor) -> candle_core::Result<Tensor> {
    match first_stage.encode(x)? {
        Encoded::Posterior(p) => Tensor::cat(&[&p.mean, &p.logvar], 1),
        Encoded::Latent(z) => Ok(z),
    }
}

/// z = scale · sample: draws the posterior noise from `rng` for KL moments.
fn sample_latent(
    spec: &ModelSpec,
    moments: &Tensor,
    scale: f64,
    rng: &mut TorchRng,
) -> Result<Tensor> {
    let z = match spec.first_stage {
        FirstStageSpec::Kl(_) => {
            let c = moments.dim(1)? / 2;
            let mean = moments.narrow(1, 0, c)?;
            let std = (moments.narrow(1, c, c)? * 0.5)?.exp()?;
            let noise =
                Tensor::from_vec(rng.randn(mean.elem_count()), mean.shape(), mean.device())?;
            (mean + (std * noise)?)?
        }
        _ => moments.clone(),
    };
    Ok((z * scale)?)
}

/// The UNet's context for one batch, with condition dropout: class labels (dropped to the null class) or
/// captions (dropped to the empty prompt), or none.
fn context(
    s: &Setup,
    labels: &[Option<usize>],
    captions: &[Option<String>],
    p: f64,
    rng: &mut TorchRng,
) -> Result<Option<Tensor>> {
    let b = labels.len();
    match &s.spec.cond {
        CondSpec::None => Ok(None),
        CondSpec::Class(c) => {
            let mut ids = Vec::with_capacity(b);
            for l in labels {
                ids.push(l.ok_or_else(|| {
                    TrainError::invalid("data", "a class-conditional model needs a label for every image")
                })?);
            }
            if p > 0.0 {
                let null = c.null_class.ok_or_else(|| {
                    TrainError::invalid(
                        "train.cond_drop",
                        "label dropout needs a null class: give the ClassEmbedder `ucg_rate` > 0 in the \
                         model YAML (its last row is then the null class)",
                    )
                })?;
                for (id, drop) in ids.iter_mut().zip(dropout_mask(rng, b, p)?) {
                    if drop {
                        *id = null;
                    }
                }
            }
            Ok(Some(s.models.encode_classes(&ids).map_err(model_err)?))
        }
        CondSpec::Text(_) => {
            let keep = if p > 0.0 { dropout_mask(rng, b, p)? } else { vec![false; b] };
            let prompts: Vec<&str> = captions
                .iter()
                .zip(keep)
                .map(|(c, drop)| if drop { "" } else { c.as_deref().unwrap_or("") })
                .collect();
            Ok(Some(s.models.encode_prompts(&prompts).map_err(model_err)?))
        }
        CondSpec::Layout { .. } => Err(TrainError::invalid(
            "model",
            "layout-to-image training needs box annotations, which the data readers do not read yet",
        )),
    }
}

/// Runs (or resumes) the training a recipe describes; `on_event` sees progress. Returns when the steps are done
/// or `opts.stop` is raised (after saving a checkpoint).
pub fn train_ldm(
    recipe: &LdmRecipe,
    recipe_text: &str,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let device = Device::Cpu;
    let t = &recipe.train;
    let (ckpts, resume_from) = open_run(opts, t.keep_checkpoints)?;
    let s = build(recipe, &device)?;
    on_event(Event::Message(format!(
        "model: {} ({}), {} trainable tensors ({:.2} M parameters), {} frozen",
        s.spec.describe(),
        s.spec.conditioning(),
        s.trainable.len(),
        s.trainable
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>() as f64
            / 1e6,
        s.frozen.len()
    )));
    let (ds, report) = open_dataset(&recipe.data)?;
    if let Some(r) = &report {
        if !r.skipped.is_empty() {
            on_event(Event::Message(format!("data: {r}")));
        }
    }
    check_data(&s, &ds)?;
    on_event(Event::Message(format!(
        "data: {} images of {}²",
        ds.len(),
        recipe.data.size
    )));

    // Encode the data set once (posterior moments), or per step: always for concatenation models, whose
    // extra channels are made from each image (random masks, degraded copies).
    if t.cache_latents && !s.concat.is_none() {
        on_event(Event::Message(
            "latents are encoded at every step: the concatenated condition is made from each image"
                .into(),
        ));
    }
    let cache = if t.cache_latents && s.concat.is_none() {
        let fs = &s.models.first_stage;
        let c = LatentCache::encode(&ds, t.batch_size, &device, |x| {
            Ok(encode_moments(fs, &match_channels(x, &s.spec)?)?)
        })?;
        on_event(Event::Message(format!(
            "latents cached: {:?}",
            c.latents().dims()
        )));
        Some(c)
    } else {
        None
    };
    let n = cache.as_ref().map_or(ds.len(), |c| c.len());
    // Concatenation models show their work on the first training images.
    let examples = if s.concat.is_none() {
        None
    } else {
        let mut r = TorchRng::new(t.seed);
        let k = recipe.sample.count.min(ds.len());
        let items = (0..k)
            .map(|i| Ok(ds.get(i, &mut r)?.image))
            .collect::<Result<Vec<_>>>()?;
        Some(match_channels(&Tensor::stack(&items, 0)?, &s.spec)?)
    };
    let loader_cfg = LoaderConfig {
        batch_size: t.batch_size,
        shuffle: true,
        drop_last: n >= t.batch_size,
        seed: t.seed,
    };
    let mut optim = AdamW::new(s.trainable.clone(), adamw_config(t, t.lr))?;
    let mut ema = t
        .ema_decay
        .map(|d| Ema::new(&s.trainable, d, true))
        .transpose()?;
    let schedule = lr_schedule(t);
    schedule.validate()?;

    // Start or resume.
    let (mut step, mut rng, mut loader, latent_scale) = match &resume_from {
        Some(path) => {
            let (ck, state, rng): (_, RunState, _) = load_checkpoint(path, KIND)?;
            restore_params(&s.trainable, &ck.model)?;
            if let Some(opt) = ck.optimizers.get("optim") {
                optim.load_state(opt)?;
            }
            if let (Some(e), Some(st)) = (ema.as_mut(), ck.ema.as_ref()) {
                e.load_state(st)?;
            }
            on_event(Event::Message(format!(
                "resumed from {} at step {}",
                path.display(),
                ck.step
            )));
            (
                ck.step,
                rng,
                Loader::resume(loader_cfg, state.loader)?,
                state.latent_scale,
            )
        }
        _ => {
            let scale = if s.scale_by_std {
                // LDM's `on_train_batch_start`: 1/std of the first batch's latents, fixed from then on. A
                // copy of the loader and generator is used so the training stream is unchanged.
                let mut probe_rng = TorchRng::new(t.seed ^ 0x5ca1e);
                let mut probe = Loader::new(loader_cfg.clone(), n)?;
                let moments = match &cache {
                    Some(c) => probe.next_batch(c, &device)?.images,
                    None => {
                        let b = probe.next_batch(&ds, &device)?;
                        encode_moments(&s.models.first_stage, &match_channels(&b.images, &s.spec)?)?
                    }
                };
                let z = sample_latent(&s.spec, &moments, 1.0, &mut probe_rng)?;
                let std = z.flatten_all()?.to_vec1::<f32>()?;
                let mean = std.iter().map(|&v| v as f64).sum::<f64>() / std.len() as f64;
                let var = std.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()
                    / (std.len().max(2) - 1) as f64;
                let scale = 1.0 / var.sqrt().max(1e-8);
                on_event(Event::Message(format!(
                    "scale_by_std: latent scale {scale:.5}"
                )));
                scale
            } else {
                s.spec.latent_scale
            };
            (0, TorchRng::new(t.seed), Loader::new(loader_cfg, n)?, scale)
        }
    };
    let total = opts.max_steps.unwrap_or(t.steps);
    let mut log = JsonlLog::append(&opts.out.join("train.jsonl"))?;
    let started = Instant::now();
    log.event(step, 0.0, if step > 0 { "resume" } else { "start" })?;
    on_event(Event::Start {
        from_step: step,
        total,
    });
    let save = |step: u64,
                rng: &TorchRng,
                loader: &Loader,
                optim: &AdamW,
                ema: &Option<Ema>|
     -> Result<PathBuf> {
        let state = RunState {
            recipe: recipe_text.to_string(),
            loader: loader.position(),
            latent_scale,
        };
        let ck = TrainCheckpoint {
            model_kind: KIND.into(),
            step,
            config: serde_json::to_string(&state)
                .map_err(|e| TrainError::invalid("run state", e.to_string()))?,
            rng: BTreeMap::from([("noise".to_string(), rng.state())]),
            model: snapshot(&s.trainable)?,
            ema: ema.as_ref().map(|e| e.state()),
            optimizers: BTreeMap::from([("optim".to_string(), optim.state())]),
        };
        ckpts.save(&ck)
    };
    let vars: Vec<Var> = s.trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut acc = GradAccumulator::new(vars.clone());
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
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
        let mut loss_sum = 0.0;
        let lora_unet = s.lora.as_ref().map(|l| l.unet(&s.spec)).transpose()?;
        let unet = lora_unet.as_ref().unwrap_or(&s.models.unet);
        for _ in 0..t.grad_accum {
            let (moments, images, labels, captions) = match &cache {
                Some(c) => {
                    let b = loader.next_batch(c, &device)?;
                    (b.images, None, b.labels, b.captions)
                }
                None => {
                    let b = loader.next_batch(&ds, &device)?;
                    let x = match_channels(&b.images, &s.spec)?;
                    let m = encode_moments(&s.models.first_stage, &x)?;
                    (m.detach(), Some(x), b.labels, b.captions)
                }
            };
            let z0 = sample_latent(&s.spec, &moments, latent_scale, &mut rng)?;
            let concat = match &images {
                Some(x) => s.concat.inputs(
                    x,
                    s.spec.vae_factor(),
                    &s.models.first_stage,
                    latent_scale,
                    &mut rng,
                )?,
                None => Default::default(),
            };
            let ctx = context(&s, &labels, &captions, t.cond_drop, &mut rng)?;
            let (loss, _) = s.objective.training_loss(&z0, &mut rng, |zt, tt| {
                let input = match &concat.extra {
                    Some(e) => Tensor::cat(&[zt, e], 1)?,
                    None => zt.clone(),
                };
                unet.forward_with(&input, tt, ctx.as_ref(), concat.y.as_ref())
            })?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let grads = (loss / t.grad_accum as f64)?.backward()?;
            acc.add(&grads)?;
        }
        let mut grads = acc.take();
        let grad_norm = match t.clip_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, &vars, max)?,
            None => f64::NAN,
        };
        let lr = schedule.lr_at(step, t.lr);
        optim.step(&grads, lr)?;
        if let Some(e) = ema.as_mut() {
            e.update()?;
        }
        step += 1;
        last_loss = loss_sum / t.grad_accum as f64;
        let mut vals = vec![("loss", last_loss), ("lr", lr)];
        if grad_norm.is_finite() {
            vals.push(("grad_norm", grad_norm));
        }
        after_step(
            t,
            &clock,
            &mut log,
            on_event,
            step,
            last_loss,
            lr,
            &vals,
            &mut || save(step, &rng, &loader, &optim, &ema),
        )?;
        if t.sample_every > 0 && step % t.sample_every == 0 && step < total {
            let grid = export_and_sample(
                &s,
                ema.as_mut(),
                &opts.out.join("samples"),
                recipe,
                latent_scale,
                examples.as_ref(),
                &opts.out.join("samples").join(format!("step-{step:06}.png")),
            )?
            .1;
            on_event(Event::Saved(&grid));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ckpt = save(step, &rng, &loader, &optim, &ema)?;
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
    let curve = opts.out.join("loss.png");
    crate::plot::write_png(&curve, &crate::log::read_series(log.path(), "train")?)?;
    let (exported, grid) = export_and_sample(
        &s,
        ema.as_mut(),
        &opts.out,
        recipe,
        latent_scale,
        examples.as_ref(),
        &opts.out.join("samples.png"),
    )?;
    on_event(Event::Saved(&exported));
    on_event(Event::Saved(&grid));
    summary.exported = Some(exported);
    summary.samples = Some(grid);
    summary.loss_curve = Some(curve);
    Ok(summary)
}

/// Single-channel data for a 3-channel first stage is repeated over the channels.
fn match_channels(x: &Tensor, spec: &ModelSpec) -> Result<Tensor> {
    crate::setup::match_channels(x, image_channels(spec))
}

fn check_data(s: &Setup, ds: &impl Dataset) -> Result<()> {
    crate::setup::check_channels(ds, image_channels(&s.spec))
}

/// Exports into `dir` (`model.safetensors` + `model.yaml`, or `lora.safetensors` for a LoRA run) and samples a
/// grid from it into `grid` (a LoRA run: the `init` model with the LoRA merged at weight 1). Returns both paths.
fn export_and_sample(
    s: &Setup,
    ema: Option<&mut Ema>,
    dir: &Path,
    recipe: &LdmRecipe,
    latent_scale: f64,
    examples: Option<&Tensor>,
    grid: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let seed = recipe.train.seed;
    match (&s.lora, &recipe.init) {
        (Some(l), Some(init)) => {
            let path = dir.join("lora.safetensors");
            export_lora(l, ema, &path, init)?;
            let loras = [(path.clone(), 1.0)];
            let g = crate::grid::sample_grid(
                init,
                Some(&recipe.model),
                &loras,
                recipe,
                examples,
                grid,
                seed,
            )?;
            Ok((path, g))
        }
        _ => {
            let path = export(s, ema, &dir.join("model.safetensors"), recipe, latent_scale)?;
            let g = crate::grid::sample_grid(&path, None, &[], recipe, examples, grid, seed)?;
            Ok((path, g))
        }
    }
}

/// Writes the adapters (EMA values when kept) as a kohya LoRA file.
fn export_lora(l: &LoraTrain, ema: Option<&mut Ema>, path: &Path, init: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    let base = init
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta = std::collections::HashMap::from([
        ("ss_sd_model_name".to_string(), base),
        ("ldm_rs_trainer".to_string(), "ldm train".to_string()),
    ]);
    let swapped = match ema {
        Some(e) => {
            e.swap()?;
            Some(e)
        }
        None => None,
    };
    let saved = save_kohya(path, &l.set, &meta, l.save_dtype);
    if let Some(e) = swapped {
        e.swap()?;
    }
    saved
}

/// Writes the model in the original single-file layout (EMA weights when kept, as the LDM's `model_ema`
/// swap does for sampling) with the recipe's model YAML beside it; returns the weights' path.
fn export(
    s: &Setup,
    ema: Option<&mut Ema>,
    path: &Path,
    recipe: &LdmRecipe,
    latent_scale: f64,
) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    let swapped = match ema {
        Some(e) => {
            e.swap()?;
            Some(e)
        }
        None => None,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in s.trainable.iter().chain(s.frozen.iter()) {
        tensors.push((k.clone(), v.as_tensor().copy()?));
    }
    if let Some(e) = swapped {
        e.swap()?;
    }
    if s.scale_by_std {
        tensors.push((
            "scale_factor".into(),
            Tensor::new(latent_scale as f32, &Device::Cpu)?,
        ));
    }
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(path, &refs, &meta)?;
    let yaml =
        std::fs::read_to_string(&recipe.model).map_err(|e| TrainError::io(&recipe.model, e))?;
    let yaml_path = path.with_extension("yaml");
    ldm_core::image::write_atomic(&yaml_path, yaml.as_bytes())?;
    Ok(path.to_path_buf())
}

/// Raised by Ctrl-C handlers; checked before every step.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
