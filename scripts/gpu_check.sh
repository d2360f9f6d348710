#!/usr/bin/env bash
# GPU check, for a CUDA machine that has only this repository and no internet (e.g. a lent device machine).
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. the CUDA-capable tests (tests/test_cuda.py, the host-sync budget, the tiny lossless suite) on the GPU;
# 2. scripts/gpu_profile.py: verification cost c(1..64), EAGLE drafting cost and the loop's per-step overhead on a
#    random-weight Llama-3.1-8B-shaped target in bf16 (timings only; tau is measured on CPU with real weights).
# Python packages the machine lacks (pydantic, platformdirs, gguf, ...) may travel as wheels in ./.whl
# (see /work/.library/device/README.md); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py tests/test_host_syncs.py \
  tests/test_lossless_tiny.py 2>&1 | tee "$OUT/tests.log"
python3 scripts/gpu_profile.py --out "$OUT/gpu_profile.json" 2>&1 | tee "$OUT/gpu_profile.log"
