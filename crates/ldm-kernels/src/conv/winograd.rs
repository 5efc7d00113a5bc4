//! The forward pass of a 3×3, stride-1, undilated convolution by Winograd's minimal filtering F(4×4, 3×3)
//! (Lavin & Gray 2016): each 4×4 output tile is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A for its 6×6 input patch d, so a
//! convolution costs 36 multiply-adds per input channel, output channel and tile where im2col + GEMM costs 144:
//! the channel sums become 36 GEMMs `M_ξ[Cout, T] = U_ξ[Cout, Cin] · V_ξ[Cin, T]`, one per point ξ of the 6×6
//! transform domain, over T tiles.
//!
//! Tiles are taken in blocks of whole tile rows (across items), so the transformed input and output of one block
//! stay near [`BLOCK_FLOATS`] each instead of 2.25× the activations. The transforms are passes of adds and small
//! multiples, vectorised along the tiles of a row.
//!
//! The interpolation points are 0, 1, −1, ½, −2 and ∞ rather than Lavin's 0, ±1, ±2, ∞: as Barabasz et al.
//! (2020, "Error analysis and improving the accuracy of Winograd convolution") found, this set rounds less; in
//! f32 the worst error falls from 2.0e-7 to 7.2e-8 of Σ|x|·|k| (im2col + GEMM: 1.5e-8), by the simulation of
//! tools/fixtures/winograd_points.py. It is still larger than im2col's, so only inference takes this path
//! (`super::conv2d`), and `LDM_CONV=im2col` turns it off.
use std::sync::atomic::{AtomicUsize, Ordering};

use gemm::Parallelism;
use rayon::prelude::*;

use super::{matmul, Geometry, Mat};
use crate::simd_fn;

/// Tile size m and transform size α = m + 2.
const M: usize = 4;
const A: usize = 6;
const POINTS: usize = A * A;

/// G (6×3), the filter transform, for the interpolation points 0, 1, −1, ½, −2 and ∞.
const G: [[f64; 3]; A] = [
    [1.0, 0.0, 0.0],
    [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
    [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
    [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
    [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// Floats of transformed input (and of transformed output) per block of tiles: 16 MiB each.
const BLOCK_FLOATS: usize = 1 << 22;

/// The fewest tiles (over the batch) for which the Winograd path is taken: below, the filter transform
/// (36·Cout·Cin values per call) and small GEMMs cost more than they save. `usize::MAX` turns the path off (the
/// `LDM_CONV=im2col` setting), 1 takes it for every size (`LDM_CONV=winograd`, to test it on small models); 0
/// means not yet read from the environment.
static MIN_TILES: AtomicUsize = AtomicUsize::new(0);
const DEFAULT_MIN_TILES: usize = 64;

/// Applies the caller's choice of algorithm.
pub(super) fn set(a: super::ConvAlgorithm) {
    let v = match a {
        super::ConvAlgorithm::Auto => DEFAULT_MIN_TILES,
        super::ConvAlgorithm::Im2col => usize::MAX,
        super::ConvAlgorithm::Winograd => 1,
    };
    MIN_TILES.store(v, Ordering::Relaxed);
}

fn min_tiles() -> usize {
    match MIN_TILES.load(Ordering::Relaxed) {
        0 => {
            let v = match std::env::var("LDM_CONV").as_deref() {
                Ok("im2col") => usize::MAX,
                Ok("winograd") => 1,
                _ => DEFAULT_MIN_TILES,
            };
            MIN_TILES.store(v, Ordering::Relaxed);
            v
        }
        v => v,
    }
}

/// Whether the convolution `g` runs here.
pub(super) fn applies(g: &Geometry) -> bool {
    let (th, tw) = tiles(g);
    g.kh == 3 && g.kw == 3 && g.p.stride == 1 && g.p.dilation == 1 && g.n * th * tw >= min_tiles()
}

/// Tile rows and columns per item.
fn tiles(g: &Geometry) -> (usize, usize) {
    (g.ho.div_ceil(M), g.wo.div_ceil(M))
}

/// `y [N, Cout, Ho, Wo]` (plus `bias`) for `x [N, Cin, H, W]` and `k [Cout, Cin, 3, 3]`.
pub(super) fn forward(x: &[f32], k: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f32> {
    forward_blocked(x, k, bias, g, BLOCK_FLOATS)
}

/// [`forward`] with blocks of about `block_floats` transformed values (any size gives the same results).
fn forward_blocked(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    g: &Geometry,
    block_floats: usize,
) -> Vec<f32> {
    let (th, tw) = tiles(g);
    let u = transform_filters(k, g.cout * g.cin);
    let mut y = vec![0f32; g.n * g.out_len()];
    let rows_per_block = (block_floats / (POINTS * g.cin.max(g.cout) * tw)).clamp(1, g.n * th);
    let mut v = Vec::new();
    let mut m = Vec::new();
    let mut start = 0;
    while start < g.n * th {
        let rows = start..(start + rows_per_block).min(g.n * th);
        let tb = rows.len() * tw;
        v.resize(POINTS * g.cin * tb, 0.0);
        m.resize(POINTS * g.cout * tb, 0.0);
        v.par_chunks_mut(POINTS * tb).enumerate().for_each_init(
            || vec![0f32; 2 * A * (M * tw + 2)],
            |buf, (ci, vc)| {
                for (i, r) in rows.clone().enumerate() {
                    let (n, ty) = (r / th, r % th);
                    let plane = &x[(n * g.cin + ci) * g.h * g.w..][..g.h * g.w];
                    input_row(plane, g, ty, tw, buf, vc, i * tw, tb);
                }
            },
        );
        // M_ξ = U_ξ · V_ξ, where V_ξ is row ξ of every channel's [36, tb] block.
        m.par_chunks_mut(g.cout * tb)
            .enumerate()
            .for_each(|(xi, mc)| {
                matmul(
                    (g.cout, tb, g.cin),
                    mc,
                    tb,
                    false,
                    Mat::rows(&u[xi * g.cout * g.cin..][..g.cout * g.cin], g.cin),
                    Mat::rows(&v[xi * tb..], POINTS * tb),
                    Parallelism::None,
                );
            });
        let (first, last) = (rows.start / th, (rows.end - 1) / th);
        for n in first..=last {
            let item = &mut y[n * g.out_len()..][..g.out_len()];
            let item_rows = rows.start.max(n * th)..rows.end.min((n + 1) * th);
            item.par_chunks_mut(g.positions())
                .enumerate()
                .for_each_init(
                    || vec![0f32; M * A * tw],
                    |s, (co, out)| {
                        let b = bias.map_or(0.0, |b| b[co]);
                        for r in item_rows.clone() {
                            let t0 = (r - rows.start) * tw;
                            output_row(&m, g, co, t0, tb, r % th, tw, b, s, out);
                        }
                    },
                );
        }
        start = rows.end;
    }
    y
}

/// U `[36][Cout·Cin]`: U_ξ[o, i] = (G g_{o,i} Gᵀ)_ξ, one plane per point ξ.
fn transform_filters(k: &[f32], pairs: usize) -> Vec<f32> {
    let mut u = vec![0f32; POINTS * pairs];
    u.par_chunks_mut(pairs).enumerate().for_each(|(xi, plane)| {
        let (a, b) = (xi / A, xi % A);
        let mut c = [0f32; 9];
        for (q, cq) in c.iter_mut().enumerate() {
            *cq = (G[a][q / 3] * G[b][q % 3]) as f32;
        }
        for (o, g) in plane.iter_mut().zip(k.chunks_exact(9)) {
            *o = c.iter().zip(g).map(|(c, g)| c * g).sum();
        }
    });
    u
}

/// The 1-D input transform Bᵀd of six values.
#[inline(always)]
fn bt(d: [f32; A]) -> [f32; A] {
    [
        d[0] - 1.5 * d[1] - 2.0 * d[2] + 1.5 * d[3] + d[4],
        -d[1] + 0.5 * d[2] + 2.5 * d[3] + d[4],
        d[1] - 2.5 * d[2] + 0.5 * d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        0.5 * (d[1] - d[3]) - d[2] + d[4],
        d[1] - 1.5 * d[2] - 2.0 * d[3] + 1.5 * d[4] + d[5],
    ]
}

/// The 1-D output transform Aᵀm of six values.
#[inline(always)]
fn at(m: [f32; A]) -> [f32; M] {
    let (p1, n1) = (m[1] + m[2], m[1] - m[2]);
    [
        m[0] + p1 + m[3] + m[4],
        n1 + 0.5 * m[3] - 2.0 * m[4],
        p1 + 0.25 * m[3] + 4.0 * m[4],
        n1 + 0.125 * m[3] - 8.0 * m[4] + m[5],
    ]
}

simd_fn! {
    /// Transforms tile row `ty` of one input channel `plane [H, W]` into `v [36, tb]` at tiles `t0..t0 + tw`.
    fn input_row(
        plane: &[f32],
        g: &Geometry,
        ty: usize,
        tw: usize,
        buf: &mut [f32],
        v: &mut [f32],
        t0: usize,
        tb: usize,
    ) {
        let wp = M * tw + 2;
        let (d, r) = buf.split_at_mut(A * wp);
        // The 6 input rows of the tile row, zero outside the image: column c holds x = c − padding.
        for (i, row) in d.chunks_mut(wp).enumerate() {
            row.fill(0.0);
            let Some(y) = (M * ty + i).checked_sub(g.p.padding).filter(|&y| y < g.h) else {
                continue;
            };
            let src = &plane[y * g.w..][..g.w];
            let lo = g.p.padding.min(wp);
            let hi = (g.p.padding + g.w).min(wp);
            if lo < hi {
                row[lo..hi].copy_from_slice(&src[..hi - lo]);
            }
        }
        // Down the columns: r[l] = Σ_i Bᵀ[l, i] d[i].
        for c in 0..wp {
            let col = bt(std::array::from_fn(|i| d[i * wp + c]));
            for (l, &val) in col.iter().enumerate() {
                r[l * wp + c] = val;
            }
        }
        // Along each row, tile by tile.
        for l in 0..A {
            let row = &r[l * wp..][..wp];
            for tx in 0..tw {
                let e = bt(std::array::from_fn(|j| row[M * tx + j]));
                for (kk, &val) in e.iter().enumerate() {
                    v[(l * A + kk) * tb + t0 + tx] = val;
                }
            }
        }
    }
}

simd_fn! {
    /// Output channel `co`'s tile row `ty` from `m [36, Cout, tb]` at tiles `t0..t0 + tw`, into `out [Ho, Wo]`.
    fn output_row(
        m: &[f32],
        g: &Geometry,
        co: usize,
        t0: usize,
        tb: usize,
        ty: usize,
        tw: usize,
        bias: f32,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        // Down the columns: s[l, j, tx] = Σ_i Aᵀ[l, i] m[i, j, tx].
        for j in 0..A {
            let src: [&[f32]; A] =
                std::array::from_fn(|i| &m[((i * A + j) * g.cout + co) * tb + t0..][..tw]);
            for tx in 0..tw {
                let col = at(std::array::from_fn(|i| src[i][tx]));
                for (l, &val) in col.iter().enumerate() {
                    s[(l * A + j) * tw + tx] = val;
                }
            }
        }
        // Along each row, tile by tile, cropping the last tiles to the output.
        for l in 0..M {
            let y = M * ty + l;
            if y >= g.ho {
                break;
            }
            let orow = &mut out[y * g.wo..][..g.wo];
            for tx in 0..tw {
                let e = at(std::array::from_fn(|j| s[(l * A + j) * tw + tx]));
                for (q, &val) in e.iter().enumerate() {
                    if let Some(o) = orow.get_mut(M * tx + q) {
                        *o = val + bias;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::{forward_im2col, ConvParams};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    /// Against im2col + GEMM over output sizes that are not multiples of the tile, paddings 0 to 2, batches of
    /// one and three, with and without bias, and blocks of one tile row up to the whole batch (blocks that
    /// start and end inside an item).
    #[test]
    fn matches_im2col() {
        let cases = [
            // (n, cin, h, w, cout, padding)
            (1, 1, 3, 3, 1, 0),
            (1, 3, 5, 7, 2, 1),
            (3, 4, 9, 6, 5, 1),
            (2, 8, 13, 11, 6, 2),
            (1, 16, 12, 17, 9, 0),
            (2, 64, 16, 16, 32, 1),
        ];
        for (n, cin, h, w, cout, padding) in cases {
            let p = ConvParams {
                padding,
                ..ConvParams::default()
            };
            let g = Geometry::new(&[n, cin, h, w], &[cout, cin, 3, 3], p).expect("geometry");
            let x = values(n * cin * h * w, 1);
            let k: Vec<f32> = values(cout * cin * 9, 2)
                .iter()
                .map(|v| v / (cin as f32 * 9.0).sqrt())
                .collect();
            let b = values(cout, 3);
            for bias in [None, Some(&b[..])] {
                let want = forward_im2col(&x, &k, bias, &g);
                // The size of the summed terms, Σ|x|·|k| at most, to which rounding errors are proportional
                // (im2col's gap to the exact sum is a few 1e-8 of it, Winograd's up to 3e-7 on these cases).
                let x_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let k_sum = k
                    .chunks(cin * 9)
                    .map(|o| o.iter().map(|v| v.abs()).sum::<f32>())
                    .fold(0f32, f32::max);
                let scale = x_max * k_sum;
                for block in [1, POINTS * cin.max(cout) * 3, BLOCK_FLOATS] {
                    let got = forward_blocked(&x, &k, bias, &g, block);
                    assert_eq!(got.len(), want.len());
                    let gap = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        gap <= 5e-7 * scale,
                        "{:?} bias {} block {block}: gap {gap:e}, scale {scale}",
                        (n, cin, h, w, cout, padding),
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn only_3x3_stride_1_convolutions_with_enough_tiles_are_taken() {
        let g = |x: [usize; 4], k: [usize; 4], p: ConvParams| {
            Geometry::new(&x, &k, p).expect("geometry")
        };
        let same = ConvParams {
            padding: 1,
            ..ConvParams::default()
        };
        let taken = min_tiles() != usize::MAX;
        assert_eq!(applies(&g([2, 8, 32, 32], [8, 8, 3, 3], same)), taken);
        assert!(!applies(&g([1, 8, 8, 8], [8, 8, 3, 3], same)));
        assert!(!applies(&g(
            [2, 8, 32, 32],
            [8, 8, 1, 1],
            ConvParams::default()
        )));
        let strided = ConvParams { stride: 2, ..same };
        assert!(!applies(&g([2, 8, 32, 32], [8, 8, 3, 3], strided)));
        let dilated = ConvParams {
            dilation: 2,
            padding: 2,
            ..ConvParams::default()
        };
        assert!(!applies(&g([2, 8, 32, 32], [8, 8, 3, 3], dilated)));
    }
}
