#!/usr/bin/env bash
# Set up (first run only) and start the server. Every argument goes to `python -m serve`;
# with no --model it serves the built-in demo model. See `scripts/serve.sh --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m serve "$@"
