use super::*;
use crate::unet::HeadSpec;

// The shape of Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml (abridged: the keys
// ldm-rs reads, plus a few it must ignore).
const V2_V: &str = r#"
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    conditioning_key: crossattn
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"#;

fn problem(text: &str) -> Problem {
    match OriginalFile::parse(text, "test.yaml") {
        Err(ConfigError::Invalid { problem, .. }) => problem,
        other => panic!("expected an invalid config, got {other:?}"),
    }
}

#[test]
fn reads_sd2_v_config() -> Result<()> {
    let c = OriginalConfig::parse(V2_V, "v2")?;
    assert_eq!(c.kind, DiffusionKind::Latent);
    assert_eq!(c.parameterization, Parameterization::V);
    assert_eq!(c.scale_factor, 0.18215);
    assert_eq!(c.beta_schedule, BetaSchedule::Linear);
    assert_eq!(c.conditioning_key, Some(ConditioningKey::CrossAttn));
    assert_eq!(c.unet.heads, HeadSpec::Dim(64));
    assert_eq!(c.unet.num_res_blocks, vec![2; 4]);
    assert_eq!(c.unet.attention_resolutions, vec![4, 2, 1]);
    assert_eq!(c.unet.context_dim, Some(ContextDim::One(1024)));
    assert!(c.unet.use_linear_in_transformer && !c.unet.legacy);
    assert_eq!(
        c.first_stage.ddconfig().map(|d| d.ch_mult.clone()),
        Some(vec![1, 2, 4, 4])
    );
    assert_eq!(c.first_stage.downsample_factor(), 8);
    assert!(matches!(
        c.text(),
        Some(OriginalTextEncoder::OpenClip { layer: OpenClipLayer::Penultimate, arch, .. }) if arch == "ViT-H-14"
    ));
    assert!(c.ignored_keys.is_empty(), "{:?}", c.ignored_keys);
    Ok(())
}

#[test]
fn unknown_targets_are_named_with_their_section_not_instantiated() {
    let y = V2_V.replace("ldm.models.diffusion.ddpm.LatentDiffusion", "os.system");
    let e = OriginalFile::parse(&y, "evil.yaml")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("model: unknown target `os.system`") && e.contains("evil.yaml"),
        "{e}"
    );
    let y = V2_V.replace("ldm.models.autoencoder.AutoencoderKL", "foo.Bar");
    assert_eq!(
        problem(&y).to_string(),
        "model.params.first_stage_config: unknown target `foo.Bar`"
    );
    // A class known in one role is unknown in another.
    let y = V2_V.replace(
        "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "ldm.models.autoencoder.AutoencoderKL",
    );
    assert!(
        matches!(problem(&y), Problem::UnknownTarget { section, .. } if section == "model.params.cond_stage_config")
    );
    let y = V2_V.replace(
        "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel",
    );
    assert!(problem(&y)
        .to_string()
        .contains("model.params.unet_config: unknown target"));
}

#[test]
fn unsupported_classes_say_so() {
    let y = V2_V.replace(
        "ldm.models.diffusion.ddpm.LatentDiffusion",
        "ldm.models.diffusion.ddpm.LatentUpscaleFinetuneDiffusion",
    );
    let e = problem(&y).to_string();
    assert!(
        e.contains("is not supported") && e.contains("LatentUpscaleFinetuneDiffusion"),
        "{e}"
    );
    let y = V2_V.replace(
        "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "ldm.modules.encoders.modules.FrozenT5Embedder",
    );
    assert!(
        matches!(problem(&y), Problem::Unsupported { section, .. } if section == "model.params.cond_stage_config")
    );
}

#[test]
fn missing_required_keys_are_named() {
    let y = V2_V.replace("        model_channels: 320\n", "");
    assert_eq!(
        problem(&y),
        Problem::Missing {
            section: "model.params.unet_config.params".into(),
            key: "model_channels".into()
        }
    );
    let y = V2_V.replace("          z_channels: 4\n", "");
    assert_eq!(
        problem(&y).to_string(),
        "model.params.first_stage_config.params.ddconfig: missing `z_channels`"
    );
    let y = V2_V.replace("        num_head_channels: 64\n", "");
    assert!(problem(&y)
        .to_string()
        .contains("num_heads` or `num_head_channels"));
    let y = V2_V.replace("        context_dim: 1024\n", "");
    assert!(matches!(problem(&y), Problem::Missing { key, .. } if key == "context_dim"));
    let cut = V2_V.find("    cond_stage_config:").unwrap_or(V2_V.len());
    assert!(
        matches!(problem(&V2_V[..cut]), Problem::Missing { key, .. } if key == "cond_stage_config")
    );
    assert!(matches!(problem("data: {}\n"), Problem::Missing { key, .. } if key == "model"));
}

#[test]
fn wrong_types_are_errors() {
    let y = V2_V.replace("model_channels: 320", "model_channels: \"320\"");
    assert!(matches!(problem(&y), Problem::Type { key, .. } if key == "model_channels"));
    let y = V2_V.replace(
        "channel_mult: [ 1, 2, 4, 4 ]",
        "channel_mult: [ 1, two, 4, 4 ]",
    );
    assert_eq!(
        problem(&y).to_string(),
        "model.params.unet_config.params: `channel_mult[1]` must be a non-negative integer, found the string \"two\""
    );
    let y = V2_V.replace("scale_factor: 0.18215", "scale_factor: [0.18215]");
    assert!(matches!(problem(&y), Problem::Type { key, .. } if key == "scale_factor"));
    let y = V2_V.replace(
        "use_spatial_transformer: True",
        "use_spatial_transformer: 1",
    );
    assert!(matches!(problem(&y), Problem::Type { key, .. } if key == "use_spatial_transformer"));
    let y = V2_V.replace("in_channels: 4", "in_channels: -4");
    assert!(matches!(problem(&y), Problem::Type { key, .. } if key == "in_channels"));
    let y = V2_V.replace("parameterization: \"v\"", "parameterization: \"score\"");
    assert!(matches!(problem(&y), Problem::Value { key, .. } if key == "parameterization"));
    let y = V2_V.replace("layer: \"penultimate\"", "layer: \"first\"");
    assert!(matches!(problem(&y), Problem::Value { key, .. } if key == "layer"));
    assert!(matches!(problem("model: ["), Problem::Yaml(_)));
    assert!(matches!(problem("- 1\n- 2\n"), Problem::Type { .. }));
    assert!(matches!(problem(""), Problem::Yaml(_)));
}

#[test]
fn unknown_keys_are_reported_not_dropped() -> Result<()> {
    let y = V2_V.replace(
        "        legacy: False\n",
        "        legacy: False\n        some_new_flag: 3\n",
    );
    let c = OriginalConfig::parse(&y, "t")?;
    assert_eq!(
        c.ignored_keys,
        vec!["model.params.unet_config.params.some_new_flag".to_string()]
    );
    Ok(())
}

#[test]
fn conditioning_key_is_resolved_as_the_original_does() -> Result<()> {
    let without = V2_V.replace("    conditioning_key: crossattn\n", "");
    // Absent key and the default concat_mode (true): concat.
    assert_eq!(
        OriginalConfig::parse(&without, "t")?.conditioning_key,
        Some(ConditioningKey::Concat)
    );
    let y = without.replace("    use_ema: False\n", "    concat_mode: false\n");
    assert_eq!(
        OriginalConfig::parse(&y, "t")?.conditioning_key,
        Some(ConditioningKey::CrossAttn)
    );
    let cut = V2_V.find("    cond_stage_config:").unwrap_or(V2_V.len());
    let uncond = format!(
        "{}    cond_stage_config: __is_unconditional__\n",
        &V2_V[..cut]
    );
    let c = OriginalConfig::parse(&uncond, "t")?;
    assert_eq!(
        (c.conditioning_key, c.cond_stage),
        (None, OriginalCondStage::Unconditional)
    );
    let bad = format!("{}    cond_stage_config: __is_everything__\n", &V2_V[..cut]);
    assert!(matches!(problem(&bad), Problem::Value { key, .. } if key == "cond_stage_config"));
    Ok(())
}

#[test]
fn a_first_stage_config_is_not_a_diffusion_model() {
    let ae = r#"
model:
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 3
    n_embed: 8192
    ddconfig: {double_z: false, z_channels: 3, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
               ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], attn_type: none}
    lossconfig: {target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator}
"#;
    match OriginalFile::parse(ae, "vq") {
        Ok(OriginalFile::FirstStage(a)) => {
            let OriginalFirstStage::Vq(v) = &a.first_stage else {
                panic!("{a:?}")
            };
            assert_eq!((v.n_embed, v.embed_dim, v.interface), (8192, 3, false));
            assert_eq!(v.ddconfig.attn_type, AttnType::None);
            assert_eq!(a.first_stage.downsample_factor(), 4);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        OriginalConfig::parse(ae, "vq").err().as_ref().and_then(ConfigError::problem),
        Some(Problem::FirstStageOnly { target }) if target == "ldm.models.autoencoder.VQModel"
    ));
}

#[test]
fn deeply_nested_yaml_is_an_error_not_a_crash() {
    for deep in [
        format!("{}1\n", "- ".repeat(200_000)),
        format!("model:\n  params:\n    {}1\n", "- ".repeat(200_000)),
        format!("model: {}\n", "[".repeat(100_000)),
        format!("model:\n  params: {}1\n", "{a: ".repeat(100_000)),
        // "Billion laughs": each level repeats the previous one ten times.
        (1..=9).fold("a0: &a0 [x]\n".to_string(), |acc, i| {
            format!(
                "{acc}a{i}: &a{i} [{}]\n",
                vec![format!("*a{}", i - 1); 10].join(", ")
            )
        }),
    ] {
        assert!(OriginalFile::parse(&deep, "deep.yaml").is_err());
    }
}
