#!/usr/bin/env bash
# Set up (first run only), then run every check: lint, format, types, and the whole test suite
# (unit tests on a fake engine; end-to-end tests on the real vLLM CPU engine; deployment checks;
# the load-test tools). Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
# The metrics test scrapes the server with a real Prometheus (Debian's package).
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing prometheus (Debian package) for the scrape test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus) >/dev/null
fi
# One command per line: `set -e` does not stop on a failure inside an && chain.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
