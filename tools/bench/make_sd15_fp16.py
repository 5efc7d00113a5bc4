#!/usr/bin/env python
"""A full-size SD1.5-architecture checkpoint with random weights, fp16, in the original single-file layout.

For the whole-txt2img benchmark of issue 5 (tools/bench/txt2img_rss.sh): peak RSS and load time of ldm-rs and of
diffusers' `StableDiffusionPipeline.from_single_file` on the same file. Writes (default --out tools/bench/.sd15/,
git-ignored; nothing here is committed):

  sd15-random-fp16.safetensors  ~2.1 GB: model.diffusion_model.* (UNet, 859.5 M), first_stage_model.* (KL-f8 VAE,
                                83.7 M), cond_stage_model.transformer.text_model.* (CLIP ViT-L/14 text tower,
                                123.1 M), the DDPM schedule buffers (alphas_cumprod, ...) in fp16 and
                                `...embeddings.position_ids` in int64: the key set of `v1-5-pruned-emaonly-fp16`.
  v1-inference.yaml             the original inference config (structure of Stability's v1-inference.yaml)
  diffusers/                    what diffusers needs to read that file offline (`config=` of from_single_file):
                                model_index.json, {unet,vae,text_encoder}/config*.json, scheduler/, tokenizer/
                                (vocab.json + merges.txt built from CLIP's BPE list) -- configs only, no weights.

Weights: tools/fixtures/make_sd_tiny.py's rule (normal with std 1/sqrt(fan_in), norm gains 1 + 0.1 N, biases
0.1 N, embeddings 0.5 N), from one seeded torch.Generator (default seed 1515), rounded to fp16. Key conversion:
tools/fixtures/sd_keys.py, checked against diffusers' own LDM->diffusers converters (exact inverse) unless
--no-check. Deterministic: the same seed gives the same bytes (the script prints a SHA-256 of the file with --sha).

Usage:
  /opt/ldmvenv/bin/python tools/bench/make_sd15_fp16.py [--out DIR] [--seed N] [--no-check] [--sha]
       [--clip-bpe crates/ldm-models/assets/bpe_simple_vocab_16e6.txt.gz]

Peak memory while writing: ~8 GiB (one fp32 model at a time plus the fp16 copies). Time: ~1-3 min on 2 cores.
Written against torch 2.15.0, diffusers 0.42.1, transformers 5.25.0 (/opt/ldmvenv).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools", "fixtures"))
sys.path.insert(0, HERE)

import make_sd_tiny as tiny  # noqa: E402  (sets HF offline env, 1 torch thread, deterministic algorithms)
import sd_keys  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402
from torch_sd15 import SD15_CLIP_TEXT, SD15_UNET, SD_VAE  # noqa: E402

FILE_NAME = "sd15-random-fp16.safetensors"
SCALE_FACTOR = 0.18215
LAYERS_PER_BLOCK = 2
N_LEVELS = 4


def unet_config():
    return dict(SD15_UNET)


def vae_config():
    return dict(SD_VAE, scaling_factor=SCALE_FACTOR)


def text_config():
    """openai/clip-vit-large-patch14's text tower, as stable-diffusion-v1-5/text_encoder/config.json."""
    return CLIPTextConfig(**SD15_CLIP_TEXT)


def original_yaml():
    """Stability's configs/stable-diffusion/v1-inference.yaml (same keys and values)."""
    unet = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=768,
        use_checkpoint=True,
        legacy=False,
    )
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        dropout=0.0,
    )
    params = dict(
        linear_start=tiny.LINEAR_START,
        linear_end=tiny.LINEAR_END,
        num_timesteps_cond=1,
        log_every_t=200,
        timesteps=tiny.TIMESTEPS,
        first_stage_key="jpg",
        cond_stage_key="txt",
        image_size=64,
        channels=4,
        cond_stage_trainable=False,
        conditioning_key="crossattn",
        monitor="val/loss_simple_ema",
        scale_factor=SCALE_FACTOR,
        use_ema=False,
        scheduler_config=dict(
            target="ldm.lr_scheduler.LambdaLinearScheduler",
            params=dict(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.0e-6], f_max=[1.0],
                        f_min=[1.0]),
        ),
        unet_config=dict(target="ldm.modules.diffusionmodules.openaimodel.UNetModel", params=unet),
        first_stage_config=dict(
            target="ldm.models.autoencoder.AutoencoderKL",
            params=dict(embed_dim=4, monitor="val/rec_loss", ddconfig=ddconfig,
                        lossconfig=dict(target="torch.nn.Identity")),
        ),
        cond_stage_config=dict(target="ldm.modules.encoders.modules.FrozenCLIPEmbedder"),
    )
    doc = dict(model=dict(base_learning_rate=1.0e-4, target="ldm.models.diffusion.ddpm.LatentDiffusion",
                          params=params))
    return "# Stability's v1-inference.yaml (written by tools/bench/make_sd15_fp16.py)\n" + yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=None)


def model_index():
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_config_folder(dst, bpe_gz):
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(model_index(), f, indent=2)
    # configs only: models built on the meta device (no memory), then ConfigMixin.save_config
    with torch.device("meta"):
        UNet2DConditionModel(**unet_config()).save_config(os.path.join(tmp, "unet"))
        AutoencoderKL(**vae_config()).save_config(os.path.join(tmp, "vae"))
    text_config().save_pretrained(os.path.join(tmp, "text_encoder"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(tiny.scheduler_json("sd1"), f, indent=2)
    tiny.write_tokenizer(os.path.join(tmp, "tokenizer"), bpe_gz, "sd1")
    tiny.atomic_replace_dir(tmp, dst)


def build_and_convert(gen, check):
    """The three models in turn (one fp32 model in memory at a time); returns the fp16 original state dict."""
    stored = {}
    t0 = time.perf_counter()
    unet = tiny.init_weights_(UNet2DConditionModel(**unet_config()), gen, torch.float16).eval()
    sd = {k: v.detach() for k, v in unet.state_dict().items()}
    orig = {sd_keys.UNET_PREFIX + k: v for k, v in sd_keys.unet_to_original(sd, LAYERS_PER_BLOCK, N_LEVELS).items()}
    if check:
        check_same(unet.state_dict(), "unet", lambda: _diffusers_unet(orig, unet))
    stored.update(tiny.cast_for_storage(orig, torch.float16))
    n_unet = sum(p.numel() for p in unet.parameters())
    del unet, sd, orig
    tiny.log(f"  unet: {n_unet / 1e6:.1f} M parameters ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    vae = tiny.init_weights_(AutoencoderKL(**vae_config()), gen, torch.float16).eval()
    sd = {k: v.detach() for k, v in vae.state_dict().items()}
    orig = {sd_keys.VAE_PREFIX + k: v for k, v in sd_keys.vae_to_original(sd, N_LEVELS).items()}
    if check:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        check_same(vae.state_dict(), "vae", lambda: convert_ldm_vae_checkpoint(orig, dict(vae.config)))
    stored.update(tiny.cast_for_storage(orig, torch.float16))
    n_vae = sum(p.numel() for p in vae.parameters())
    del vae, sd, orig
    tiny.log(f"  vae: {n_vae / 1e6:.1f} M parameters ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    text = tiny.init_weights_(CLIPTextModel(text_config()), gen, torch.float16).eval()
    sd = {k: v.detach() for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    orig = {sd_keys.CLIP_PREFIX + k: v for k, v in sd_keys.clip_to_original(sd).items()}
    if check:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        ours = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}
        check_same(ours, "text", lambda: convert_ldm_clip_checkpoint(orig))
    stored.update(tiny.cast_for_storage(orig, torch.float16))
    n_text = sum(p.numel() for p in text.parameters())
    del text, sd, orig
    tiny.log(f"  text encoder: {n_text / 1e6:.1f} M parameters ({time.perf_counter() - t0:.1f} s)")

    for k, v in tiny.schedule_buffers().items():
        stored[k] = v.to(torch.float16).contiguous()
    stored["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return stored, n_unet + n_vae + n_text


def _diffusers_unet(orig, unet):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(orig, dict(unet.config))


def check_same(ours, name, back_fn):
    back = back_fn()
    ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
    back = {k: v for k, v in back.items() if not k.endswith("position_ids")}
    if set(ours) != set(back):
        raise AssertionError(f"{name}: key sets differ: {sorted(set(ours) ^ set(back))[:10]}")
    for k in ours:
        if ours[k].shape != back[k].shape or not torch.equal(ours[k], back[k]):
            raise AssertionError(f"{name}: tensor {k} differs after diffusers' converter")
    tiny.log(f"  check {name}: diffusers' LDM->diffusers converter gives back all {len(ours)} tensors exactly")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, ".sd15"))
    ap.add_argument("--seed", type=int, default=1515)
    ap.add_argument("--clip-bpe", default=os.path.join(ROOT, "crates/ldm-models/assets/bpe_simple_vocab_16e6.txt.gz"))
    ap.add_argument("--no-check", action="store_true", help="skip the check against diffusers' converters")
    ap.add_argument("--sha", action="store_true", help="print the SHA-256 of the written file")
    args = ap.parse_args()
    tiny.log("versions: " + ", ".join(f"{k} {v}" for k, v in tiny.versions().items()))
    os.makedirs(args.out, exist_ok=True)
    write_config_folder(os.path.join(args.out, "diffusers"), args.clip_bpe)
    tiny.atomic_write_text(original_yaml(), os.path.join(args.out, "v1-inference.yaml"))
    tiny.log(f"wrote {args.out}/diffusers/ and v1-inference.yaml")

    gen = torch.Generator("cpu").manual_seed(args.seed)
    stored, n = build_and_convert(gen, check=not args.no_check)
    path = os.path.join(args.out, FILE_NAME)
    tiny.atomic_save_safetensors(stored, path, metadata={"format": "pt"})
    size = os.path.getsize(path)
    tiny.log(f"wrote {path}: {len(stored)} tensors, {n / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB")
    if args.sha:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        tiny.log(f"sha256 {h.hexdigest()}")


if __name__ == "__main__":
    main()
