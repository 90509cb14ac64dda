"""Production behaviour on the real vLLM CPU engine: clients giving up, hostile input, limits,
access log, a real Prometheus scraping us. The run's shared server, and the shared one with
admission limits (tests/e2e/conftest.py); drain and engine death are in their own modules
because they end their server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings

from tests.support import (
    ENDLESS_TOKENS,
    MODEL,
    TEST_API_KEY,
    ServerProcess,
    free_port,
    metric_value,
    wait_until,
)
from tests.support import LIMITED_QUEUE_TIMEOUT_S as QUEUE_TIMEOUT_S
from tests.unit.test_fuzz import bodies, messages

# An answer no test waits for to its end (tests.support.ENDLESS_TOKENS).
LONG = {"max_tokens": ENDLESS_TOKENS, "ignore_eos": True}


def chat(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi there!"}], **extra}


def engine_idle(server: ServerProcess) -> bool:
    text = server.metrics()
    return (
        metric_value(text, "avatar_engine_unfinished_requests") == 0
        and metric_value(text, "avatar_requests_running") == 0
        and metric_value(text, "avatar_requests_waiting") == 0
    )


async def test_two_hundred_clients_that_give_up(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    """Clients time out before the first token, mid-stream, or while a non-streaming answer is
    built; each departure aborts its engine request."""
    gave_up = 0
    before = server.metrics()

    host, port = server.base_url.removeprefix("http://").split(":")

    async def one(i: int) -> None:
        nonlocal gave_up
        # The client's whole budget, 0.2 s .. 2.9 s: long enough for the request to reach a
        # busy server, far too short for an endless answer.
        deadline = 0.2 + (i % 10) * 0.3
        payload = json.dumps(chat(stream=i % 2 == 0, **LONG)).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: {auth_headers['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        # A bare asyncio client: its timeout always takes effect and closing it always closes
        # the socket. (An HTTP library's pool once swallowed the cancellation of 50 requests
        # on a loaded machine, and read their answers to the end.) The budget starts once a
        # slot is free, so every request reaches the server before its client gives up.
        async with slots:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                async with asyncio.timeout(deadline):
                    writer.write(head.encode() + payload)
                    while await reader.read(65536):
                        pass
            except TimeoutError:
                gave_up += 1
            finally:
                writer.close()

    slots = asyncio.Semaphore(50)
    await asyncio.gather(*(one(i) for i in range(200)))
    # No client can finish an endless answer within its budget.
    assert gave_up == 200
    wait_until(lambda: engine_idle(server), timeout=30, what="engine idle after 200 departures")
    after = server.metrics()

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    # A client may leave before its request is even read (the server never sees it); on a
    # loaded machine a few do. Every request the server did see ended as a departure.
    seen = grew("avatar_requests_total", endpoint="chat")
    assert seen >= 150, f"only {seen} requests reached the server"
    assert (
        grew("avatar_requests_total", endpoint="chat", status="499", finish_reason="abort") == seen
    )
    assert grew("avatar_client_disconnects_total") == seen
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", json=chat(max_tokens=5), headers=auth_headers
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


async def test_abort_reaches_the_engine_quickly(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST", f"{server.base_url}/v1/chat/completions",
            json=chat(stream=True, **LONG), headers=auth_headers,
        ) as resp,
    ):  # fmt: skip
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                break
        assert metric_value(server.metrics(), "avatar_engine_unfinished_requests") == 1
    left = time.perf_counter()
    wait_until(
        lambda: metric_value(server.metrics(), "avatar_engine_unfinished_requests") == 0,
        timeout=10, interval=0.005, what="abort",
    )  # fmt: skip
    print(f"\nabort reached the engine {1000 * (time.perf_counter() - left):.1f} ms after close")


async def test_hostile_input_leaves_other_requests_alone(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    json_h = {**auth_headers, "content-type": "application/json"}
    cases: list[tuple[str, dict[str, str], bytes, int]] = [
        ("oversize body", json_h, b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413),
        ("wrong content type", {**auth_headers, "content-type": "text/plain"}, b"{}", 415),
        ("non-object JSON", json_h, b"[1, 2, 3]", 400),
        ("invalid UTF-8", json_h, b'{"model": "\xff\xfe"}', 400),
        ("wrong type", json_h, json.dumps(chat(max_tokens="ten")).encode(), 400),
        ("negative max_tokens", json_h, json.dumps(chat(max_tokens=-1)).encode(), 400),
        ("huge max_tokens", json_h, json.dumps(chat(max_tokens=10**9)).encode(), 400),
        ("empty messages", json_h, json.dumps({"model": MODEL, "messages": []}).encode(), 400),
        ("role not a string", json_h,
         json.dumps({"model": MODEL, "messages": [{"role": 7, "content": "a"}]}).encode(), 400),
        ("prompt over the window", json_h,
         json.dumps(chat(messages=[{"role": "user", "content": "zq" * 20000}])).encode(), 400),
        ("too many stops", json_h,
         json.dumps(chat(stop=[str(i) for i in range(40)])).encode(), 400),
        ("no Bearer", {"authorization": TEST_API_KEY, "content-type": "application/json"},
         json.dumps(chat()).encode(), 401),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=60) as client:
        bystander = asyncio.create_task(
            client.post(
                url, json=chat(stream=True, max_tokens=1500, ignore_eos=True), headers=auth_headers
            )
        )
        for name, headers, body, status in cases:
            r = await client.post(url, content=body, headers=headers)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
        done = await bystander
    assert done.status_code == 200
    assert done.text.endswith("data: [DONE]\n\n")
    last = json.loads(done.text.split("\n\n")[-3].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies({"messages": messages}))
def test_fuzz_real_engine_never_500(server: ServerProcess, body: object) -> None:
    """The same fuzzing as the unit suite, fewer cases, through the real engine's validation."""
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 64)
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", content=json.dumps(body),
        headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=60,
    )  # fmt: skip
    assert r.status_code in {200, 400, 404, 415}, (r.status_code, r.text[:300])


async def test_access_log_has_ids_and_no_secrets(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    secret_prompt = "my-private-words-0451"
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json=chat(messages=[{"role": "user", "content": secret_prompt}], max_tokens=3),
        headers={**auth_headers, "X-Request-Id": "trace-abc-123"},
    )
    assert r.headers["x-request-id"] == "trace-abc-123"

    def entry() -> dict[str, object] | None:
        for line in server.log().splitlines():
            if '"request_id":"trace-abc-123"' in line:
                return json.loads(line.split("serve.access: ", 1)[1])  # type: ignore[no-any-return]
        return None

    logged = wait_until(entry, 10, what="access log line")
    assert logged["status"] == 200 and logged["output_tokens"] == 3
    assert isinstance(logged["ttft_ms"], float) and isinstance(logged["duration_ms"], float)
    log_text = server.log()
    assert TEST_API_KEY not in log_text
    assert secret_prompt not in log_text


async def test_admission_and_deadline(limited_server: ServerProcess) -> None:
    url = f"{limited_server.base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as client:
        running = [
            asyncio.create_task(client.post(url, json=chat(stream=True, **LONG))) for _ in range(2)
        ]
        metrics_url = f"{limited_server.base_url}/metrics"

        async def until_gauge(name: str, value: float) -> None:
            # Polled on this loop (it keeps the requests moving between polls), not from a
            # worker thread: a thread poll once missed the whole 5 s queue wait.
            async with asyncio.timeout(20):
                while metric_value((await client.get(metrics_url)).text, name) != value:
                    await asyncio.sleep(0.05)

        await until_gauge("avatar_requests_running", 2)
        waiting = asyncio.create_task(client.post(url, json=chat(**LONG)))
        await until_gauge("avatar_requests_waiting", 1)
        started = time.perf_counter()
        refused = await client.post(url, json=chat())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert time.perf_counter() - started < QUEUE_TIMEOUT_S / 2, "refused at once, not queued"
        timed_out = await waiting
        assert timed_out.status_code == 503
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        for task in running:
            r = await task
            assert r.status_code == 200, "admitted requests are not disturbed by the refusals"
            assert '"code":"request_timeout"' in r.text, "cut at --max-request-duration"
            assert r.text.endswith("data: [DONE]\n\n")
    wait_until(lambda: engine_idle(limited_server), 10, what="engine idle after deadline")


def test_prometheus_scrapes_ttft(
    server: ServerProcess, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "the test command installs Debian's prometheus package"
    for _ in range(3):
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json=chat(stream=True, max_tokens=8), headers=auth_headers, timeout=30,
        )  # fmt: skip
    target = server.base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: avatar\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    query = (
        "histogram_quantile(0.5, sum by (le) "
        "(avatar_time_to_first_token_seconds_bucket{job='avatar'}))"
    )
    try:

        def ttft_p50() -> float | None:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
            result = r.json()["data"]["result"]
            if not result:
                return None
            value = float(result[0]["value"][1])
            return value if value == value else None  # NaN until buckets have counts

        p50 = wait_until(ttft_p50, timeout=60, interval=0.5, what="PromQL TTFT p50")
        assert 0 < p50 < 5
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
