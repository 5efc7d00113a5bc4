//! Vector quantisation of the VQ-regularised first stage (Rombach et al. 2022, §3 and App. G: "a vector
//! quantization layer [...] absorbed by the decoder"; van den Oord et al. 2017, Esser et al. 2021). The layer is
//! taming-transformers' `VectorQuantizer2` (`taming/modules/vqvae/quantize.py`, used by
//! `ldm/models/autoencoder.py::VQModel` of CompVis/latent-diffusion@a506df5) at inference: no loss, no remapping.
//!
//! | paper / original                         | here                                    |
//! |------------------------------------------|-----------------------------------------|
//! | codebook `e_k`, k < `n_embed` (`quantize.embedding.weight`) | [`VectorQuantizer::codebook`] `[n_embed, embed_dim]` |
//! | `k*(i,j) = argmin_k ‖h_ij − e_k‖²`        | [`VectorQuantizer::indices`] `[B, h, w]` (`sane_index_shape`) |
//! | `z_q(i,j) = e_{k*(i,j)}`                  | [`VectorQuantizer::lookup`] `[B, embed_dim, h, w]` |
//!
//! Distances are computed as `‖h‖² + ‖e‖² − 2·h·e` in f32, as the original does; ties go to the lowest index
//! (torch's `argmin`). Remapped codebooks (`remap` with a `quantize.used` buffer) are not supported: their
//! extra buffer is reported as an unused weight by a strict loader.
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// The output of [`VectorQuantizer::quantize`].
#[derive(Debug, Clone)]
pub struct Quantized {
    /// The nearest codebook entries, `[B, embed_dim, h, w]` (dtype of the codebook).
    pub z_q: Tensor,
    /// Their indices into the codebook, `[B, h, w]`, `u32`.
    pub indices: Tensor,
}

/// `VectorQuantizer2` at inference: nearest-neighbour lookup in a learned codebook.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    codebook: Tensor, // [n_embed, embed_dim]
    /// `codebook` in f32 and its squared norms, for the distances.
    codebook_f32: Tensor, // [n_embed, embed_dim]
    norms: Tensor,    // [1, n_embed]
}

impl VectorQuantizer {
    /// `vb` at the quantiser's key (e.g. `first_stage_model.quantize`); reads `embedding.weight`.
    pub fn new(n_embed: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        if n_embed == 0 || embed_dim == 0 {
            candle_core::bail!(
                "VectorQuantizer: empty codebook (n_embed {n_embed}, embed_dim {embed_dim})"
            );
        }
        let vb = vb.pp("embedding");
        // Name a codebook of the wrong shape in the model's terms before the generic shape error (backends
        // that cannot hand out a tensor without a shape, like `VarBuilder::zeros`, skip this check).
        if let Ok(found) = vb.get_unchecked("weight") {
            if found.dims() != [n_embed, embed_dim] {
                candle_core::bail!(
                    "VQ codebook `{}.weight` is {:?}, but the config says n_embed = {n_embed} entries of \
                     embed_dim = {embed_dim} channels",
                    vb.prefix(),
                    found.dims()
                );
            }
        }
        Self::from_codebook(
            vb.get((n_embed, embed_dim), "weight")?
                .to_dtype(vb.dtype())?,
        )
    }

    /// A quantiser over the rows of `codebook` `[n_embed, embed_dim]`.
    pub fn from_codebook(codebook: Tensor) -> Result<Self> {
        let (n_embed, _) = codebook.dims2()?;
        if n_embed == 0 {
            candle_core::bail!("VectorQuantizer: the codebook has no entries");
        }
        let codebook_f32 = codebook.to_dtype(DType::F32)?;
        let norms = codebook_f32.sqr()?.sum_keepdim(1)?.t()?.contiguous()?; // [1, n_embed]
        Ok(Self {
            codebook,
            codebook_f32,
            norms,
        })
    }

    /// The codebook `[n_embed, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    pub fn n_embed(&self) -> usize {
        self.norms.dims()[1]
    }

    pub fn embed_dim(&self) -> usize {
        self.codebook.dims()[1]
    }

    fn check_channels(&self, what: &str, c: usize) -> Result<()> {
        if c != self.embed_dim() {
            candle_core::bail!(
                "VectorQuantizer::{what}: the latent has {c} channels but the codebook entries have embed_dim = {} \
                 ({} entries); the latent must come from this model's quant_conv",
                self.embed_dim(),
                self.n_embed()
            );
        }
        Ok(())
    }

    /// Index of the nearest codebook entry for every pixel of `h` `[B, embed_dim, h, w]` → `[B, h, w]` (`u32`).
    pub fn indices(&self, h: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = h.dims4()?;
        self.check_channels("indices", c)?;
        let flat = h
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .reshape((b * hh * ww, c))?; // [N, D]
        let h_norms = flat.sqr()?.sum_keepdim(1)?; // [N, 1]
        let dots = flat.matmul(&self.codebook_f32.t()?)?; // [N, K]
        let dist = (dots * -2.0)?
            .broadcast_add(&h_norms)?
            .broadcast_add(&self.norms)?; // ‖h‖² + ‖e‖² − 2·h·e
        dist.argmin(D::Minus1)?.reshape((b, hh, ww))
    }

    /// Codebook entries of `indices` `[B, h, w]` (any integer dtype) → `[B, embed_dim, h, w]`
    /// (taming's `get_codebook_entry`). Fails for indices outside the codebook.
    pub fn lookup(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, hh, ww) = indices.dims3()?;
        let flat = indices.to_dtype(DType::U32)?.flatten_all()?;
        let max = if flat.elem_count() == 0 {
            0
        } else {
            flat.max(0)?.to_scalar::<u32>()? as usize
        };
        if flat.elem_count() > 0 && max >= self.n_embed() {
            candle_core::bail!(
                "VectorQuantizer::lookup: index {max} is outside the codebook of {} entries",
                self.n_embed()
            );
        }
        self.codebook
            .index_select(&flat, 0)? // [N, D]
            .reshape((b, hh, ww, self.embed_dim()))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// Nearest codebook entries and their indices for `h` `[B, embed_dim, h, w]`.
    pub fn quantize(&self, h: &Tensor) -> Result<Quantized> {
        let indices = self.indices(h)?;
        let z_q = self.lookup(&indices)?;
        Ok(Quantized { z_q, indices })
    }
}

/// The output of [`VectorQuantizer::forward_train`].
#[derive(Debug, Clone)]
pub struct QuantizedTrain {
    /// Straight-through quantised latent `z + sg(z_q − z)`, `[B, embed_dim, h, w]`: its values are the codebook
    /// entries, its gradient goes to `z` unchanged.
    pub z_q: Tensor,
    /// The codebook and commitment loss (scalar), see [`VectorQuantizer::forward_train`].
    pub loss: Tensor,
    /// Indices of the chosen entries, `[B, h, w]`, `u32`.
    pub indices: Tensor,
}

impl VectorQuantizer {
    /// `VectorQuantizer2.forward` in training: nearest entries of the CURRENT codebook (distances are computed
    /// afresh, so a codebook updated in place by an optimiser is seen), the straight-through estimator and the
    /// loss. With `legacy = true` (the default of `VectorQuantizer2`, which LDM's `VQModel` keeps) the loss is
    /// `mean((sg[z_q] − z)²) + β·mean((z_q − sg[z])²)`, i.e. β weighs the codebook term (a bug the original
    /// keeps for compatibility); with `legacy = false` it is `β·mean((sg[z_q] − z)²) + mean((z_q − sg[z])²)`
    /// (β on the commitment term, as in van den Oord et al.). LDM uses β = 0.25.
    pub fn forward_train(&self, z: &Tensor, beta: f64, legacy: bool) -> Result<QuantizedTrain> {
        let (b, c, hh, ww) = z.dims4()?;
        self.check_channels("forward_train", c)?;
        let codebook = self.codebook.to_dtype(DType::F32)?;
        let flat = z
            .to_dtype(DType::F32)?
            .detach()
            .permute((0, 2, 3, 1))?
            .reshape((b * hh * ww, c))?; // [N, D]
        let norms = codebook.sqr()?.sum_keepdim(1)?.t()?; // [1, K]
        let dist = (flat.matmul(&codebook.t()?)? * -2.0)?
            .broadcast_add(&flat.sqr()?.sum_keepdim(1)?)?
            .broadcast_add(&norms)?; // [N, K]
        let indices = dist.argmin(D::Minus1)?; // [N]
        let z_q = codebook
            .index_select(&indices, 0)? // [N, D], differentiable in the codebook
            .reshape((b, hh, ww, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_dtype(z.dtype())?;
        let commit = (z_q.detach() - z)?.sqr()?.mean_all()?; // moves the encoder
        let embed = (&z_q - z.detach())?.sqr()?.mean_all()?; // moves the codebook
        let loss = if legacy {
            (commit + (embed * beta)?)?
        } else {
            ((commit * beta)? + embed)?
        };
        let z_st = (z + (z_q - z)?.detach())?;
        Ok(QuantizedTrain {
            z_q: z_st,
            loss,
            indices: indices.reshape((b, hh, ww))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn picks_the_nearest_entry_and_looks_it_up() -> Result<()> {
        let dev = Device::Cpu;
        let codebook = Tensor::new(&[[0f32, 0.], [1., 0.], [0., 1.], [-1., -1.]], &dev)?;
        let vq = VectorQuantizer::from_codebook(codebook)?;
        // pixels (0.9, 0.2), (0.1, 0.1), (-0.4, -0.7), (0.2, 3.0) in a [1, 2, 2, 2] latent
        let h = Tensor::new(
            &[[[0.9f32, 0.1], [-0.4, 0.2]], [[0.2, 0.1], [-0.7, 3.0]]],
            &dev,
        )?
        .unsqueeze(0)?;
        let q = vq.quantize(&h)?;
        assert_eq!(
            q.indices.to_vec3::<u32>()?,
            vec![vec![vec![1, 0], vec![3, 2]]]
        );
        let want =
            Tensor::new(&[[[1f32, 0.], [-1., 0.]], [[0., 0.], [-1., 1.]]], &dev)?.unsqueeze(0)?;
        assert_eq!((q.z_q - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn training_forward_is_straight_through_and_weighs_beta_as_the_original() -> Result<()> {
        let dev = Device::Cpu;
        for (legacy, codebook_scale) in [(true, 0.25f32), (false, 1.0)] {
            let cb = candle_core::Var::new(&[[0f32, 0.], [1., 0.]], &dev)?;
            let z = candle_core::Var::new(&[[[[0.9f32]], [[0.2]]]], &dev)?; // [1, 2, 1, 1]
            let vq = VectorQuantizer::from_codebook(cb.as_tensor().clone())?;
            let q = vq.forward_train(z.as_tensor(), 0.25, legacy)?;
            assert_eq!(q.indices.flatten_all()?.to_vec1::<u32>()?, vec![1]);
            assert_eq!(q.z_q.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 0.0]);
            // mse(z_q, z) = (0.1² + 0.2²)/2 = 0.025, counted (1 + β) times either way.
            let loss = q.loss.to_scalar::<f32>()?;
            assert!((loss - 1.25 * 0.025).abs() < 1e-7, "{loss}");
            // The codebook term 2(z_q − z)/N carries β only in the legacy form.
            let g = q.loss.backward()?;
            let gc = g
                .get(cb.as_tensor())
                .map(|t| t.to_vec2::<f32>())
                .transpose()?;
            let row = gc.map(|r| r[1].clone()).unwrap_or_default();
            let want = [0.1 * codebook_scale, -0.2 * codebook_scale];
            assert!(
                (row[0] - want[0]).abs() < 1e-6 && (row[1] - want[1]).abs() < 1e-6,
                "{row:?}"
            );
            // Straight through: d(sum z_q)/dz = 1.
            let g = q.z_q.sum_all()?.backward()?;
            let gz = g
                .get(z.as_tensor())
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            assert_eq!(gz, Some(vec![1.0, 1.0]));
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_channels_and_out_of_range_indices() -> Result<()> {
        let dev = Device::Cpu;
        let vq = VectorQuantizer::from_codebook(Tensor::zeros((4, 3), DType::F32, &dev)?)?;
        let err = vq
            .indices(&Tensor::zeros((1, 2, 2, 2), DType::F32, &dev)?)
            .expect_err("2 channels against embed_dim 3");
        assert!(err.to_string().contains("embed_dim = 3"), "{err}");
        let err = vq
            .lookup(&Tensor::new(&[[[4u32]]], &dev)?)
            .expect_err("index 4 of 4 entries");
        assert!(err.to_string().contains("index 4"), "{err}");
        Ok(())
    }
}
