//! Which timesteps a sampler visits for a given step count, exactly as each diffusers scheduler's
//! `set_timesteps` picks them (reference: huggingface/diffusers v0.42.1). Four families differ in detail:
//!
//! * DDIM and DDPM: integer timesteps, descending.
//! * PNDM/PLMS: the same integer grid ascending, from which the PLMS call list is built.
//! * Euler, Euler ancestral, Heun, LMS: f32 timesteps (fractional for `linspace`), σ interpolated over t.
//! * DPM-Solver multistep: integer timesteps from `steps + 1` points with the last dropped.
//!
//! For `trailing` spacing numpy's `arange(T, 0, -T/steps)` is one element too long for some step counts
//! (61, 103, 121, ... of 1000), which makes diffusers append a timestep −1; here the intended `steps`
//! timesteps are kept.

use crate::config::Spacing;
use crate::error::{Result, SamplingError};
use crate::schedule::{np_arange, np_linspace};

fn check_range(ts: Vec<i64>, train: usize) -> Result<Vec<usize>> {
    ts.into_iter()
        .map(|t| {
            usize::try_from(t).ok().filter(|&t| t < train).ok_or_else(|| {
                SamplingError::Config(format!(
                    "timestep {t} is outside the {train} training steps (steps_offset too large for this step count?)"
                ))
            })
        })
        .collect()
}

fn round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `np.round(np.arange(train, 0, -train/steps))`, `steps` values, descending.
fn trailing_rounded(train: usize, steps: usize) -> Vec<i64> {
    np_arange(train as f64, -(train as f64 / steps as f64), steps)
        .into_iter()
        .map(round)
        .collect()
}

/// DDIM / DDPM `set_timesteps`: descending integer timesteps.
pub(crate) fn discrete(
    spacing: Spacing,
    steps: usize,
    train: usize,
    offset: usize,
) -> Result<Vec<usize>> {
    let ts: Vec<i64> = match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(round)
            .collect(),
        Spacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (train / steps) + offset) as i64)
            .collect(),
        Spacing::Trailing => trailing_rounded(train, steps)
            .into_iter()
            .map(|t| t - 1)
            .collect(),
    };
    check_range(ts, train)
}

/// PNDM's `_timesteps`: the same integer timesteps as [`discrete`], ascending.
pub(crate) fn pndm_ascending(
    spacing: Spacing,
    steps: usize,
    train: usize,
    offset: usize,
) -> Result<Vec<usize>> {
    let mut ts = discrete(spacing, steps, train, offset)?;
    ts.reverse();
    Ok(ts)
}

/// Euler-type `set_timesteps`: descending f32 timesteps (returned widened).
pub(crate) fn continuous(
    spacing: Spacing,
    steps: usize,
    train: usize,
    offset: usize,
) -> Result<Vec<f64>> {
    let ts: Vec<f32> = match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (train / steps)) as f32 + offset as f32)
            .collect(),
        Spacing::Trailing => trailing_rounded(train, steps)
            .into_iter()
            .map(|t| t as f32 - 1.0)
            .collect(),
    };
    if let Some(t) = ts
        .iter()
        .find(|&&t| !(0.0..=(train - 1) as f32).contains(&t))
    {
        return Err(SamplingError::Config(format!(
            "timestep {t} is outside the {train} training steps (steps_offset too large for this step count?)"
        )));
    }
    Ok(ts.into_iter().map(f64::from).collect())
}

/// DPM-Solver multistep `set_timesteps` (with `lambda_min_clipped = -inf`): descending integer timesteps.
pub(crate) fn dpm(
    spacing: Spacing,
    steps: usize,
    train: usize,
    offset: usize,
) -> Result<Vec<usize>> {
    let ts: Vec<i64> = match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps + 1)
            .into_iter()
            .rev()
            .take(steps)
            .map(round)
            .collect(),
        Spacing::Leading => (1..=steps)
            .rev()
            .map(|i| (i * (train / (steps + 1)) + offset) as i64)
            .collect(),
        Spacing::Trailing => trailing_rounded(train, steps)
            .into_iter()
            .map(|t| t - 1)
            .collect(),
    };
    check_range(ts, train)
}
