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
    Start { from_step: u64, total: u64 },
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
