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
#   bash benchmarks/gpu_session.sh "$OUT" 2.0            # ~8 minutes on one H200
#   FAMILIES='[sd]' BATCH=1024 SMOKE=0 BENCH=0 bash benchmarks/gpu_session.sh "$OUT" 3.0 300
#   MODE=scratch SIZE=testbed-wide SMOKE=0 BENCH=0 bash benchmarks/gpu_session.sh "$OUT" 3.0 560
# EXTRA adds build arguments (EXTRA=quick=true: a local smoke run of this script).
# MODE=scratch builds new models from scratch (VAE included) and returns each family's whole
# folder as OUT/<family>.tar; its build.json is the new run's alone (merge the rewards' entries
# and the earlier `builds` back by hand before shipping).
#
# Python packages the device image lacks travel as wheels in .whl/ (see the device tool's README);
# in session 6 (torch 2.11, transformers 5.17 there) these were enough, for cp312 manylinux:
#   diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth datasets==5.2.0 dill multiprocess
#   pydantic pydantic_core annotated-types typing-inspection importlib_metadata   (about 12 MB)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [MINUTES_PER_FAMILY] [BUDGET_S]}
minutes=${2:-2.0}
budget=${3:-570}
families=${FAMILIES:-[sd,sd3]}
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
if [ -d .whl ] && [ "${WHEELS:-1}" = 1 ]; then  # WHEELS=0: use the installed packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

if [ "${SMOKE:-1}" = 1 ]; then
  echo "== smoke build ($SECONDS s)"
  python3 -m visalign.cli testbed build quick=true out=/tmp/smoke/assets work_dir=/tmp/smoke/work reward_family=null || exit 2
fi

rm -rf /tmp/gpu-assets && cp -r assets/testbed /tmp/gpu-assets
common=("families=$families" denoiser_minutes="$minutes" batch_size="${BATCH:-256}" num_workers=12 num_images=16000
        eval_images_per_prompt=4 reward_family=null out=/tmp/gpu-assets work_dir=/tmp/gpu-work ${EXTRA:-})
if [ "${MODE:-continue}" = scratch ]; then
  echo "== from-scratch build, size ${SIZE:-testbed}, $minutes min per family ($SECONDS s)"
  python3 -m visalign.cli testbed build "${common[@]}" size="${SIZE:-testbed}" || exit 3
  cp /tmp/gpu-assets/build.json "$out/"
  for family in $(echo "$families" | tr -d '[] ' | tr ',' ' '); do tar cf "$out/$family.tar" -C /tmp/gpu-assets "$family"; done
else
  echo "== continued build, $minutes min per family ($SECONDS s)"
  python3 -m visalign.cli testbed build init_from=/tmp/gpu-assets "${common[@]}" || exit 3
  cp /tmp/gpu-assets/build.json "$out/"
  for family in $(echo "$families" | tr -d '[] ' | tr ',' ' '); do
    case $family in sd) denoiser=unet; encoders="text_encoder";; sd3) denoiser=transformer; encoders="text_encoder text_encoder_2";; esac
    mkdir -p "$out/$family"
    cp "/tmp/gpu-assets/$family/$denoiser/diffusion_pytorch_model.safetensors" "$out/$family/$denoiser.safetensors"
    for encoder in $encoders; do cp "/tmp/gpu-assets/$family/$encoder/model.safetensors" "$out/$family/$encoder.safetensors"; done
  done
fi

echo "== cuda_check ($SECONDS s)"
left=$((budget - SECONDS))
[ "$left" -gt 30 ] && timeout "$((left < 150 ? left : 150))" python3 benchmarks/cuda_check.py ${CUDA_CHECK_ARGS:-} --out "$out/cuda_check.json"

echo "== bench_dpo ($SECONDS s)"
left=$((budget - SECONDS))
[ "${BENCH:-1}" = 1 ] && [ "$left" -gt 30 ] && timeout "$left" python3 benchmarks/bench_dpo.py --repeats 7 --full-size-latent 64 --full-size-repeats 5
echo "== done ($SECONDS s)"
