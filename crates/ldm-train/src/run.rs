//! What the trainers share with their callers: run options, progress events and the summary.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// How to run a recipe.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder (checkpoints, log, samples, exported model).
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Raised (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Stop at this step instead of the recipe's `steps` (a partial run; resume later to finish).
    pub max_steps: Option<u64>,
}

impl RunOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            stop: Arc::new(AtomicBool::new(false)),
            max_steps: None,
        }
    }
}

/// Progress of a run, for progress bars and logs.
#[derive(Debug)]
pub enum Event<'a> {
    Message(String),
    Start {
        from_step: u64,
        total: u64,
    },
    Step {
        step: u64,
        total: u64,
        loss: f64,
        lr: f64,
        steps_per_s: f64,
    },
    /// A file was written (checkpoint, sample grid, exported model).
    Saved(&'a Path),
}

/// The end of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Optimiser steps completed in total (including earlier runs resumed from).
    pub step: u64,
    /// Stopped by the stop flag before the last step.
    pub interrupted: bool,
    pub last_loss: f64,
    pub checkpoint: PathBuf,
    /// The exported model (when the recipe's steps are all done).
    pub exported: Option<PathBuf>,
    pub samples: Option<PathBuf>,
    pub loss_curve: Option<PathBuf>,
}

/// The run folder's checkpoint directory and the checkpoint to resume from. A folder that already holds
/// checkpoints is refused unless `opts.resume` (nothing of an earlier run is overwritten by accident).
pub(crate) fn open_run(
    opts: &RunOptions,
    keep: usize,
) -> crate::Result<(crate::checkpoint::CheckpointDir, Option<PathBuf>)> {
    std::fs::create_dir_all(&opts.out).map_err(|e| crate::TrainError::io(&opts.out, e))?;
    let ckpts = crate::checkpoint::CheckpointDir::new(opts.out.join("checkpoints"), keep)?;
    let latest = ckpts.latest()?;
    if latest.is_some() && !opts.resume {
        return Err(crate::TrainError::invalid(
            "out",
            format!(
                "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
                opts.out.display()
            ),
        ));
    }
    Ok((ckpts, latest.filter(|_| opts.resume)))
}

/// A checkpoint of `kind` with its run state and its `noise` generator.
pub(crate) fn load_checkpoint<S: serde::de::DeserializeOwned>(
    path: &Path,
    kind: &str,
) -> crate::Result<(
    crate::checkpoint::TrainCheckpoint,
    S,
    ldm_core::rng::TorchRng,
)> {
    let bad = |reason: String| crate::TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let ck = crate::checkpoint::TrainCheckpoint::load(path, &candle_core::Device::Cpu)?;
    if ck.model_kind != kind {
        return Err(bad(format!(
            "a `{}` checkpoint, this run trains `{kind}`",
            ck.model_kind
        )));
    }
    let state: S = serde_json::from_str(&ck.config).map_err(|e| bad(format!("run state: {e}")))?;
    let rng_state = ck
        .rng
        .get("noise")
        .ok_or_else(|| bad("no `noise` generator state".into()))?;
    let rng = ldm_core::rng::TorchRng::from_state(rng_state).map_err(|e| bad(e.to_string()))?;
    Ok((ck, state, rng))
}

/// Logs the last checkpoint of a run and returns the summary of a run that has not exported yet.
pub(crate) fn close_run(
    log: &mut crate::log::JsonlLog,
    on_event: &mut dyn FnMut(Event<'_>),
    step: u64,
    elapsed: f64,
    interrupted: bool,
    last_loss: f64,
    checkpoint: PathBuf,
) -> crate::Result<Summary> {
    let what = if interrupted {
        "interrupted"
    } else {
        "checkpoint"
    };
    log.event(step, elapsed, what)?;
    on_event(Event::Saved(&checkpoint));
    Ok(Summary {
        step,
        interrupted,
        last_loss,
        checkpoint,
        exported: None,
        samples: None,
        loss_curve: None,
    })
}

/// Where a run's loop stands, for [`after_step`].
pub(crate) struct StepClock {
    pub started: std::time::Instant,
    /// The step the run (re)started from.
    pub run_start: u64,
    pub total: u64,
}

/// The bookkeeping after an optimiser step, shared by the trainers: a non-finite loss saves a checkpoint and
/// stops the run with an error; `vals` are logged every `log_every` steps (and at the last); progress is
/// reported; every `checkpoint_every` steps a checkpoint is written. Returns the elapsed seconds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn after_step(
    t: &crate::recipe::TrainSettings,
    clock: &StepClock,
    log: &mut crate::log::JsonlLog,
    on_event: &mut dyn FnMut(Event<'_>),
    step: u64,
    loss: f64,
    lr: f64,
    vals: &[(&str, f64)],
    save: &mut dyn FnMut() -> crate::Result<PathBuf>,
) -> crate::Result<f64> {
    if !loss.is_finite() {
        save()?;
        return Err(crate::TrainError::invalid(
            "train",
            format!(
                "the loss became {loss} at step {step}: lower the learning rate (checkpoint saved)"
            ),
        ));
    }
    let elapsed = clock.started.elapsed().as_secs_f64();
    if step.is_multiple_of(t.log_every) || step == clock.total {
        log.write("train", step, elapsed, vals)?;
    }
    on_event(Event::Step {
        step,
        total: clock.total,
        loss,
        lr,
        steps_per_s: (step - clock.run_start) as f64 / elapsed.max(1e-9),
    });
    if step.is_multiple_of(t.checkpoint_every) && step < clock.total {
        let p = save()?;
        log.event(step, elapsed, "checkpoint")?;
        on_event(Event::Saved(&p));
    }
    Ok(elapsed)
}
