#!/usr/bin/env bash
# What one lent GPU session runs, as one command (the device tool's `run`, from the repo root):
#   1. a smoke build on CUDA (every phase, a few steps) so a broken GPU path fails in seconds;
#   2. the testbed base models continued for MINUTES per family (`visalign testbed build
#      init_from=... denoiser_minutes=...`), evaluated on all held-out prompts x 4 images;
#   3. benchmarks/cuda_check.py (fp16/bf16 sampling, mixed-precision training, SDPA, memory);
#   4. benchmarks/bench_dpo.py on CUDA, if time is left.
# Everything worth keeping goes to OUT (at most 8 files): gpu.log, build.json, the changed
# weights (the VAE and tokenizers are unchanged by a continued build) and cuda_check.json.
# Copy the weights back over assets/testbed/<family>/... and build.json to assets/testbed/.
#
#   bash benchmarks/gpu_session.sh "$OUT" 2.0            # ~9 minutes on one H100/H200
#
# Python packages the device image lacks travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [MINUTES_PER_FAMILY] [BUDGET_S]}
minutes=${2:-2.0}
budget=${3:-570}
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

echo "== smoke build ($SECONDS s)"
python3 -m visalign.cli testbed build quick=true out=/tmp/smoke/assets work_dir=/tmp/smoke/work reward_family=null || exit 2

echo "== continued build, $minutes min per family ($SECONDS s)"
rm -rf /tmp/gpu-assets && cp -r assets/testbed /tmp/gpu-assets
python3 -m visalign.cli testbed build init_from=/tmp/gpu-assets out=/tmp/gpu-assets work_dir=/tmp/gpu-work \
  denoiser_minutes="$minutes" batch_size=256 num_workers=6 num_images=16000 eval_images_per_prompt=4 reward_family=null || exit 3
cp /tmp/gpu-assets/build.json "$out/"
mkdir -p "$out/sd" "$out/sd3"
cp /tmp/gpu-assets/sd/unet/diffusion_pytorch_model.safetensors "$out/sd/unet.safetensors"
cp /tmp/gpu-assets/sd/text_encoder/model.safetensors "$out/sd/text_encoder.safetensors"
cp /tmp/gpu-assets/sd3/transformer/diffusion_pytorch_model.safetensors "$out/sd3/transformer.safetensors"
cp /tmp/gpu-assets/sd3/text_encoder/model.safetensors "$out/sd3/text_encoder.safetensors"
cp /tmp/gpu-assets/sd3/text_encoder_2/model.safetensors "$out/sd3/text_encoder_2.safetensors"

echo "== cuda_check ($SECONDS s)"
left=$((budget - SECONDS))
[ "$left" -gt 30 ] && timeout "$((left < 150 ? left : 150))" python3 benchmarks/cuda_check.py --out "$out/cuda_check.json"

echo "== bench_dpo ($SECONDS s)"
left=$((budget - SECONDS))
[ "$left" -gt 30 ] && timeout "$left" python3 benchmarks/bench_dpo.py --repeats 7 --full-size-latent 64 --full-size-repeats 5
echo "== done ($SECONDS s)"
