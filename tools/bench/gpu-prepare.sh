#!/usr/bin/env bash
# Prepares, on this (GPU-less) machine, what tools/bench/gpu.sh needs on the GPU machine, in .gpu/ (git-ignored;
# name it in the device call's `carry`):
#   .gpu/ldm.xz   the CUDA build of `ldm`, stripped and xz-compressed (75 MB -> 9.8 MB: the raw binary alone is
#                 over the 64 MiB limit); gpu.sh unpacks it
#   .gpu/sd15.xz  the CUDA build of crates/ldm-pipeline/benches/sd15.rs (UNet CFG step), likewise; skipped with
#               LDM_GPU_NO_UNET_BENCH=1 (then the table's direct-UNet row is n/a for ldm-rs)
#   .gpu/whl    diffusers 0.42.1 and importlib_metadata wheels (the GPU image has torch and transformers but
#               not diffusers; pure-Python wheels, no build)
# Everything that travels (the repository's tracked files included) must stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/whl
LDM_CUDA_BENCH=$([ "${LDM_GPU_NO_UNET_BENCH:-0}" = 1 ] && echo 0 || echo 1) tools/build-cuda.sh
xz -T2 -6 -c tools/.cuda-venv/out/ldm >.gpu/ldm.xz
if [ -f tools/.cuda-venv/out/sd15 ] && [ "${LDM_GPU_NO_UNET_BENCH:-0}" != 1 ]; then
    xz -T2 -6 -c tools/.cuda-venv/out/sd15 >.gpu/sd15.xz
fi
PIP="${PIP:-tools/.cuda-venv/bin/pip}"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .gpu/whl diffusers==0.42.1 importlib_metadata
ls -la .gpu .gpu/whl
echo "carried: $(du -sb .gpu | cut -f1) bytes in .gpu; tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
