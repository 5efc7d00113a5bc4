//! The loss-curve PNG written at the end of a run: one panel per series (raw values light, a moving average
//! dark), linear step axis, y axis linear or log10 when the series spans more than two decades, with tick labels
//! drawn in a built-in 3×5 pixel font (digits, `.`, `-`, `e` and the lower-case letters of series names).
use std::path::Path;

use crate::error::{Result, TrainError};

/// One named series of (step, value) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

const PANEL_W: usize = 640;
const PANEL_H: usize = 220;
const MARGIN_L: usize = 56;
const MARGIN_R: usize = 12;
const MARGIN_T: usize = 18;
const MARGIN_B: usize = 22;
const SCALE: usize = 2; // font pixel size

struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            rgb: vec![255; w * h * 3],
        }
    }
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            self.put(
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
                c,
            );
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                self.put(
                                    (x + k * 4 * SCALE + col * SCALE + dx) as i64,
                                    (y + r * SCALE + dy) as i64,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3×5 glyphs, one row per entry, bit 2 = left column. Unknown characters draw as blanks.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '/' => [1, 1, 2, 4, 4],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        _ => [0; 5],
    }
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// Mean over a trailing window of `w` points.
fn moving_average(values: &[f64], w: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= w {
            sum -= values[i - w];
        }
        out.push(sum / (i + 1).min(w) as f64);
    }
    out
}

/// Draws `series` (one panel each, non-finite values dropped) into an RGB image; returns (width, height, rgb).
pub fn render(series: &[Series]) -> (usize, usize, Vec<u8>) {
    let panels = series.len().max(1);
    let mut cv = Canvas::new(PANEL_W, PANEL_H * panels);
    for (p, s) in series.iter().enumerate() {
        let top = p * PANEL_H;
        let pts: Vec<(u64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(_, v)| v.is_finite())
            .collect();
        let (x0, y0) = (MARGIN_L as f64, (top + MARGIN_T) as f64);
        let (pw, ph) = (
            (PANEL_W - MARGIN_L - MARGIN_R) as f64,
            (PANEL_H - MARGIN_T - MARGIN_B) as f64,
        );
        let axis = [0, 0, 0];
        cv.line((x0, y0), (x0, y0 + ph), axis);
        cv.line((x0, y0 + ph), (x0 + pw, y0 + ph), axis);
        cv.text(MARGIN_L + 6, top + 4, &s.name, axis);
        if pts.is_empty() {
            continue;
        }
        let (smin, smax) = (pts[0].0 as f64, pts[pts.len() - 1].0 as f64);
        let (mut lo, mut hi) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), (_, v)| {
                (l.min(*v), h.max(*v))
            });
        let log = lo > 0.0 && hi / lo > 100.0;
        let f = |v: f64| if log { v.log10() } else { v };
        (lo, hi) = (f(lo), f(hi));
        if hi - lo < 1e-12 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let xs = |step: f64| {
            x0 + if smax > smin {
                (step - smin) / (smax - smin) * pw
            } else {
                0.0
            }
        };
        let ys = |v: f64| y0 + ph - (f(v) - lo) / (hi - lo) * ph;
        let values: Vec<f64> = pts.iter().map(|p| p.1).collect();
        let smooth = moving_average(&values, (values.len() / 50).max(1));
        for (data, colour) in [(&values, [170, 200, 235]), (&smooth, [20, 70, 160])] {
            for (i, w) in data.windows(2).enumerate() {
                cv.line(
                    (xs(pts[i].0 as f64), ys(w[0])),
                    (xs(pts[i + 1].0 as f64), ys(w[1])),
                    colour,
                );
            }
        }
        let untransform = |u: f64| if log { 10f64.powf(u) } else { u };
        for k in 0..=4 {
            let u = lo + (hi - lo) * k as f64 / 4.0;
            let y = y0 + ph - (u - lo) / (hi - lo) * ph;
            cv.line((x0 - 4.0, y), (x0, y), axis);
            cv.text(
                2,
                (y as usize).saturating_sub(5),
                &tick_label(untransform(u)),
                axis,
            );
        }
        for k in 0..=4 {
            let step = smin + (smax - smin) * k as f64 / 4.0;
            let x = xs(step);
            cv.line((x, y0 + ph), (x, y0 + ph + 4.0), axis);
            let label = format!("{}", step.round() as u64);
            let lx = (x as usize).saturating_sub(label.len() * 4 * SCALE / 2);
            cv.text(lx, top + PANEL_H - MARGIN_B + 8, &label, axis);
        }
    }
    (cv.w, cv.h, cv.rgb)
}

/// Renders `series` and writes them to `path` as an 8-bit RGB PNG.
pub fn write_png(path: &Path, series: &[Series]) -> Result<()> {
    let (w, h, rgb) = render(series);
    let file = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| TrainError::io(path, std::io::Error::other(e));
    enc.write_header()
        .map_err(png_err)?
        .write_image_data(&rgb)
        .map_err(png_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_falling_curve_is_drawn_from_upper_left_to_lower_right() {
        let s = Series {
            name: "loss".into(),
            points: (0..200)
                .map(|i| (i, 1.0 / (1.0 + i as f64 * 0.1)))
                .collect(),
        };
        let (w, h, rgb) = render(&[s]);
        assert_eq!((w, h), (PANEL_W, PANEL_H));
        let dark = |x: usize, y: usize| rgb[(y * w + x) * 3..(y * w + x) * 3 + 3] == [20, 70, 160];
        let column_hits = |x: usize| (0..h).filter(|&y| dark(x, y)).collect::<Vec<_>>();
        let left = column_hits(MARGIN_L + 2);
        let right = column_hits(PANEL_W - MARGIN_R - 2);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(left[0] < right[0], "high values plot higher up");
    }

    #[test]
    fn non_finite_values_and_empty_series_do_not_break_the_plot() {
        let s = vec![
            Series {
                name: "a".into(),
                points: vec![(0, f64::NAN), (1, 2.0), (2, f64::INFINITY), (3, 2.0)],
            },
            Series {
                name: "b".into(),
                points: vec![],
            },
        ];
        let (_, h, rgb) = render(&s);
        assert_eq!(h, 2 * PANEL_H);
        assert!(rgb.iter().any(|&v| v != 255));
    }

    #[test]
    fn moving_average_uses_a_trailing_window() {
        assert_eq!(
            moving_average(&[1., 2., 3., 4.], 2),
            vec![1., 1.5, 2.5, 3.5]
        );
    }
}
