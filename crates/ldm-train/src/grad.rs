//! Gradient clipping by global norm and gradient accumulation over micro-batches.
//!
//! [`clip_grad_norm`] is `torch.nn.utils.clip_grad_norm_(params, max_norm)` (norm type 2, torch 2.15): the total
//! norm is the L2 norm of the per-parameter L2 norms, the clip coefficient is `max_norm / (total + 1e-6)` clamped
//! to at most 1, and every gradient is multiplied by it. All of it is float32 arithmetic, as in torch. On the CPU
//! the norms are summed in the order of torch's AVX2 reduction kernel (`norm_kernel_tensor_iterator_impl`:
//! eight lane accumulators, then a left fold of the lanes, then the tail), which makes the norm bit-identical to
//! torch's on x86-64 CPUs that torch runs with its AVX2 kernels (measured: tests/adamw_parity.rs).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Result, TrainError};

/// The L2 norm of `x` summed as torch's AVX2 CPU kernel sums it (float32 throughout).
///
/// Eight lanes accumulate `x·x` (rounded product, then rounded sum) over full blocks of eight; the lanes are
/// folded left into lane 0; the remaining `r = len mod 8` elements follow, the first four of them (when `r ≥ 4`)
/// with a rounded product and the rest with a fused multiply-add, as the shipped binary computes them.
pub fn torch_l2_norm(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let blocks = x.chunks_exact(8);
    let tail = blocks.remainder();
    for block in blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane += v * v;
        }
    }
    let mut acc = lanes[0];
    for &lane in &lanes[1..] {
        acc += lane;
    }
    let unfused = if tail.len() >= 4 { 4 } else { 0 };
    for (i, &v) in tail.iter().enumerate() {
        acc = if i < unfused {
            acc + v * v
        } else {
            v.mul_add(v, acc)
        };
    }
    acc.sqrt()
}

/// The L2 norm of one gradient as an f32 (exact torch order on the CPU for f32, a candle reduction otherwise).
fn grad_norm(g: &Tensor) -> Result<f32> {
    if g.device().is_cpu() && g.dtype() == DType::F32 {
        let v = g.flatten_all()?.to_vec1::<f32>()?;
        return Ok(torch_l2_norm(&v));
    }
    let sum_sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
    Ok(sum_sq.sqrt()?.to_scalar::<f32>()?)
}

/// Scales the gradients of `vars` in place so that their total L2 norm is at most `max_norm`, and returns the
/// total norm before clipping (as `torch.nn.utils.clip_grad_norm_` does). Vars without a gradient are ignored;
/// with no gradients at all the norm is 0. A non-finite norm is returned as is (the gradients then become
/// non-finite too, as in torch with `error_if_nonfinite=False`); check the returned value to skip such a step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(TrainError::invalid(
            "max_grad_norm",
            format!("{max_norm} is not a positive number"),
        ));
    }
    let mut norms = Vec::with_capacity(vars.len());
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            norms.push(grad_norm(g)?);
        }
    }
    if norms.is_empty() {
        return Ok(0.0);
    }
    let total = torch_l2_norm(&norms);
    // `max_norm / (total + 1e-6)` on a float32 tensor: torch evaluates `python_float / tensor` as
    // `tensor.reciprocal() * python_float`.
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm as f32;
    let coef = if coef > 1.0 { 1.0 } else { coef }; // torch.clamp(max=1.0); NaN stays NaN
    if coef != 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let c = Tensor::new(coef, g.device())?.to_dtype(g.dtype())?;
                grads.insert(var.as_tensor(), g.broadcast_mul(&c)?);
            }
        }
    }
    Ok(f64::from(total))
}

/// Sums the gradients of several micro-batches for a fixed set of vars, so that one optimiser step sees the
/// gradient of a larger batch.
///
/// The accumulator adds gradients as they are (like PyTorch's `param.grad += ...`); it does not divide. To get
/// the mean over `k` micro-batches, scale each micro-batch loss by `1/k` before `backward`, as with PyTorch's
/// usual `(loss / accum_steps).backward()`; this also keeps the sums identical to a PyTorch run that does so.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sum: GradStore,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            sum: GradStore::default(),
            micro_batches: 0,
        }
    }

    /// Adds the gradients of the tracked vars found in `grads` (others are ignored).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for var in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let sum = match self.sum.get(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g.detach(),
            };
            self.sum.insert(var.as_tensor(), sum);
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// How many micro-batches were added since the last [`take`](Self::take).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradients; the accumulator starts over empty.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        std::mem::take(&mut self.sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn torch_norm_order_matches_exact_norm_closely() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let exact = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!((f64::from(torch_l2_norm(&x)) - exact).abs() < 1e-6 * exact);
        assert_eq!(torch_l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(torch_l2_norm(&[]), 0.0);
    }

    #[test]
    fn clipping_scales_to_max_norm_and_leaves_small_gradients_alone() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[0f32; 2], 2, &dev).expect("a");
        let b = Var::from_slice(&[0f32; 1], 1, &dev).expect("b");
        let c = Var::from_slice(&[0f32; 1], 1, &dev).expect("c"); // no gradient
        let vars = [a.clone(), b.clone(), c.clone()];
        let mut grads = GradStore::default();
        grads.insert(a.as_tensor(), Tensor::new(&[3f32, 0.0], &dev).expect("g"));
        grads.insert(b.as_tensor(), Tensor::new(&[4f32], &dev).expect("g"));
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).expect("clip");
        assert_eq!(norm, 5.0);
        let ga = grads
            .get(a.as_tensor())
            .expect("ga")
            .to_vec1::<f32>()
            .expect("v");
        let gb = grads
            .get(b.as_tensor())
            .expect("gb")
            .to_vec1::<f32>()
            .expect("v");
        let clipped = (ga[0].powi(2) + gb[0].powi(2)).sqrt();
        assert!((clipped - 1.0).abs() < 1e-6, "{clipped}");
        assert!(grads.get(c.as_tensor()).is_none());
        // already below the limit: untouched
        let norm = clip_grad_norm(&mut grads, &vars, 10.0).expect("clip");
        assert!((norm - 1.0).abs() < 1e-6);
        let ga2 = grads
            .get(a.as_tensor())
            .expect("ga")
            .to_vec1::<f32>()
            .expect("v");
        assert_eq!(ga, ga2);
        assert!(clip_grad_norm(&mut grads, &vars, 0.0).is_err());
    }

    #[test]
    fn accumulator_sums_micro_batches() {
        let dev = Device::Cpu;
        let w = Var::from_slice(&[1f32, 2.0], 2, &dev).expect("w");
        let mut acc = GradAccumulator::new(vec![w.clone()]);
        for k in 1..=3 {
            // loss_k = k·Σw  →  ∂/∂w = k
            let loss = (w.as_tensor().sum_all().expect("sum") * f64::from(k)).expect("scale");
            acc.add(&loss.backward().expect("backward")).expect("add");
        }
        assert_eq!(acc.micro_batches(), 3);
        let g = acc.take();
        assert_eq!(
            g.get(w.as_tensor())
                .expect("grad")
                .to_vec1::<f32>()
                .expect("v"),
            [6.0, 6.0]
        );
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.take().get(w.as_tensor()).is_none());
    }
}
