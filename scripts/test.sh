#!/usr/bin/env bash
# Set up (first run only), then run every check: lint, format, types, and the whole test suite
# (unit tests on a fake engine; end-to-end tests on the real vLLM CPU engine; deployment checks;
# the load-test tools). It ends with the ten slowest tests and the time it took.
#
#   scripts/test.sh                 everything (what CI runs)
#   scripts/test.sh --fast          ruff, mypy and the tests without a real engine, on all cores
#   scripts/test.sh tests/unit -x   extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
t0=$SECONDS
fast=0
if [ "${1:-}" = --fast ]; then
  fast=1
  shift
fi
lane=$([ "$fast" = 1 ] && echo "--fast" || echo "full")
work="$(mktemp -d)"
setup_s=0
report() {
  rc=$?
  [ -z "${mypy_pid:-}" ] || kill "$mypy_pid" 2>/dev/null || true  # if pytest was interrupted
  echo "== time: $lane run $( ((rc == 0)) && echo passed || echo FAILED) in $((SECONDS - t0)) s" \
    "(set-up ${setup_s} s, checks and tests $((SECONDS - t0 - setup_s)) s)"
  rm -rf "$work"
}
trap report EXIT

# While the set-up runs: the metrics test scrapes the server with a real Prometheus (Debian's
# package), and the deploy tests use pinned tools in .tools/ (both install once).
prometheus_pid=
if [ "$fast" = 0 ] && ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 &&
  [ "$(id -u)" = 0 ]; then
  echo "== installing prometheus (Debian package) for the scrape test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus) >"$work/prometheus.log" 2>&1 &
  prometheus_pid=$!
fi
# The deploy tests install their tools themselves when they must (and report a failure there).
bash tests/deploy/install_tools.sh >/dev/null 2>&1 &
tools_pid=$!
scripts/setup.sh
wait "$tools_pid" || true
if [ -n "$prometheus_pid" ]; then
  wait "$prometheus_pid" || { cat "$work/prometheus.log"; exit 1; }
fi
setup_s=$((SECONDS - t0))

# One command per line: `set -e` does not stop on a failure inside an && chain.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# mypy runs beside pytest (a minute on a fresh clone, seconds once its cache is warm); its
# verdict is printed after the tests.
.venv/bin/mypy >"$work/mypy.log" 2>&1 &
mypy_pid=$!
echo "== pytest ($lane)"
pytest_args=(--durations=10)
if [ "$fast" = 1 ]; then
  # One worker more than the cores (at most 4): a worker waiting on a subprocess (the load
  # tools' CLIs, a fresh vLLM import) leaves its core to the spare one. On 2 cores, the whole
  # --fast in alternating runs: 56-66 s with 3 workers against 60-71 s with 2 (pytest alone
  # with 4: 68-81 s). --dist loadfile: a module's tests on one worker, so its fixtures are
  # built once.
  workers=$(($(nproc) + 1))
  pytest_args+=(-m "not e2e" -n "$((workers < 4 ? workers : 4))" --dist loadfile)
fi
pytest_rc=0
.venv/bin/python -m pytest "${pytest_args[@]}" "$@" || pytest_rc=$?
echo "== mypy"
mypy_rc=0
wait "$mypy_pid" || mypy_rc=$?
mypy_pid=
cat "$work/mypy.log"
[ "$pytest_rc" = 0 ] && [ "$mypy_rc" = 0 ]
