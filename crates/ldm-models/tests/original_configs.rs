//! The real CompVis / Stability configs under `fixtures/configs/` (see fixtures/README.md) parse into the typed
//! description, with spot checks of values read from them, and arbitrary edits of them never panic.
use std::path::{Path, PathBuf};

use ldm_models::original_config::{
    AttnType, BetaSchedule, ClipLayer, ConditioningKey, ConfigError, ContextDim, DiffusionKind,
    InterpolationMethod, LossType, LowScaleConfig, NumClasses, OriginalAutoencoder,
    OriginalCondStage, OriginalConfig, OriginalFile, OriginalFirstStage, OriginalTextEncoder,
    Parameterization, Problem,
};
use ldm_models::unet::HeadSpec;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

fn all_configs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    yaml_files(&root(), &mut v);
    v.sort();
    v
}

fn model(rel: &str) -> Result<OriginalConfig, ConfigError> {
    OriginalConfig::load(&root().join(rel))
}

fn autoencoder(rel: &str) -> Result<OriginalAutoencoder, Box<dyn std::error::Error>> {
    match OriginalFile::load(&root().join(rel))? {
        OriginalFile::FirstStage(a) => Ok(a),
        OriginalFile::Diffusion(_) => Err(format!("{rel} is not a first stage").into()),
    }
}

/// The SD 2 configs of models ldm-rs does not describe yet, with the class each names.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("v2-midas-inference.yaml", "LatentDepth2ImageDiffusion"),
    (
        "v2-1-stable-unclip-h-inference.yaml",
        "ImageEmbeddingConditionedLatentDiffusion",
    ),
    (
        "v2-1-stable-unclip-l-inference.yaml",
        "ImageEmbeddingConditionedLatentDiffusion",
    ),
];

#[test]
fn every_committed_config_parses_without_unknown_keys() -> TestResult {
    let files = all_configs();
    assert_eq!(files.len(), 41, "{files:?}");
    let (mut diffusion, mut first_stages) = (0, 0);
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let parsed = OriginalFile::load(path);
        if let Some((_, class)) = UNSUPPORTED.iter().find(|(f, _)| *f == name) {
            let e = parsed.err().ok_or(format!("{name} should be refused"))?;
            let msg = e.to_string();
            assert!(
                matches!(e.problem(), Some(Problem::Unsupported { section, .. }) if section == "model")
                    && msg.contains(class)
                    && msg.contains("not supported"),
                "{msg}"
            );
            continue;
        }
        match parsed.map_err(|e| format!("{}: {e}", path.display()))? {
            OriginalFile::Diffusion(c) => {
                assert!(c.ignored_keys.is_empty(), "{name}: {:?}", c.ignored_keys);
                diffusion += 1;
            }
            OriginalFile::FirstStage(a) => {
                assert!(a.ignored_keys.is_empty(), "{name}: {:?}", a.ignored_keys);
                first_stages += 1;
            }
        }
    }
    // LDM: 7 configs/latent-diffusion + 1 retrieval + 11 models/ldm; SD: 4 of the 7 SD 2 + 2 hand-written SD 1.
    // First stages: 4 configs/autoencoder + 9 models/first_stage_models.
    assert_eq!((diffusion, first_stages), (25, 13));
    Ok(())
}

#[test]
fn class_conditional_cin256() -> TestResult {
    for rel in [
        "latent-diffusion/configs/latent-diffusion/cin256-v2.yaml",
        "latent-diffusion/models/ldm/cin256/config.yaml",
    ] {
        let c = model(rel)?;
        let OriginalCondStage::Class(ce) = &c.cond_stage else {
            return Err(format!("{rel}: {:?}", c.cond_stage).into());
        };
        assert_eq!(ce.embed_dim, 512);
        assert_eq!(ce.key, "class_label");
        assert_eq!(c.conditioning_key, Some(ConditioningKey::CrossAttn));
        assert_eq!(c.unet.single_context_dim(), Some(512));
        let OriginalFirstStage::Vq(vq) = &c.first_stage else {
            return Err(format!("{rel}: {:?}", c.first_stage).into());
        };
        assert!(vq.interface);
        assert_eq!((c.linear_start, c.linear_end), (0.0015, 0.0195));
        assert_eq!(c.parameterization, Parameterization::Eps);
    }
    let v2 = model("latent-diffusion/configs/latent-diffusion/cin256-v2.yaml")?;
    assert!(matches!(&v2.cond_stage, OriginalCondStage::Class(ce) if ce.n_classes == 1001));
    assert_eq!(v2.unet.heads, HeadSpec::Count(1));
    assert_eq!(v2.unet.channel_mult, vec![1, 2, 3, 5]);
    assert!(
        matches!(&v2.first_stage, OriginalFirstStage::Vq(v) if (v.n_embed, v.embed_dim) == (8192, 3))
    );
    assert_eq!(v2.first_stage.downsample_factor(), 4);
    // The released cin256 model sits on the vq-f8 first stage (16384 codes, 4 channels).
    let released = model("latent-diffusion/models/ldm/cin256/config.yaml")?;
    assert!(
        matches!(&released.first_stage, OriginalFirstStage::Vq(v) if (v.n_embed, v.embed_dim) == (16384, 4))
    );
    assert_eq!(released.first_stage.downsample_factor(), 8);
    assert_eq!(released.unet.heads, HeadSpec::Dim(32));
    Ok(())
}

#[test]
fn super_resolution_bsr_sr_concatenates_the_low_res_image() -> TestResult {
    let c = model("latent-diffusion/models/ldm/bsr_sr/config.yaml")?;
    // No conditioning_key: `concat_mode: true` makes it concat.
    assert_eq!(c.conditioning_key, Some(ConditioningKey::Concat));
    assert_eq!(c.cond_stage, OriginalCondStage::Identity);
    assert_eq!((c.unet.in_channels, c.unet.out_channels), (6, 3));
    assert_eq!(c.unet.heads, HeadSpec::Dim(32));
    assert_eq!(c.unet.attention_resolutions, vec![16, 8]);
    // ds = 1, 2, 4, 8 for the four levels: 16 matches none and is ignored, as in the original.
    assert_eq!(c.unet.attention_levels(), vec![3]);
    assert!(!c.unet.use_spatial_transformer && c.unet.context_dim.is_none());
    assert_eq!(c.cond_stage_key, "LR_image");
    Ok(())
}

#[test]
fn first_stage_models() -> TestResult {
    let vq4 = autoencoder("latent-diffusion/models/first_stage_models/vq-f4/config.yaml")?;
    let OriginalFirstStage::Vq(v) = &vq4.first_stage else {
        return Err(format!("{:?}", vq4.first_stage).into());
    };
    assert_eq!((v.n_embed, v.embed_dim, v.interface), (8192, 3, false));
    assert_eq!(v.ddconfig.attn_type, AttnType::Vanilla);
    assert!(!v.ddconfig.double_z);
    assert_eq!(vq4.first_stage.downsample_factor(), 4);
    let noattn =
        autoencoder("latent-diffusion/models/first_stage_models/vq-f4-noattn/config.yaml")?;
    assert_eq!(
        noattn.first_stage.ddconfig().map(|d| d.attn_type),
        Some(AttnType::None)
    );
    let n256 = autoencoder("latent-diffusion/models/first_stage_models/vq-f8-n256/config.yaml")?;
    assert!(matches!(&n256.first_stage, OriginalFirstStage::Vq(v) if v.n_embed == 256));
    assert_eq!(n256.first_stage.downsample_factor(), 8);
    for (dir, f, channels) in [
        ("kl-f4", 4, 3),
        ("kl-f8", 8, 4),
        ("kl-f16", 16, 16),
        ("kl-f32", 32, 64),
    ] {
        let a = autoencoder(&format!(
            "latent-diffusion/models/first_stage_models/{dir}/config.yaml"
        ))?;
        assert_eq!(a.first_stage.downsample_factor(), f, "{dir}");
        assert_eq!(a.first_stage.latent_channels(), Some(channels), "{dir}");
        assert!(matches!(a.first_stage, OriginalFirstStage::Kl(_)), "{dir}");
    }
    let kl8 = autoencoder("latent-diffusion/models/first_stage_models/kl-f8/config.yaml")?;
    let dd = kl8.first_stage.ddconfig().ok_or("kl-f8 has no ddconfig")?;
    assert_eq!(dd.ch_mult, vec![1, 2, 4, 4]);
    assert_eq!((dd.ch, dd.z_channels, dd.double_z), (128, 4, true));
    let k64 = autoencoder("latent-diffusion/configs/autoencoder/autoencoder_kl_8x8x64.yaml")?;
    let dd = k64.first_stage.ddconfig().ok_or("no ddconfig")?;
    assert_eq!(
        (dd.ch_mult.clone(), dd.attn_resolutions.clone()),
        (vec![1, 1, 2, 2, 4, 4], vec![16, 8])
    );
    Ok(())
}

#[test]
fn sd_x4_upscaler() -> TestResult {
    let c = model("stablediffusion/configs/stable-diffusion/x4-upscaling.yaml")?;
    let DiffusionKind::Upscale {
        low_scale,
        low_scale_key,
    } = &c.kind
    else {
        return Err(format!("{:?}", c.kind).into());
    };
    assert_eq!(low_scale_key, "lr");
    let LowScaleConfig::NoiseAugmentation {
        max_noise_level,
        schedule,
    } = low_scale
    else {
        return Err(format!("{low_scale:?}").into());
    };
    assert_eq!(*max_noise_level, 350);
    assert_eq!(schedule.beta_schedule, BetaSchedule::Linear);
    assert_eq!(
        (
            schedule.linear_start,
            schedule.linear_end,
            schedule.timesteps
        ),
        (1e-4, 0.02, 1000)
    );
    assert_eq!(c.parameterization, Parameterization::V);
    assert_eq!(c.conditioning_key, Some(ConditioningKey::HybridAdm));
    assert_eq!(c.scale_factor, 0.08333);
    assert_eq!(c.unet.num_classes, Some(NumClasses::Count(1000)));
    assert_eq!(c.unet.in_channels, 7);
    assert_eq!(c.unet.heads, HeadSpec::Count(8));
    assert_eq!(
        c.unet.disable_self_attentions,
        Some(vec![true, true, true, false])
    );
    assert_eq!(c.first_stage.downsample_factor(), 4);
    assert_eq!((c.image_size, c.channels), (128, 4));
    Ok(())
}

#[test]
fn stable_diffusion_configs() -> TestResult {
    let v1 = model("handwritten/v1-inference.yaml")?;
    assert_eq!(v1.kind, DiffusionKind::Latent);
    assert!(matches!(
        v1.text(),
        Some(OriginalTextEncoder::Clip { layer: ClipLayer::Last, max_length: 77, num_heads: None, version })
            if version == "openai/clip-vit-large-patch14"
    ));
    assert_eq!(v1.unet.heads, HeadSpec::Count(8));
    assert_eq!(v1.unet.context_dim, Some(ContextDim::One(768)));
    assert_eq!(
        (v1.scale_factor, v1.linear_start, v1.linear_end),
        (0.18215, 0.00085, 0.012)
    );
    let inpaint = model("handwritten/v1-inpainting-inference.yaml")?;
    assert!(
        matches!(&inpaint.kind, DiffusionKind::Inpaint { masked_image_key, .. } if masked_image_key == "masked_image")
    );
    assert_eq!(
        (inpaint.unet.in_channels, inpaint.conditioning_key),
        (9, Some(ConditioningKey::Hybrid))
    );
    let sd2 = model("stablediffusion/configs/stable-diffusion/v2-inference.yaml")?;
    let sd2v = model("stablediffusion/configs/stable-diffusion/v2-inference-v.yaml")?;
    assert_eq!(
        (sd2.parameterization, sd2v.parameterization),
        (Parameterization::Eps, Parameterization::V)
    );
    assert_eq!(sd2v.unet.heads, HeadSpec::Dim(64));
    let sd2i = model("stablediffusion/configs/stable-diffusion/v2-inpainting-inference.yaml")?;
    assert!(matches!(sd2i.kind, DiffusionKind::Inpaint { .. }));
    assert_eq!(sd2i.unet.in_channels, 9);
    Ok(())
}

#[test]
fn ldm_text_layout_and_semantic_models() -> TestResult {
    let layout = model("latent-diffusion/models/ldm/layout2img-openimages256/config.yaml")?;
    let Some(OriginalTextEncoder::Bert(b)) = layout.text() else {
        return Err(format!("{:?}", layout.cond_stage).into());
    };
    assert_eq!(
        (
            b.n_embed,
            b.n_layer,
            b.vocab_size,
            b.max_seq_len,
            b.use_tokenizer
        ),
        (512, 16, 8192, 92, false)
    );
    assert_eq!(layout.unet.transformer_depth, 3);
    let t2i = model("latent-diffusion/models/ldm/text2img256/config.yaml")?;
    let Some(OriginalTextEncoder::Bert(b)) = t2i.text() else {
        return Err(format!("{:?}", t2i.cond_stage).into());
    };
    assert_eq!(
        (
            b.n_embed,
            b.n_layer,
            b.vocab_size,
            b.max_seq_len,
            b.use_tokenizer
        ),
        (640, 32, 30522, 77, true)
    );
    let big = model("latent-diffusion/configs/latent-diffusion/txt2img-1p4B-eval.yaml")?;
    assert!(matches!(big.text(), Some(OriginalTextEncoder::Bert(b)) if b.n_embed == 1280));
    assert!(matches!(big.first_stage, OriginalFirstStage::Kl(_)));
    let sem = model("latent-diffusion/models/ldm/semantic_synthesis256/config.yaml")?;
    let OriginalCondStage::SpatialRescaler(r) = &sem.cond_stage else {
        return Err(format!("{:?}", sem.cond_stage).into());
    };
    assert_eq!(
        (r.n_stages, r.in_channels, r.out_channels, r.method),
        (2, 182, Some(3), InterpolationMethod::Bilinear)
    );
    assert_eq!((r.multiplier, r.bias), (0.5, false));
    assert_eq!(sem.conditioning_key, Some(ConditioningKey::Concat));
    // [32, 16, 8] against ds = 1, 2, 4: no level attends, only the middle block.
    assert_eq!(sem.unet.attention_levels(), Vec::<usize>::new());
    let v1 = model("handwritten/v1-inference.yaml")?;
    assert_eq!(v1.unet.attention_levels(), vec![0, 1, 2]);
    Ok(())
}

#[test]
fn unconditional_inpainting_and_retrieval_models() -> TestResult {
    for rel in [
        "latent-diffusion/models/ldm/celeba256/config.yaml",
        "latent-diffusion/models/ldm/ffhq256/config.yaml",
        "latent-diffusion/configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml",
    ] {
        let c = model(rel)?;
        assert_eq!(
            (c.cond_stage.clone(), c.conditioning_key),
            (OriginalCondStage::Unconditional, None),
            "{rel}"
        );
    }
    let churches = model("latent-diffusion/models/ldm/lsun_churches256/config.yaml")?;
    assert!(churches.scale_by_std);
    assert_eq!(churches.conditioning_key, None);
    assert!(churches.unet.use_scale_shift_norm && churches.unet.resblock_updown);
    let inpaint = model("latent-diffusion/models/ldm/inpainting_big/config.yaml")?;
    assert_eq!(inpaint.kind, DiffusionKind::Latent);
    assert_eq!(inpaint.cond_stage, OriginalCondStage::FirstStage);
    assert_eq!(
        (inpaint.conditioning_key, inpaint.unet.in_channels),
        (Some(ConditioningKey::Concat), 7)
    );
    assert_eq!(inpaint.loss_type, LossType::L1);
    assert_eq!(churches.loss_type, LossType::L1);
    let sr = model("latent-diffusion/models/ldm/bsr_sr/config.yaml")?;
    assert_eq!(sr.loss_type, LossType::L2);
    // No `loss_type`: the DDPM default, l2.
    let cin = model("latent-diffusion/models/ldm/cin256/config.yaml")?;
    assert_eq!(cin.loss_type, LossType::L2);
    assert_eq!(
        inpaint.first_stage.ddconfig().map(|d| d.attn_type),
        Some(AttnType::None)
    );
    let rdm = model("latent-diffusion/configs/retrieval-augmented-diffusion/768x768.yaml")?;
    assert_eq!(
        (rdm.cond_stage.clone(), rdm.conditioning_key),
        (
            OriginalCondStage::Identity,
            Some(ConditioningKey::CrossAttn)
        )
    );
    assert_eq!(rdm.first_stage.downsample_factor(), 16);
    assert_eq!(rdm.scale_factor, 0.22765929);
    Ok(())
}

/// xorshift64*: a fixed, dependency-free stream of test mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const VALUES: &[&str] = &[
    "-1",
    "0",
    "[]",
    "{}",
    "null",
    "~",
    "abc",
    "1.5",
    "-0.0",
    "1e400",
    "99999999999999999999",
    "[1, x]",
    "[[1]]",
    "__is_first_stage__",
    "__is_unconditional__",
    "\"",
    "*a",
    "&a 3",
    "True",
    "yes",
    ".nan",
    "{target: foo.Bar}",
    "ldm.models.autoencoder.VQModel",
    "[True, 2]",
    "'",
    ": :",
    "- - -",
];

fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.below(3) {
        if lines.is_empty() {
            break;
        }
        let i = rng.below(lines.len());
        match rng.below(6) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 | 3 => {
                let v = VALUES[rng.below(VALUES.len())];
                if let Some((k, _)) = lines[i].split_once(':') {
                    lines[i] = format!("{k}: {v}");
                } else {
                    lines[i] = format!("{}{v}", lines[i]);
                }
            }
            4 => {
                let l = lines[i].trim_start().to_string();
                let indent = rng.below(12);
                lines[i] = format!("{}{l}", " ".repeat(indent));
            }
            _ => {
                let cut: String = lines[i]
                    .chars()
                    .take(rng.below(lines[i].len() + 1))
                    .collect();
                lines[i] = cut;
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_configs_never_panic() -> TestResult {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut err) = (0usize, 0usize);
    for path in all_configs() {
        let text = std::fs::read_to_string(&path)?;
        for _ in 0..60 {
            let m = mutate(&text, &mut rng);
            match OriginalFile::parse(&m, "mutated.yaml") {
                Ok(_) => ok += 1,
                Err(e) => {
                    // Every error renders and names its origin.
                    assert!(e.to_string().contains("mutated.yaml"));
                    err += 1;
                }
            }
        }
        // A truncated file.
        let cut = text
            .char_indices()
            .map(|(i, _)| i)
            .nth(rng.below(text.len()))
            .unwrap_or(0);
        let _ = OriginalFile::parse(&text[..cut], "truncated.yaml");
    }
    // The mutations hit both outcomes often.
    assert!(ok > 200 && err > 200, "ok {ok}, err {err}");
    Ok(())
}
