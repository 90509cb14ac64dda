#!/usr/bin/env bash
# Ours and vLLM's server side by side under the same soak, same engine flags, at the same time.
set -u
cd /work/main
KEY=soak-key
ENGINE=(--model .cache/demo-model --served-model-name avatar-demo --max-model-len 2048 --kv-cache-memory-bytes 1073741824 --enforce-eager --enable-prefix-caching)
setsid .venv/bin/python -m serve --host 127.0.0.1 --port 18700 --api-key $KEY --max-running-requests 8 --max-waiting-requests 8 "${ENGINE[@]}" > /tmp/soak/ours.log 2>&1 &
OURS=$!
setsid .venv/bin/python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 18701 --api-key $KEY --max-num-seqs 8 "${ENGINE[@]}" > /tmp/soak/vllm.log 2>&1 &
VLLM=$!
echo "ours=$OURS vllm=$VLLM"
for port in 18700 18701; do
  for i in $(seq 1 300); do curl -s -m 2 -o /dev/null -w '%{http_code}' localhost:$port/health | grep -q 200 && break; sleep 1; done
done
echo "both up at $(date +%T)"
MIN=${MIN:-30}
.venv/bin/python -m loadtest.soak --base-url http://127.0.0.1:18700 --api-key $KEY --minutes $MIN --concurrency 4 --burst-size 32 --pid $OURS --seed 0 --out /tmp/soak/ours --progress-every 300 > /tmp/soak/ours.soak.txt 2>&1 &
A=$!
.venv/bin/python -m loadtest.soak --base-url http://127.0.0.1:18701 --api-key $KEY --minutes $MIN --concurrency 4 --burst-size 32 --pid $VLLM --seed 0 --out /tmp/soak/vllm --progress-every 300 > /tmp/soak/vllm.soak.txt 2>&1 &
B=$!
wait $A $B
echo "soaks done at $(date +%T)"
kill -TERM -- -$OURS -$VLLM 2>/dev/null
wait
