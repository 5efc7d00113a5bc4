//! `cargo bench -p ldm-kernels --bench conv`: forward and forward+backward of the convolutions of a small
//! training UNet and of SD's UNet, ours against candle's own, medians of 5 after a warm-up. With
//! `LDM_BENCH_TORCH=python3` (torch installed) PyTorch's times for the same shapes are printed beside them.
use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use ldm_kernels::{conv2d, ConvParams};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

fn torch_times(
    shape: (usize, usize, usize, usize),
    co: usize,
    k: usize,
    p: ConvParams,
) -> Option<(f64, f64)> {
    let py = std::env::var("LDM_BENCH_TORCH").ok()?;
    let (n, c, h, w) = shape;
    let script = format!(
        "import torch, time, statistics\n\
         torch.set_num_threads({t})\n\
         x = torch.randn({n},{c},{h},{w}, requires_grad=True); k = torch.randn({co},{c},{k},{k}, requires_grad=True)\n\
         f = lambda: torch.nn.functional.conv2d(x, k, stride={s}, padding={pd}, dilation={d})\n\
         def fb():\n    y = f(); y.backward(torch.ones_like(y))\n\
         def tm(g):\n    g(); r = []\n    for _ in range(5):\n        s = time.perf_counter(); g(); r.append((time.perf_counter() - s) * 1e3)\n    return statistics.median(r)\n\
         with torch.no_grad():\n    a = tm(f)\n\
         print(a, tm(fb))\n",
        t = candle_core::utils::get_num_threads(),
        s = p.stride,
        pd = p.padding,
        d = p.dilation
    );
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().filter_map(|v| v.parse().ok());
    Some((it.next()?, it.next()?))
}

fn main() -> Result<()> {
    // The allocator policy of the `ldm` binary (ldm_kernels::alloc), so the figures are what users get.
    let alloc = ldm_kernels::alloc::tune();
    eprintln!("allocator: {alloc:?}");
    let dev = Device::Cpu;
    let p1 = ConvParams {
        stride: 1,
        padding: 1,
        dilation: 1,
    };
    let cases = [
        ("train UNet 64ch 32² b8 3×3", (8, 64, 32, 32), 64, 3, p1),
        ("train UNet 128ch 16² b8 3×3", (8, 128, 16, 16), 128, 3, p1),
        (
            "train UNet 64→128 1×1 b8",
            (8, 64, 32, 32),
            128,
            1,
            ConvParams::default(),
        ),
        ("SD 320ch 64² b2 3×3", (2, 320, 64, 64), 320, 3, p1),
    ];
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!(
        "{:<30} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "conv",
        "ours fwd",
        "candle",
        "ratio",
        "ours f+b",
        "candle",
        "ratio",
        "torch f",
        "torch f+b"
    );
    for (name, shape, co, k, p) in cases {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?;
        let kern = Var::from_tensor(&Tensor::randn(0f32, 1.0, (co, shape.1, k, k), &dev)?)?;
        let ours_f = time(|| conv2d(x.as_tensor(), kern.as_tensor(), p).map(|_| ()))?;
        let cand_f = time(|| {
            x.as_tensor()
                .conv2d(kern.as_tensor(), p.padding, p.stride, p.dilation, 1)
                .map(|_| ())
        })?;
        let ours_b = time(|| {
            conv2d(x.as_tensor(), kern.as_tensor(), p)?
                .sum_all()?
                .backward()
                .map(|_| ())
        })?;
        let cand_b = time(|| {
            x.as_tensor()
                .conv2d(kern.as_tensor(), p.padding, p.stride, p.dilation, 1)?
                .sum_all()?
                .backward()
                .map(|_| ())
        })?;
        let torch = torch_times(shape, co, k, p);
        let (tf, tb) = torch.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{a:.1}"), format!("{b:.1}"))
        });
        println!(
            "{name:<30} {ours_f:>10.1} {cand_f:>10.1} {:>7.2} {ours_b:>10.1} {cand_b:>10.1} {:>7.2} {tf:>9} {tb:>9}",
            ours_f / cand_f,
            ours_b / cand_b
        );
    }
    forward_algorithms(&dev)
}

/// The forward pass of the 3×3 convolutions of SD's UNet (CFG batch of 2) and VAE decoder at 512², and of the
/// training UNet: Winograd F(4×4, 3×3) (the default) against im2col + GEMM, and PyTorch when asked.
fn forward_algorithms(dev: &Device) -> Result<()> {
    let p1 = ConvParams {
        stride: 1,
        padding: 1,
        dilation: 1,
    };
    let cases = [
        ("train UNet 64ch 32² b8", (8, 64, 32, 32)),
        ("train UNet 128ch 16² b8", (8, 128, 16, 16)),
        ("SD UNet 320ch 64² b2", (2, 320, 64, 64)),
        ("SD UNet 640ch 32² b2", (2, 640, 32, 32)),
        ("SD UNet 640ch 32² b1", (1, 640, 32, 32)),
        ("SD UNet 1280ch 16² b4", (4, 1280, 16, 16)),
        ("SD UNet 1280ch 16² b2", (2, 1280, 16, 16)),
        ("SD UNet 1280ch 8² b2", (2, 1280, 8, 8)),
        ("SD VAE 512ch 64²", (1, 512, 64, 64)),
        ("SD VAE 512ch 128²", (1, 512, 128, 128)),
        ("SD VAE 256ch 256²", (1, 256, 256, 256)),
        ("SD VAE 128ch 512²", (1, 128, 512, 512)),
    ];
    println!();
    println!(
        "{:<30} {:>10} {:>10} {:>7} {:>9} {:>7}",
        "3×3 forward", "auto", "im2col", "ratio", "torch", "vs torch"
    );
    for (name, shape) in cases {
        let c = shape.1;
        let x = Tensor::randn(0f32, 1.0, shape, dev)?;
        let k = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), dev)? / (9.0 * c as f64).sqrt())?;
        ldm_kernels::set_conv_algorithm(ldm_kernels::ConvAlgorithm::Auto);
        let auto = time(|| conv2d(&x, &k, p1).map(|_| ()))?;
        let want = conv2d(&x, &k, p1)?;
        ldm_kernels::set_conv_algorithm(ldm_kernels::ConvAlgorithm::Im2col);
        let direct = time(|| conv2d(&x, &k, p1).map(|_| ()))?;
        let gap = (conv2d(&x, &k, p1)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        ldm_kernels::set_conv_algorithm(ldm_kernels::ConvAlgorithm::Auto);
        let torch = torch_times(shape, c, 3, p1).map(|(f, _)| f);
        let (tf, vs) = torch.map_or(("-".into(), "-".into()), |t| {
            (format!("{t:.1}"), format!("{:.2}", auto / t))
        });
        println!(
            "{name:<30} {auto:>10.1} {direct:>10.1} {:>7.2} {tf:>9} {vs:>7}   (max gap {gap:.1e})",
            auto / direct
        );
    }
    Ok(())
}
