"""Start a test-flag server with extra env, stream N concurrent requests, report tok/s and server CPU."""
import asyncio, json, os, sys, time, subprocess, signal
sys.path.insert(0, "/work/main")
from tests.support import MODEL, server_command, ENGINE_ENV, free_port, TEST_API_KEY
import httpx

def cpu_of(pid):
    tot = 0.0
    for p in [pid] + [int(x) for x in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]:
        try:
            f = open(f"/proc/{p}/stat").read().split(")")[-1].split()
            tot += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except FileNotFoundError:
            pass
    return tot

async def stream(c, port, n_tok):
    t0 = time.perf_counter(); first = None; chunks = 0
    async with c.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": n_tok, "ignore_eos": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if first is None: first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks

async def main(extra_env, conc, n_tok):
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra_env}
    log = open(f"/tmp/omp/server-{port}.log", "wb")
    p = subprocess.Popen(server_command(port, "--api-key", TEST_API_KEY), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            dl = time.time() + 120
            while time.time() < dl:
                try:
                    if (await c.get(f"http://127.0.0.1:{port}/ready")).status_code == 200: break
                except httpx.HTTPError: pass
                await asyncio.sleep(0.2)
            await stream(c, port, 8)
            # idle CPU over 2 s
            c0 = cpu_of(p.pid); await asyncio.sleep(2); idle = (cpu_of(p.pid) - c0) / 2
            c0 = cpu_of(p.pid); t0 = time.perf_counter()
            # client-side loop-lag probe
            lags = []
            async def probe():
                while True:
                    s = time.perf_counter(); await asyncio.sleep(0.01); lags.append(time.perf_counter() - s - 0.01)
            pt = asyncio.create_task(probe())
            res = await asyncio.gather(*[stream(c, port, n_tok) for _ in range(conc)])
            pt.cancel()
            wall = time.perf_counter() - t0; cpu = (cpu_of(p.pid) - c0) / wall
            toks = sum(r[2] for r in res)
            lags.sort()
            print(json.dumps({"env": extra_env, "conc": conc, "tok_s": round(toks / wall, 1), "wall": round(wall, 2),
                "ttft_max": round(max(r[0] for r in res), 3), "server_cpu": round(cpu, 2), "idle_cpu": round(idle, 2),
                "client_lag_p99_ms": round(lags[int(len(lags) * .99)] * 1000, 1), "client_lag_max_ms": round(lags[-1] * 1000, 1)}))
    finally:
        os.killpg(p.pid, signal.SIGTERM); p.wait(30)

extra = json.loads(sys.argv[1]); asyncio.run(main(extra, int(sys.argv[2]), int(sys.argv[3])))
