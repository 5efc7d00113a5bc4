//! `ldm train` and `ldm train-autoencoder`: run a recipe with a progress bar; Ctrl-C stops after the current
//! step with a checkpoint (resume with `--resume`).
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ldm_train::recipe::{AutoencoderRecipe, LdmRecipe};
use ldm_train::{Event, RunOptions, Summary};

#[derive(Args)]
pub struct TrainArgs {
    /// The recipe: a TOML file naming the model YAML, the data and the optimisation settings.
    #[arg(long, value_name = "RECIPE.toml")]
    config: PathBuf,
    /// The run folder (checkpoints, train.jsonl, samples, the exported model). Default: runs/<recipe name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop at this step (a partial run; --resume continues it). Default: the recipe's steps.
    #[arg(long)]
    stop_at: Option<u64>,
}

impl TrainArgs {
    fn options(&self) -> anyhow::Result<RunOptions> {
        let out = match &self.out {
            Some(o) => o.clone(),
            None => {
                let stem = self
                    .config
                    .file_stem()
                    .context("the recipe path has no file name")?;
                PathBuf::from("runs").join(stem)
            }
        };
        let mut opts = RunOptions::new(out);
        opts.resume = self.resume;
        opts.max_steps = self.stop_at;
        let stop = opts.stop.clone();
        // A second Ctrl-C while the checkpoint is written ends the process at once (the checkpoint writer is
        // atomic, so nothing corrupt is left).
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step (a checkpoint is saved; Ctrl-C again to quit now)"
            );
        })
        .context("installing the Ctrl-C handler")?;
        Ok(opts)
    }
}

/// A progress bar fed by training events.
fn reporter() -> (ProgressBar, impl FnMut(Event<'_>)) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("invariant: the template is valid"),
    );
    let b = bar.clone();
    // Without a terminal the bar is hidden and so is its println: messages then go to stderr as plain lines.
    let say = move |b: &ProgressBar, m: String| {
        if b.is_hidden() {
            eprintln!("{m}");
        } else {
            b.println(m);
        }
    };
    let on_event = move |e: Event<'_>| match e {
        Event::Message(m) => say(&b, m),
        Event::Start { from_step, total } => {
            b.set_length(total);
            b.set_position(from_step);
            b.reset_eta();
        }
        Event::Step {
            step,
            loss,
            lr,
            steps_per_s,
            ..
        } => {
            b.set_position(step);
            b.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {steps_per_s:.2} steps/s"
            ));
        }
        Event::Saved(p) => say(&b, format!("wrote {}", p.display())),
    };
    (bar, on_event)
}

fn report(s: &Summary) {
    if s.interrupted {
        eprintln!(
            "stopped at step {}; checkpoint {} (continue with --resume)",
            s.step,
            s.checkpoint.display()
        );
        return;
    }
    if let Some(m) = &s.exported {
        let is_lora = m.file_name().is_some_and(|n| n == "lora.safetensors");
        println!(
            "{}: {}",
            if is_lora { "lora" } else { "model" },
            m.display()
        );
    }
    for p in [&s.samples, &s.loss_curve].into_iter().flatten() {
        println!("wrote {}", p.display());
    }
}

pub fn run_ldm(a: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let recipe = LdmRecipe::load(&a.config)?;
    let opts = a.options()?;
    let (bar, mut on_event) = reporter();
    let s = ldm_train::ldm::train_ldm(&recipe, &text, &opts, &mut on_event);
    bar.finish_and_clear();
    report(&s?);
    Ok(())
}

pub fn run_autoencoder(a: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let recipe = AutoencoderRecipe::load(&a.config)?;
    let opts = a.options()?;
    let (bar, mut on_event) = reporter();
    let s = ldm_train::autoencoder::train_autoencoder(&recipe, &text, &opts, &mut on_event);
    bar.finish_and_clear();
    report(&s?);
    Ok(())
}
