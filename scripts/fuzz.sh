#!/usr/bin/env bash
# The long randomized fuzz (not part of the test command, whose fuzz is derandomized):
# tests/unit/test_fuzz.py with fresh random draws, first on the in-process app over the fake
# engine, then over HTTP against a real server (vLLM CPU engine, demo model) started here on a
# loopback port. Any answer outside the allowed statuses, a 500 above all, fails the run and
# Hypothesis prints the smallest request that causes it (and a @reproduce_failure blob).
#
#   scripts/fuzz.sh                        # 20,000 requests per target (8000 + 8000 + 4000)
#   FUZZ_EXAMPLES=2000 scripts/fuzz.sh     # examples per route (raw bytes get half)
#   FUZZ_TARGETS=fake scripts/fuzz.sh      # fake, real, or fake,real (default)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
examples="${FUZZ_EXAMPLES:-8000}"
targets="${FUZZ_TARGETS:-fake,real}"
py=.venv/bin/python
export AVATAR_FUZZ_PROFILE=long AVATAR_FUZZ_EXAMPLES="$examples"

run_fuzz() {
  echo "== fuzz: $1, $examples examples per route"
  local t0=$SECONDS
  "$py" -m pytest tests/unit/test_fuzz.py -q -p no:cacheprovider -s
  echo "== fuzz: $1 done in $((SECONDS - t0)) s"
}

if [[ ",$targets," == *",fake,"* ]]; then
  run_fuzz "fake engine, in process"
fi

if [[ ",$targets," == *",real,"* ]]; then
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  key="fuzz-$RANDOM$RANDOM"
  log="$(mktemp -t avatar-fuzz-server.XXXXXX.log)"
  # A short window keeps every accepted request quick on the CPU engine.
  setsid "$py" -m serve --host 127.0.0.1 --port "$port" --api-key "$key" \
    --max-model-len 1024 --kv-cache-memory-bytes 268435456 >"$log" 2>&1 &
  server=$!
  trap 'kill -TERM -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
  deadline=$((SECONDS + 300))
  until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do
    if ! kill -0 "$server" 2>/dev/null || ((SECONDS > deadline)); then
      echo "fuzz: the server did not become ready; its log ($log):" >&2
      tail -40 "$log" >&2
      exit 1
    fi
    sleep 0.5
  done
  AVATAR_FUZZ_BASE_URL="http://127.0.0.1:$port" AVATAR_FUZZ_API_KEY="$key" \
    AVATAR_FUZZ_MODEL=avatar-demo run_fuzz "real engine over HTTP (vLLM CPU, demo model)"
  errors=$(grep -c '"status":500' "$log" || true)
  echo "== server log: $errors access-log lines with status 500 ($log)"
  [ "$errors" = 0 ]
fi
