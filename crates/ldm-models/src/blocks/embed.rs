//! Sinusoidal timestep embedding of the LDM / DDPM UNet.
//!
//! Vaswani et al. 2017 (§3.5) positional encoding applied to the diffusion timestep `t`, in the layout of
//! `ldm.modules.diffusionmodules.util.timestep_embedding` (CompVis/stable-diffusion @ 21f890f,
//! Stability-AI/stablediffusion @ cf1d67a): cosines first, then sines.
//!
//! | code         | math                                                     |
//! |--------------|----------------------------------------------------------|
//! | `t`          | model timestep tₖ (may be fractional)                    |
//! | `half`       | ⌊dim/2⌋                                                  |
//! | `freq[i]`    | ωᵢ = exp(−ln(max_period) · i / half), i = 0 … half−1      |
//! | output row   | [cos(t·ω₀) … cos(t·ω_{half−1}), sin(t·ω₀) … sin(t·ω_{half−1}), (0 if dim is odd)] |
//!
//! The frequencies are rounded exactly as torch rounds them: the product `−ln(max_period) · i` and the
//! division by `half` are f32 operations, `exp` gives the f32 nearest to the exact value, `t·ωᵢ` is an f32
//! product. Only `cos`/`sin` are evaluated more accurately than torch does (in f64, then rounded).
use candle_core::{DType, Result, Tensor};

/// The `max_period` every SD/LDM UNet uses.
pub const MAX_PERIOD: f64 = 10_000.0;

/// The frequencies ωᵢ, i = 0 … dim/2 − 1, rounded to f32 as torch computes them.
pub fn timestep_frequencies(dim: usize, max_period: f64) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(max_period.ln()) as f32; // the Python float becomes an f32 scalar in the tensor product
    (0..half)
        .map(|i| {
            let exponent = (neg_log * i as f32) / half as f32;
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// Embeds each timestep of `ts` into `dim` values (row-major `[ts.len(), dim]`).
pub fn timestep_embedding_values(ts: &[f32], dim: usize, max_period: f64) -> Vec<f32> {
    let freqs = timestep_frequencies(dim, max_period);
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &t in ts {
        let args = freqs.iter().map(|&w| (t * w) as f64);
        out.extend(args.clone().map(|a| a.cos() as f32));
        out.extend(args.map(|a| a.sin() as f32));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// `timestep_embedding(t, dim, max_period)` of the original code: `t` is `[B]` (any float or integer
/// dtype), the result is `[B, dim]` f32 on `t`'s device.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let ts = t.to_dtype(DType::F32)?.to_vec1::<f32>()?; // [B]
    let values = timestep_embedding_values(&ts, dim, max_period);
    Tensor::from_vec(values, (ts.len(), dim), t.device()) // [B, dim]
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values: torch 2.15.0, diffusers 0.42.1
    // `get_timestep_embedding(torch.tensor([0., 1., 17.5, 999.]), 320, flip_sin_to_cos=True,
    // downscale_freq_shift=0)`, the same numbers as the original `timestep_embedding(t, 320)`.
    // (index, f32 bit pattern) of torch's result.
    const TORCH_320: [((usize, usize), u32); 11] = [
        ((3, 0), 0x3f7fe90d),
        ((3, 1), 0x3f4d7c46),
        ((3, 37), 0x3f4bee60),
        ((3, 159), 0x3f7e916a),
        ((3, 160), 0xbcd8c438),
        ((3, 161), 0x3f18ae8b),
        ((3, 200), 0xbf170598),
        ((3, 319), 0x3dd85061),
        ((2, 5), 0x3f595593),
        ((2, 165), 0x3f0748c0),
        ((1, 100), 0x3f7fffac),
    ];

    #[test]
    fn embedding_matches_torch_320() {
        let v = timestep_embedding_values(&[0.0, 1.0, 17.5, 999.0], 320, MAX_PERIOD);
        for ((row, col), want) in TORCH_320 {
            let want = f32::from_bits(want);
            let got = v[row * 320 + col];
            // torch's vectorised f32 sin/cos are within 1 ulp; we round the f64 value.
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON,
                "[{row},{col}]: {got} vs {want}"
            );
        }
    }

    #[test]
    fn frequencies_match_torch_rounding() {
        let f = timestep_frequencies(320, MAX_PERIOD);
        assert_eq!(f.len(), 160);
        assert_eq!(f[0], 1.0);
        // torch: exp(-ln(1e4) * arange(160, dtype=float32) / 160) at 1, 37, 100, 159
        let want = [
            (1, 0.944_060_9_f32),
            (37, 0.118_850_23),
            (100, 0.003_162_276_7),
            (159, 0.000_105_925_37),
        ];
        for (i, w) in want {
            assert!(
                (f[i] - w).abs() <= w * f32::EPSILON,
                "freq {i}: {} vs {w}",
                f[i]
            );
        }
    }

    #[test]
    fn layout_is_cos_then_sin_with_zero_pad_for_odd_dims() {
        let v = timestep_embedding_values(&[0.0, 2.0], 5, MAX_PERIOD);
        assert_eq!(v.len(), 10);
        assert_eq!(&v[..5], &[1.0, 1.0, 0.0, 0.0, 0.0]);
        let w1 = timestep_frequencies(5, MAX_PERIOD)[1];
        assert_eq!(v[5], 2f64.cos() as f32);
        assert_eq!(v[6], ((2.0 * w1) as f64).cos() as f32);
        assert_eq!(v[7], 2f64.sin() as f32);
        assert_eq!(v[9], 0.0);
    }
}
