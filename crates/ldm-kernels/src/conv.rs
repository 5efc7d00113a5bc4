//! 2-D convolution (NCHW, f32, one group) on the CPU as im2col + GEMM, with its backward pass, as a candle
//! custom op. candle's own CPU convolution is fast enough forward, but its backward pass runs the input gradient
//! through a direct `conv_transpose2d` loop and the weight gradient as a convolution whose kernel is the whole
//! output gradient; here all three products are GEMMs (the `gemm` crate candle's matmul uses):
//!
//! * forward: `y_n[Cout, P] = W[Cout, K] · col(x_n)[K, P]`,
//! * input gradient: `dx_n = col2im(Wᵀ[K, Cout] · dy_n[Cout, P])`,
//! * weight gradient: `dW[Cout, K] = Σ_n dy_n[Cout, P] · col(x_n)ᵀ[P, K]`,
//!
//! with K = Cin·kh·kw and P = Ho·Wo. A 1×1 convolution with stride 1 and no padding uses x_n as its own column
//! matrix. Batches of at least as many items as threads run one item per task with a single-threaded GEMM;
//! smaller batches run item by item with a parallel GEMM. The column buffer of one item is the only extra memory
//! (K·P floats per task).
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::f32_slice;

mod winograd;

/// How the forward pass of a 3×3, stride-1 convolution runs on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Winograd F(4×4, 3×3) in inference (no operand tracks a gradient) when the batch has enough 4×4 output
    /// tiles (64 or more), im2col + GEMM otherwise. The default, unless the environment sets `LDM_CONV=im2col`.
    Auto,
    /// Always im2col + GEMM (the direct sum, with the smallest rounding error).
    Im2col,
    /// Winograd for every 3×3, stride-1 convolution in inference, whatever its size (tests; `LDM_CONV=winograd`).
    Winograd,
}

/// Chooses the forward algorithm for every later convolution in the process.
pub fn set_conv_algorithm(a: ConvAlgorithm) {
    winograd::set(a);
}

/// Stride, zero padding and dilation, the same in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
        }
    }
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    p: ConvParams,
}

impl Geometry {
    fn new(x: &[usize], k: &[usize], p: ConvParams) -> Result<Self> {
        let (&[n, cin, h, w], &[cout, kcin, kh, kw]) = (x, k) else {
            candle_core::bail!("conv2d: input {x:?} and kernel {k:?} must both be 4-D");
        };
        if kcin != cin {
            candle_core::bail!(
                "conv2d: input {x:?} has {cin} channels, the kernel {k:?} takes {kcin}"
            );
        }
        if p.stride == 0 || p.dilation == 0 {
            candle_core::bail!("conv2d: stride and dilation must be positive ({p:?})");
        }
        let out = |len: usize, k: usize| -> Option<usize> {
            let span = p.dilation * (k - 1) + 1;
            (len + 2 * p.padding)
                .checked_sub(span)
                .map(|r| r / p.stride + 1)
        };
        let (Some(ho), Some(wo)) = (out(h, kh), out(w, kw)) else {
            candle_core::bail!("conv2d: input {x:?} is smaller than the kernel {k:?} with {p:?}");
        };
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
            p,
        })
    }

    /// Rows of the column matrix.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output positions per item.
    fn positions(&self) -> usize {
        self.ho * self.wo
    }

    /// A 1×1, stride-1, unpadded convolution: the input is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == 1 && self.p.padding == 0
    }

    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.cout * self.positions()
    }

    /// The input coordinate of output coordinate `o` at kernel offset `k`, if inside.
    fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.p.stride + k * self.p.dilation)
            .checked_sub(self.p.padding)
            .filter(|&i| i < len)
    }
}

/// Output rows per column block: blocks keep the column matrix under this many floats (64 MiB), so a 512²
/// decoder convolution does not materialise its 1.2 GB im2col at once. Any value gives the same results (the
/// tests lower it to check the blocked path).
static COL_BUDGET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1 << 24);

fn row_blocks(g: &Geometry) -> impl Iterator<Item = std::ops::Range<usize>> {
    let budget = COL_BUDGET.load(std::sync::atomic::Ordering::Relaxed);
    let rows = (budget / (g.k() * g.wo).max(1)).clamp(1, g.ho);
    let ho = g.ho;
    (0..ho).step_by(rows).map(move |r| r..(r + rows).min(ho))
}

/// `col[K, rows·Wo]` of output rows `rows` of one item `x[Cin, H, W]`.
fn im2col(x: &[f32], g: &Geometry, rows: std::ops::Range<usize>, col: &mut [f32]) {
    let p = rows.len() * g.wo;
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..][..g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &mut col[((c * g.kh + ki) * g.kw + kj) * p..][..p];
                for (r, oy) in rows.clone().enumerate() {
                    let out = &mut row[r * g.wo..][..g.wo];
                    let Some(iy) = g.source(oy, ki, g.h) else {
                        out.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * g.w..][..g.w];
                    if g.p.stride == 1 {
                        // ix = ox + off − padding: one contiguous run between zero margins.
                        let off = kj * g.p.dilation;
                        let first = g.p.padding.saturating_sub(off).min(g.wo);
                        let last = (g.w + g.p.padding).saturating_sub(off).min(g.wo).max(first);
                        out[..first].fill(0.0);
                        if last > first {
                            let start = first + off - g.p.padding;
                            out[first..last].copy_from_slice(&src[start..start + (last - first)]);
                        }
                        out[last..].fill(0.0);
                    } else {
                        for (ox, o) in out.iter_mut().enumerate() {
                            *o = g.source(ox, kj, g.w).map_or(0.0, |ix| src[ix]);
                        }
                    }
                }
            }
        }
    }
}

/// `dx[Cin, H, W] += col2im(dcol[K, rows·Wo])` for output rows `rows`.
fn col2im_add(dcol: &[f32], g: &Geometry, rows: std::ops::Range<usize>, dx: &mut [f32]) {
    let p = rows.len() * g.wo;
    for c in 0..g.cin {
        let plane = &mut dx[c * g.h * g.w..][..g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &dcol[((c * g.kh + ki) * g.kw + kj) * p..][..p];
                for (r, oy) in rows.clone().enumerate() {
                    let Some(iy) = g.source(oy, ki, g.h) else {
                        continue;
                    };
                    let src = &row[r * g.wo..][..g.wo];
                    let dst = &mut plane[iy * g.w..][..g.w];
                    if g.p.stride == 1 {
                        // The run of ox whose ix = ox + off − padding is inside, as in im2col.
                        let off = kj * g.p.dilation;
                        let first = g.p.padding.saturating_sub(off).min(g.wo);
                        let last = (g.w + g.p.padding).saturating_sub(off).min(g.wo).max(first);
                        if last > first {
                            let start = first + off - g.p.padding;
                            let dst = &mut dst[start..start + (last - first)];
                            for (d, v) in dst.iter_mut().zip(&src[first..last]) {
                                *d += v;
                            }
                        }
                    } else {
                        for (ox, v) in src.iter().enumerate() {
                            if let Some(ix) = g.source(ox, kj, g.w) {
                                dst[ix] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A strided matrix view: `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub(crate) fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// `dst[i·dst_rs + j] = (that, if accumulate) + Σ_k lhs[i, k] · rhs[k, j]` for i < m, j < n.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let fits = |a: &Mat<'_>, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * a.rs + (cols - 1) * a.cs < a.data.len()
    };
    assert!(
        dst_rs >= n && (m - 1) * dst_rs + n <= dst.len(),
        "gemm: destination too small"
    );
    assert!(
        fits(&lhs, m, k) && fits(&rhs, k, n),
        "gemm: operand too small"
    );
    // SAFETY: the three views were checked above to lie inside their slices for the m×k, k×n and m×n index
    // ranges gemm reads and writes; `dst` is an exclusive borrow and does not alias the shared operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

fn gemm_threads(t: usize) -> Parallelism {
    if t > 1 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// Runs `f(item, out_chunk, par)` for every item: in parallel with single-threaded GEMMs when there are at
/// least as many items as threads, otherwise item by item with parallel GEMMs.
fn per_item(
    out: &mut [f32],
    chunk: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32], Parallelism) + Sync,
) {
    let t = threads();
    if n >= t && t > 1 {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, o)| f(i, o, Parallelism::None));
    } else {
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            f(i, o, gemm_threads(t));
        }
    }
}

/// The forward pass; `inference` (no gradient tracked) allows the Winograd path.
fn forward(x: &[f32], k: &[f32], bias: Option<&[f32]>, g: &Geometry, inference: bool) -> Vec<f32> {
    if inference && winograd::applies(g) {
        winograd::forward(x, k, bias, g)
    } else {
        forward_im2col(x, k, bias, g)
    }
}

/// The forward pass as im2col + GEMM.
fn forward_im2col(x: &[f32], k: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    let (kk, p) = (g.k(), g.positions());
    let mut y = vec![0f32; g.n * g.out_len()];
    // With a bias, every output row starts at its channel's bias and the GEMM accumulates onto it.
    let acc = bias.is_some();
    per_item(&mut y, g.out_len(), g.n, |i, out, par| {
        if let Some(b) = bias {
            for (row, &bv) in out.chunks_mut(p).zip(b) {
                row.fill(bv);
            }
        }
        let xi = &x[i * g.in_len()..][..g.in_len()];
        let w = Mat::rows(k, kk);
        if g.pointwise() {
            matmul((g.cout, p, kk), out, p, acc, w, Mat::rows(xi, p), par);
            return;
        }
        let mut col = Vec::new();
        for rows in row_blocks(g) {
            let pb = rows.len() * g.wo;
            col.resize(kk * pb, 0.0);
            im2col(xi, g, rows.clone(), &mut col);
            let dst = &mut out[rows.start * g.wo..];
            matmul((g.cout, pb, kk), dst, p, acc, w, Mat::rows(&col, pb), par);
        }
    });
    y
}

fn backward_input(dy: &[f32], k: &[f32], g: &Geometry) -> Vec<f32> {
    let (kk, p) = (g.k(), g.positions());
    let mut dx = vec![0f32; g.n * g.in_len()];
    // Wᵀ[K, Cout]: element (r, co) at co·K + r.
    let wt = Mat::transposed(k, kk);
    per_item(&mut dx, g.in_len(), g.n, |i, out, par| {
        let dyi = &dy[i * g.out_len()..][..g.out_len()];
        if g.pointwise() {
            matmul((kk, p, g.cout), out, p, false, wt, Mat::rows(dyi, p), par);
            return;
        }
        let mut dcol = Vec::new();
        for rows in row_blocks(g) {
            let pb = rows.len() * g.wo;
            dcol.resize(kk * pb, 0.0);
            let dyb = Mat::rows(&dyi[rows.start * g.wo..], p);
            matmul((kk, pb, g.cout), &mut dcol, pb, false, wt, dyb, par);
            col2im_add(&dcol, g, rows, out);
        }
    });
    dx
}

fn backward_weight(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let (kk, p) = (g.k(), g.positions());
    let wlen = g.cout * kk;
    // dW += dy_i[Cout, P] · col_iᵀ[P, K] for the items of one task, block by block.
    let accumulate_items = |items: std::ops::Range<usize>, dw: &mut [f32], par: Parallelism| {
        let mut col = Vec::new();
        let mut first = true;
        for i in items {
            let xi = &x[i * g.in_len()..][..g.in_len()];
            let dyi = &dy[i * g.out_len()..][..g.out_len()];
            if g.pointwise() {
                let colt = Mat::transposed(xi, p);
                matmul(
                    (g.cout, kk, p),
                    dw,
                    kk,
                    !first,
                    Mat::rows(dyi, p),
                    colt,
                    par,
                );
                first = false;
                continue;
            }
            for rows in row_blocks(g) {
                let pb = rows.len() * g.wo;
                col.resize(kk * pb, 0.0);
                im2col(xi, g, rows.clone(), &mut col);
                let dyb = Mat::rows(&dyi[rows.start * g.wo..], p);
                matmul(
                    (g.cout, kk, pb),
                    dw,
                    kk,
                    !first,
                    dyb,
                    Mat::transposed(&col, pb),
                    par,
                );
                first = false;
            }
        }
    };
    let t = threads();
    if g.n >= t && t > 1 {
        let per = g.n.div_ceil(t);
        let partial: Vec<Vec<f32>> = (0..g.n.div_ceil(per))
            .into_par_iter()
            .map(|c| {
                let mut dw = vec![0f32; wlen];
                accumulate_items(
                    c * per..((c + 1) * per).min(g.n),
                    &mut dw,
                    Parallelism::None,
                );
                dw
            })
            .collect();
        let mut dw = vec![0f32; wlen];
        for part in partial {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        dw
    } else {
        let mut dw = vec![0f32; wlen];
        accumulate_items(0..g.n, &mut dw, gemm_threads(t));
        dw
    }
}

/// A convolution: its parameters, and whether no gradient is tracked through it (inference).
struct Conv2dOp(ConvParams, bool);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ldm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.0)?;
        let y = forward(
            f32_slice(s1, l1, "conv2d", "input")?,
            f32_slice(s2, l2, "conv2d", "kernel")?,
            None,
            &g,
            self.1,
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(
            k,
            &InputGrad {
                params: self.0,
                input: x.dims().to_vec(),
            },
        )?;
        let dk = x.apply_op2_no_bwd(
            &dy,
            &WeightGrad {
                params: self.0,
                kernel: k.dims().to_vec(),
            },
        )?;
        Ok((Some(dx), Some(dk)))
    }
}

/// A convolution with its bias added in the same pass: (x, kernel, bias).
struct Conv2dBiasOp(ConvParams, bool);

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "ldm-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.0)?;
        let bias = f32_slice(s3, l3, "conv2d", "bias")?;
        if bias.len() != g.cout {
            candle_core::bail!(
                "conv2d: the bias has {} values, the kernel {} output channels",
                bias.len(),
                g.cout
            );
        }
        let y = forward(
            f32_slice(s1, l1, "conv2d", "input")?,
            f32_slice(s2, l2, "conv2d", "kernel")?,
            Some(bias),
            &g,
            self.1,
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dk) = Conv2dOp(self.0, self.1).bwd(x, k, y, dy)?;
        let db = dy
            .contiguous()?
            .apply_op1_no_bwd(&BiasGrad)?
            .reshape(b.shape())?;
        Ok((dx, dk, Some(db)))
    }
}

/// Σ over items and positions of `dy [N, C, H, W]`: `[C]`.
struct BiasGrad;

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "ldm-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l.dims() else {
            candle_core::bail!("conv2d bias gradient: {:?} is not 4-D", l.dims());
        };
        let dy = f32_slice(s, l, "conv2d", "gradient")?;
        let p = h * w;
        let db: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n)
                    .map(|i| {
                        dy[(i * c + ch) * p..][..p]
                            .iter()
                            .map(|&v| f64::from(v))
                            .sum::<f64>()
                    })
                    .sum::<f64>() as f32
            })
            .collect();
        Ok((CpuStorage::F32(db), Shape::from(c)))
    }
}

/// `dx` from (dy, kernel).
struct InputGrad {
    params: ConvParams,
    input: Vec<usize>,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "ldm-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.input, l2.dims(), self.params)?;
        if l1.dims() != [g.n, g.cout, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d backward: gradient {:?} does not match {g:?}",
                l1.dims()
            );
        }
        let dx = backward_input(
            f32_slice(s1, l1, "conv2d", "gradient")?,
            f32_slice(s2, l2, "conv2d", "kernel")?,
            &g,
        );
        Ok((CpuStorage::F32(dx), Shape::from(self.input.clone())))
    }
}

/// `dW` from (x, dy).
struct WeightGrad {
    params: ConvParams,
    kernel: Vec<usize>,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "ldm-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), &self.kernel, self.params)?;
        if l2.dims() != [g.n, g.cout, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d backward: gradient {:?} does not match {g:?}",
                l2.dims()
            );
        }
        let dw = backward_weight(
            f32_slice(s1, l1, "conv2d", "input")?,
            f32_slice(s2, l2, "conv2d", "gradient")?,
            &g,
        );
        Ok((CpuStorage::F32(dw), Shape::from(self.kernel.clone())))
    }
}

/// No operand carries a gradient. Training keeps the direct sum (im2col + GEMM) forward, so its losses and
/// gradients stay within 1e-5 of PyTorch's even where they are ill-conditioned (the adaptive GAN weight of the
/// autoencoder loss is a ratio of gradient norms through BatchNorm); inference takes Winograd's F(4×4, 3×3)
/// for 3×3 convolutions, whose extra rounding (up to about 3e-7 of Σ|x|·|k|) stays far below image precision.
fn inference(ts: &[&Tensor]) -> bool {
    !ts.iter().any(|t| t.track_op())
}

/// `x [N, Cin, H, W]` convolved with `kernel [Cout, Cin, kh, kw]` (cross-correlation, as torch): our kernels for
/// f32 on the CPU, candle's `conv2d` elsewhere (other dtypes, CUDA). Differentiable in both arguments.
pub fn conv2d(x: &Tensor, kernel: &Tensor, p: ConvParams) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && kernel.dtype() == DType::F32 {
        x.contiguous()?
            .apply_op2(&kernel.contiguous()?, Conv2dOp(p, inference(&[x, kernel])))
    } else {
        x.conv2d(kernel, p.padding, p.stride, p.dilation, 1)
    }
}

/// [`conv2d`] plus a per-channel `bias [Cout]`, added in the same pass on the CPU (its gradient is the sum of
/// the output gradient over items and positions).
pub fn conv2d_bias(x: &Tensor, kernel: &Tensor, bias: &Tensor, p: ConvParams) -> Result<Tensor> {
    if x.device().is_cpu() && [x.dtype(), kernel.dtype(), bias.dtype()] == [DType::F32; 3] {
        x.contiguous()?.apply_op3(
            &kernel.contiguous()?,
            &bias.contiguous()?,
            Conv2dBiasOp(p, inference(&[x, kernel, bias])),
        )
    } else {
        let y = x.conv2d(kernel, p.padding, p.stride, p.dilation, 1)?;
        y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{grad_gaps, max_rel};
    use candle_core::{Device, Var};

    /// Inference takes the Winograd path; a convolution whose operands track gradients computes the direct sum,
    /// bit for bit.
    #[test]
    fn training_keeps_the_direct_sum_and_inference_takes_winograd() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 32, 32), &dev)?;
        let k = Tensor::randn(0f32, 0.1, (8, 8, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let p = ConvParams {
            padding: 1,
            ..ConvParams::default()
        };
        let g = Geometry::new(x.dims(), k.dims(), p)?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (xs, ks, bs) = (flat(&x)?, flat(&k)?, flat(&b)?);
        let direct = forward_im2col(&xs, &ks, Some(&bs), &g);
        let wino = winograd::forward(&xs, &ks, Some(&bs), &g);
        assert_ne!(direct, wino, "the two algorithms round differently");
        let kv = Var::from_tensor(&k)?;
        assert_eq!(flat(&conv2d_bias(&x, kv.as_tensor(), &b, p)?)?, direct);
        if winograd::applies(&g) {
            assert_eq!(flat(&conv2d_bias(&x, &k, &b, p)?)?, wino);
        }
        Ok(())
    }

    /// Forward and both gradients against candle's own convolution, over shapes that cover padding, stride,
    /// dilation, 1×1 and non-square inputs, batches below and above the thread count.
    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        type Case = ((usize, usize, usize, usize), (usize, usize), ConvParams);
        let cases: &[Case] = &[
            // Padding wider than the output row at some kernel offsets (w 1, span 5, output 1).
            (
                (2, 2, 1, 1),
                (3, 3),
                ConvParams {
                    stride: 1,
                    padding: 2,
                    dilation: 2,
                },
            ),
            (
                (2, 3, 8, 8),
                (4, 3),
                ConvParams {
                    stride: 1,
                    padding: 1,
                    dilation: 1,
                },
            ),
            (
                (1, 4, 9, 7),
                (5, 3),
                ConvParams {
                    stride: 2,
                    padding: 1,
                    dilation: 1,
                },
            ),
            ((3, 6, 8, 8), (2, 1), ConvParams::default()),
            (
                (5, 2, 10, 6),
                (3, 3),
                ConvParams {
                    stride: 1,
                    padding: 2,
                    dilation: 2,
                },
            ),
            (
                (4, 3, 7, 7),
                (2, 4),
                ConvParams {
                    stride: 2,
                    padding: 1,
                    dilation: 1,
                },
            ),
            (
                (2, 3, 6, 6),
                (2, 3),
                ConvParams {
                    stride: 1,
                    padding: 0,
                    dilation: 1,
                },
            ),
            (
                (1, 3, 5, 5),
                (2, 1),
                ConvParams {
                    stride: 2,
                    padding: 0,
                    dilation: 1,
                },
            ),
        ];
        for &((n, c, h, w), (co, k), p) in cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?)?;
            let kern = Var::from_tensor(&Tensor::randn(0f32, 1.0, (co, c, k, k), &dev)?)?;
            let ours = conv2d(x.as_tensor(), kern.as_tensor(), p)?;
            let theirs =
                x.as_tensor()
                    .conv2d(kern.as_tensor(), p.padding, p.stride, p.dilation, 1)?;
            assert_eq!(ours.dims(), theirs.dims(), "{p:?}");
            assert!(max_rel(&ours, &theirs)? < 1e-5, "forward {p:?}");
            let gaps = grad_gaps(&ours, &theirs, &[&x, &kern])?;
            assert!(
                gaps.iter().all(|&e| e < 1e-5),
                "input, kernel gradients {p:?}: {gaps:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn column_blocks_of_one_output_row_give_the_same_results() -> Result<()> {
        // A budget below one row's columns: every block is one output row.
        COL_BUDGET.store(1, std::sync::atomic::Ordering::Relaxed);
        let r = matches_candle_forward_and_backward();
        COL_BUDGET.store(1 << 24, std::sync::atomic::Ordering::Relaxed);
        r
    }

    #[test]
    fn the_fused_bias_matches_an_added_bias() -> Result<()> {
        let dev = Device::Cpu;
        let p = ConvParams {
            stride: 1,
            padding: 1,
            dilation: 1,
        };
        for (n, pp) in [(3, p), (1, ConvParams::default())] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 4, 6, 5), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 3, 3), &dev)?)?;
            let k = if pp.padding == 0 {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 1, 1), &dev)?)?
            } else {
                k
            };
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 3, &dev)?)?;
            let fused = conv2d_bias(x.as_tensor(), k.as_tensor(), b.as_tensor(), pp)?;
            let added = x
                .as_tensor()
                .conv2d(k.as_tensor(), pp.padding, pp.stride, pp.dilation, 1)?
                .broadcast_add(&b.as_tensor().reshape((1, 3, 1, 1))?)?;
            assert!(max_rel(&fused, &added)? < 1e-5);
            let gaps = grad_gaps(&fused, &added, &[&x, &k, &b])?;
            assert!(gaps.iter().all(|&e| e < 1e-5), "{gaps:?}");
        }
        Ok(())
    }

    #[test]
    fn non_square_kernels_match_candle() -> Result<()> {
        // SSIM's separable Gaussian: 11×1 then 1×11, "valid".
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 1, 16, 14), &dev)?)?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 11, 1), &dev)?;
        let h = Tensor::randn(0f32, 1.0, (1, 1, 1, 11), &dev)?;
        let p = ConvParams::default();
        let ours = conv2d(&conv2d(x.as_tensor(), &v, p)?, &h, p)?;
        let theirs = x
            .as_tensor()
            .conv2d(&v, 0, 1, 1, 1)?
            .conv2d(&h, 0, 1, 1, 1)?;
        assert_eq!(ours.dims(), &[3, 1, 6, 4]);
        assert!(max_rel(&ours, &theirs)? < 1e-5);
        let gaps = grad_gaps(&ours, &theirs, &[&x])?;
        assert!(gaps[0] < 1e-5, "{gaps:?}");
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev)?;
        assert!(
            conv2d(&x, &k, ConvParams::default()).is_err(),
            "channel mismatch"
        );
        let k = Tensor::zeros((2, 3, 5, 5), DType::F32, &dev)?;
        assert!(
            conv2d(&x, &k, ConvParams::default()).is_err(),
            "kernel larger than the input"
        );
        Ok(())
    }
}
