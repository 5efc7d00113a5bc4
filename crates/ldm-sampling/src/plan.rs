//! Choosing a sampler and its grid: [`prepare`] turns (sampler, scheduler config, steps, karras, η) into a
//! [`Plan`] that reproduces the matching diffusers scheduler, and [`run`] runs it from unit noise.
//!
//! Image-to-image and inpainting (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
//! Stochastic Differential Equations", §3: perturb the input to an intermediate noise level t₀ = strength·T,
//! then solve the reverse process from there) start part-way down the same grid: [`prepare_img2img`] drops
//! the first [`start_step`] steps exactly as diffusers' img2img/inpaint pipelines' `get_timesteps` does
//! (`init_timestep = min(int(steps·strength), steps)`, `t_start = steps − init_timestep`,
//! `timesteps[t_start·order:]`, `set_begin_index`), [`add_noise`] puts clean latents at the plan's first level
//! as each diffusers scheduler's `add_noise` does, and [`run_latents`] runs the plan from those latents.
//!
//! A `Plan` is plain data built once per request (STYLE P3): no scheduler object, no step counter.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use ldm_core::rng::NoiseRng;

use crate::config::{SchedulerConfig, Spacing};
use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::{Result, SamplingError};
use crate::samplers::{self, DiscreteStep, KnownRegion, NoiseAt, Step};
use crate::schedule::{karras_sigmas, BetaSchedule, Schedule};
use crate::timesteps;

/// The samplers, by their CLI names, and the diffusers scheduler each reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `ddim`: DDIMScheduler (η from the request).
    Ddim,
    /// `plms`: PNDMScheduler with `skip_prk_steps` (pseudo linear multistep).
    Plms,
    /// `ddpm`: DDPMScheduler, `fixed_small` variance.
    Ddpm,
    /// `euler`: EulerDiscreteScheduler.
    Euler,
    /// `euler-a`: EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// `heun`: HeunDiscreteScheduler.
    Heun,
    /// `lms`: LMSDiscreteScheduler (order 4).
    Lms,
    /// `dpmpp-2m`: DPMSolverMultistepScheduler, `dpmsolver++`, order 2, midpoint, `lower_order_final`.
    DpmPp2m,
}

const NAMES: &str = "ddim, plms, ddpm, euler, euler-a, heun, lms, dpmpp-2m";

impl SamplerKind {
    pub const ALL: [SamplerKind; 8] = [
        Self::Ddim,
        Self::Plms,
        Self::Ddpm,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::Lms,
        Self::DpmPp2m,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Plms => "plms",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Heun => "heun",
            Self::Lms => "lms",
            Self::DpmPp2m => "dpmpp-2m",
        }
    }

    /// The diffusers class's default `timestep_spacing` (used when the config has none).
    pub fn default_spacing(self) -> Spacing {
        match self {
            Self::Ddim | Self::Plms | Self::Ddpm => Spacing::Leading,
            _ => Spacing::Linspace,
        }
    }

    /// Whether the diffusers class has `use_karras_sigmas`. EulerAncestralDiscreteScheduler (v0.42.1) has
    /// not: diffusers ignores the flag for it, and so does [`prepare`].
    pub fn supports_karras(self) -> bool {
        matches!(self, Self::Euler | Self::Heun | Self::Lms | Self::DpmPp2m)
    }

    /// Whether η is used (DDIM only; diffusers passes `eta` only to schedulers whose `step` takes it).
    pub fn uses_eta(self) -> bool {
        self == Self::Ddim
    }

    /// Whether the sampler draws noise while sampling (then its output depends on the [`NoiseRng`]).
    pub fn is_stochastic(self, eta: f64) -> bool {
        matches!(self, Self::Ddpm | Self::EulerAncestral) || (self == Self::Ddim && eta > 0.0)
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = SamplingError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| SamplingError::UnknownSampler {
                name: s.to_string(),
                expected: NAMES,
            })
    }
}

/// The grid one sampler walks, with its options.
#[derive(Debug, Clone, PartialEq)]
pub enum Grid {
    Ddim {
        steps: Vec<DiscreteStep>,
        eta: f64,
        clip: Option<f64>,
    },
    /// One entry per model call (steps + 1 of them).
    Plms {
        calls: Vec<DiscreteStep>,
    },
    Ddpm {
        steps: Vec<DiscreteStep>,
        clip: Option<f64>,
    },
    /// `levels` are the σ grid (descending) followed by σ = 0, here and below.
    Euler {
        levels: Vec<NoiseLevel>,
    },
    EulerAncestral {
        levels: Vec<NoiseLevel>,
    },
    Heun {
        levels: Vec<NoiseLevel>,
        clip: Option<f64>,
    },
    /// LMS keeps the whole grid: diffusers ties its order and nodes to the absolute index (see
    /// [`samplers::lms`]); the run starts at `levels[first]`.
    Lms {
        levels: Vec<NoiseLevel>,
        first: usize,
    },
    DpmPp2m {
        levels: Vec<NoiseLevel>,
    },
}

/// Everything needed to sample: built by [`prepare`], consumed by [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// diffusers' `init_noise_sigma`: the initial latents are unit noise times this (1 for DDIM, PLMS, DDPM
    /// and DPM-Solver; σ_max for Euler-type samplers, or √(σ_max²+1) with `leading` spacing).
    pub init_noise_sigma: f64,
    pub grid: Grid,
}

impl Plan {
    pub fn kind(&self) -> SamplerKind {
        match self.grid {
            Grid::Ddim { .. } => SamplerKind::Ddim,
            Grid::Plms { .. } => SamplerKind::Plms,
            Grid::Ddpm { .. } => SamplerKind::Ddpm,
            Grid::Euler { .. } => SamplerKind::Euler,
            Grid::EulerAncestral { .. } => SamplerKind::EulerAncestral,
            Grid::Heun { .. } => SamplerKind::Heun,
            Grid::Lms { .. } => SamplerKind::Lms,
            Grid::DpmPp2m { .. } => SamplerKind::DpmPp2m,
        }
    }

    /// The σ grid the run walks, from its first evaluation down to the final 0 (Euler-type and DPM-Solver
    /// plans), `None` for DDIM/PLMS/DDPM.
    pub fn levels(&self) -> Option<&[NoiseLevel]> {
        match &self.grid {
            Grid::Euler { levels }
            | Grid::EulerAncestral { levels }
            | Grid::Heun { levels, .. }
            | Grid::DpmPp2m { levels } => Some(levels),
            Grid::Lms { levels, first } => levels.get(*first..),
            Grid::Ddim { .. } | Grid::Plms { .. } | Grid::Ddpm { .. } => None,
        }
    }

    /// The level of the first model evaluation, in the scaling diffusers holds its latents in (`None` for a
    /// plan with no steps). This is where [`add_noise`] puts clean latents.
    pub fn start_level(&self) -> Option<NoiseAt> {
        let vp = |s: &[DiscreteStep]| {
            s.first().map(|s| NoiseAt::Vp {
                alpha_bar: s.alpha_bar,
            })
        };
        match &self.grid {
            Grid::Ddim { steps, .. } | Grid::Ddpm { steps, .. } | Grid::Plms { calls: steps } => {
                vp(steps)
            }
            Grid::DpmPp2m { levels } => first_sigma(levels).map(|sigma| NoiseAt::Vp {
                // DPM-Solver keeps VP latents: α_t x₀ + σ_t ε with α_t = 1/√(σ²+1), σ_t = σ α_t.
                alpha_bar: 1.0 / (sigma * sigma + 1.0),
            }),
            _ => self
                .levels()
                .and_then(first_sigma)
                .map(|sigma| NoiseAt::Ve { sigma }),
        }
    }

    /// Where the model is evaluated, call by call (what diffusers' `scheduler.timesteps` lists; Heun
    /// evaluates every inner level twice, PLMS its second timestep twice).
    pub fn evaluations(&self) -> Vec<NoiseLevel> {
        match &self.grid {
            Grid::Ddim { steps, .. } | Grid::Plms { calls: steps } | Grid::Ddpm { steps, .. } => {
                steps.iter().map(DiscreteStep::level).collect()
            }
            Grid::Heun { levels, .. } => samplers::heun_evaluations(levels),
            Grid::Euler { levels } | Grid::EulerAncestral { levels } | Grid::DpmPp2m { levels } => {
                inner_levels(levels)
            }
            Grid::Lms { levels, first } => inner_levels(levels.get(*first..).unwrap_or_default()),
        }
    }

    /// Number of model calls (the length of the progress bar).
    pub fn model_calls(&self) -> usize {
        self.evaluations().len()
    }
}

/// The levels before the final σ = 0.
fn inner_levels(levels: &[NoiseLevel]) -> Vec<NoiseLevel> {
    levels
        .split_last()
        .map(|(_, inner)| inner.to_vec())
        .unwrap_or_default()
}

/// σ of the first evaluation of a grid ending at 0 (`None` when only the final 0 is left).
fn first_sigma(levels: &[NoiseLevel]) -> Option<f64> {
    (levels.len() >= 2).then(|| levels[0].sigma)
}

/// Builds the plan for `steps` steps of `kind` under `config`, as diffusers' `Scheduler.from_config(config,
/// use_karras_sigmas=karras).set_timesteps(steps)` would set it up. `karras` is ORed with the config's
/// `use_karras_sigmas` and ignored for samplers whose diffusers class lacks it (see
/// [`SamplerKind::supports_karras`]); `eta` is used by DDIM only.
pub fn prepare(
    kind: SamplerKind,
    config: &SchedulerConfig,
    steps: usize,
    karras: bool,
    eta: f64,
) -> Result<Plan> {
    build(kind, config, steps, karras, eta, 0)
}

/// diffusers' `get_timesteps(steps, strength)`: how many of the `steps` an img2img or inpainting run at
/// `strength` skips, `t_start = steps − min(⌊steps·strength⌋, steps)`. `strength` must lie in [0, 1]. All
/// `steps` are skipped when ⌊steps·strength⌋ = 0 (diffusers refuses that case; here the run is then the
/// identity on the image latents).
pub fn start_step(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(SamplingError::Strength(strength));
    }
    let init = ((steps as f64 * strength) as usize).min(steps);
    Ok(steps - init)
}

/// The plan of [`prepare`] started part-way down its grid, as diffusers' img2img and inpainting pipelines run
/// it at `strength`: the first [`start_step`] steps (× the scheduler's order: Heun's doubled evaluation list,
/// PLMS's call list) are dropped, and the rest is stepped exactly as the diffusers scheduler does with its
/// `begin_index` there. That includes two diffusers behaviours kept on purpose: PLMS restarts its
/// multistep warm-up (the second remaining call redoes the first step, from t + T/steps) wherever the list is
/// cut, and LMS keeps its absolute-index order (see [`samplers::lms`]). `strength = 1` gives [`prepare`]'s
/// plan; a strength with ⌊steps·strength⌋ = 0 gives a plan with no steps.
pub fn prepare_img2img(
    kind: SamplerKind,
    config: &SchedulerConfig,
    steps: usize,
    karras: bool,
    eta: f64,
    strength: f64,
) -> Result<Plan> {
    let skip = start_step(steps, strength)?;
    build(kind, config, steps, karras, eta, skip)
}

/// `prepare` with the first `skip` steps dropped (`skip <= steps`).
fn build(
    kind: SamplerKind,
    config: &SchedulerConfig,
    steps: usize,
    karras: bool,
    eta: f64,
    skip: usize,
) -> Result<Plan> {
    config.check_supported(kind)?;
    let resolved = config.resolved(kind);
    let schedule = Schedule::from_config(config, kind)?;
    let train = schedule.train_steps();
    if steps == 0 || steps > train {
        return Err(SamplingError::Steps { steps, max: train });
    }
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(SamplingError::Config(format!(
            "eta must be a finite number >= 0, got {eta}"
        )));
    }
    let karras = (karras || config.use_karras_sigmas) && kind.supports_karras();
    let (spacing, offset) = (resolved.spacing, config.steps_offset);
    let ab = |t: usize| schedule.alpha_bar(t);
    let final_alpha_bar = if resolved.set_alpha_to_one {
        1.0
    } else {
        ab(0)
    };
    let stride = train / steps;
    let discrete = |t: usize, from: usize, to: Option<usize>, last: f64| DiscreteStep {
        t: t as f64,
        alpha_bar: ab(t),
        alpha_bar_from: ab(from),
        alpha_bar_to: to.map_or(last, ab),
    };
    let grid = match kind {
        SamplerKind::Ddim => {
            let ts = timesteps::discrete(spacing, steps, train, offset)?;
            let steps = ts[skip..]
                .iter()
                .map(|&t| discrete(t, t, t.checked_sub(stride), final_alpha_bar))
                .collect();
            Grid::Ddim {
                steps,
                eta,
                clip: resolved.clip,
            }
        }
        SamplerKind::Ddpm => {
            let ts = timesteps::discrete(spacing, steps, train, offset)?;
            let steps = ts
                .iter()
                .enumerate()
                .skip(skip)
                .map(|(i, &t)| discrete(t, t, ts.get(i + 1).copied(), 1.0))
                .collect();
            Grid::Ddpm {
                steps,
                clip: resolved.clip,
            }
        }
        SamplerKind::Plms => {
            let asc = timesteps::pndm_ascending(spacing, steps, train, offset)?;
            let n = asc.len();
            // PNDM with skip_prk_steps: the second-highest timestep is visited twice.
            let mut order: Vec<usize> = asc[..n - 1].to_vec();
            order.extend_from_slice(&asc[n.saturating_sub(2)..n - 1]);
            order.push(asc[n - 1]);
            order.reverse();
            // Started part-way, PNDM's counter starts at the cut: its warm-up (below) restarts there. With every
            // step skipped nothing is left (diffusers' list would keep one call, which it refuses to run).
            let cut = if skip == steps { order.len() } else { skip };
            let calls = order[cut..]
                .iter()
                .enumerate()
                .map(|(k, &t)| {
                    // The second call redoes the first step from its start with the averaged output.
                    let (from, to) = if k == 1 {
                        (t + stride, Some(t))
                    } else {
                        (t, t.checked_sub(stride))
                    };
                    if from >= train {
                        return Err(SamplingError::Config(format!(
                            "PLMS step from timestep {from} >= {train}"
                        )));
                    }
                    Ok(discrete(t, from, to, final_alpha_bar))
                })
                .collect::<Result<Vec<_>>>()?;
            Grid::Plms { calls }
        }
        SamplerKind::Euler | SamplerKind::EulerAncestral | SamplerKind::Heun | SamplerKind::Lms => {
            let ts = timesteps::continuous(spacing, steps, train, offset)?;
            let sigmas: Vec<f64> = ts.iter().map(|&t| schedule.t_to_sigma(t)).collect();
            let (ts, sigmas) = if karras {
                let k = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps);
                (k.iter().map(|&s| schedule.sigma_to_t(s)).collect(), k)
            } else {
                (ts, sigmas)
            };
            let all = to_levels(&ts, &sigmas);
            let levels = all[skip..].to_vec();
            let sigma_max = all.iter().map(|l| l.sigma as f32).fold(0.0f32, f32::max);
            let init_noise_sigma = f64::from(if spacing == Spacing::Leading {
                (sigma_max * sigma_max + 1.0).sqrt()
            } else {
                sigma_max
            });
            let grid = match kind {
                SamplerKind::Euler => Grid::Euler { levels },
                SamplerKind::EulerAncestral => Grid::EulerAncestral { levels },
                SamplerKind::Heun => Grid::Heun {
                    levels,
                    clip: resolved.clip,
                },
                _ => Grid::Lms {
                    levels: all,
                    first: skip,
                },
            };
            return Ok(Plan {
                init_noise_sigma,
                grid,
            });
        }
        SamplerKind::DpmPp2m => {
            let table = schedule.sigmas();
            let (ts, sigmas): (Vec<f64>, Vec<f64>) = if karras {
                let k = karras_sigmas(table[0], table[train - 1], steps);
                let round = config.beta_schedule != BetaSchedule::SquaredcosCapV2;
                let ts = k.iter().map(|&s| schedule.sigma_to_t(s)).map(|t| {
                    if round {
                        t.round_ties_even()
                    } else {
                        t
                    }
                });
                (ts.collect(), k)
            } else {
                let ts = timesteps::dpm(spacing, steps, train, offset)?;
                (
                    ts.iter().map(|&t| t as f64).collect(),
                    ts.iter().map(|&t| table[t]).collect(),
                )
            };
            Grid::DpmPp2m {
                levels: to_levels(&ts, &sigmas)[skip..].to_vec(),
            }
        }
    };
    Ok(Plan {
        init_noise_sigma: 1.0,
        grid,
    })
}

/// Pairs (t, σ) rounded to f32 as diffusers stores them, and appends the final σ = 0.
fn to_levels(ts: &[f64], sigmas: &[f64]) -> Vec<NoiseLevel> {
    let mut levels: Vec<NoiseLevel> = ts
        .iter()
        .zip(sigmas)
        .map(|(&t, &s)| NoiseLevel {
            sigma: f64::from(s as f32),
            t: f64::from(t as f32),
        })
        .collect();
    levels.push(NoiseLevel { sigma: 0.0, t: 0.0 });
    levels
}

/// Samples from `noise` (unit-variance, [B, C, H, W]) along `plan`; returns the final latents as diffusers'
/// pipeline holds them before decoding. `rng` is used only by stochastic samplers, in diffusers' order (one
/// `randn` of the latent's size per step); `on_step` is called after every model evaluation.
pub fn run(
    plan: &Plan,
    denoiser: &dyn Denoiser,
    noise: &Tensor,
    rng: &mut dyn NoiseRng,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    let x = (noise * plan.init_noise_sigma)?;
    run_latents(plan, denoiser, x, rng, None, on_step)
}

/// diffusers' scheduler `add_noise` at the plan's first level (img2img's initial latents): √ᾱ x₀ + √(1−ᾱ) ε
/// for DDIM, PLMS, DDPM (ᾱ at the first timestep) and DPM-Solver (ᾱ = 1/(σ²+1), its VP latents),
/// x₀ + σ ε for Euler, Euler ancestral, Heun and LMS (σ of the first evaluation, Karras or not). For a plan
/// with no steps the latents stay clean. `x0` and `noise` are [B, C, H, W].
pub fn add_noise(plan: &Plan, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    match plan.start_level() {
        Some(at) => at.add_noise(x0, noise),
        None => Ok(x0.clone()),
    }
}

/// Runs `plan` from `latents` as diffusers' pipeline holds them before its loop (`noise · init_noise_sigma`
/// for txt2img, [`add_noise`] for img2img); returns the final latents. `keep` re-imposes a known region after
/// every update (inpainting with a plain UNet, see [`KnownRegion`]); its `latents` and `noise` are clean image
/// latents and unit noise, whatever the sampler's scaling. A plan with no steps returns `latents` unchanged.
pub fn run_latents(
    plan: &Plan,
    denoiser: &dyn Denoiser,
    latents: Tensor,
    rng: &mut dyn NoiseRng,
    keep: Option<&KnownRegion<'_>>,
    on_step: &mut dyn FnMut(Step<'_>),
) -> Result<Tensor> {
    if plan.model_calls() == 0 {
        return Ok(latents);
    }
    let x = latents;
    match &plan.grid {
        Grid::Ddim { steps, eta, clip } => {
            samplers::ddim(denoiser, x, steps, *eta, *clip, rng, keep, on_step)
        }
        Grid::Plms { calls } => samplers::plms(denoiser, x, calls, keep, on_step),
        Grid::Ddpm { steps, clip } => samplers::ddpm(denoiser, x, steps, *clip, rng, keep, on_step),
        Grid::Euler { levels } => samplers::euler(denoiser, x, levels, keep, on_step),
        Grid::EulerAncestral { levels } => {
            samplers::euler_ancestral(denoiser, x, levels, rng, keep, on_step)
        }
        Grid::Heun { levels, clip } => samplers::heun(denoiser, x, levels, *clip, keep, on_step),
        Grid::Lms { levels, first } => samplers::lms(denoiser, x, levels, *first, keep, on_step),
        Grid::DpmPp2m { levels } => {
            // diffusers runs DPM-Solver on VP latents; this one runs in VE scaling.
            let sigma = levels.first().map_or(0.0, |l| l.sigma);
            let x = (x * (sigma * sigma + 1.0).sqrt())?;
            samplers::dpmpp_2m(denoiser, x, levels, keep, on_step)
        }
    }
}
