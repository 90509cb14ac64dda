"""Device side of the GPU benchmark: stage carried wheels, install them, build a model, bench.

Driven by ``scripts/device/run_gpu_bench.sh``; each step is a subcommand so the shell script
stays short and each step can be rerun alone:

    stage     copy this call's carried parts (.device-carry/c*/) to STAGE_DIR, verified
    install   reassemble the wheels from their parts and pip-install them into SITE_DIR
    model     build a Llama-3.1-8B-shaped model with random bf16 weights (made on the GPU)
    bench     start our server, then vLLM's own, on the model; run loadtest.bench on each;
              copy the results under $OUT; print a short table last

Python 3.11+ (the device has 3.12, the local .venv 3.11); only the standard library at the
top, since ``stage`` and ``install`` run before the carried packages are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".device-carry"
MANIFEST = "manifest.json"
MIB = 1024 * 1024

# Llama-3.1-8B's shape. BENCH_LAYERS shrinks only the depth, if a session needs a faster run.
LLAMA_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
MODEL_VERSION = "1"  # bump when the builder changes, so a warm machine rebuilds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- stage and install


def _load_manifest(stage: Path, carry: Path) -> dict[str, Any]:
    for cand in [*sorted(carry.glob(f"c*/{MANIFEST}")), stage / MANIFEST]:
        if cand.is_file():
            return dict(json.loads(cand.read_text()))
    raise SystemExit("no manifest: carry a .device-carry/cN folder (see docs/gpu-benchmark.md)")


def stage(stage_dir: Path, carry: Path = CARRY) -> list[str]:
    """Copy verified parts from every carried call folder; return the names still missing.

    Parts live outside the repository copy, so a later call that carries another folder cannot
    remove them; they last as long as the machine stays warm.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(stage_dir, carry)
    (stage_dir / MANIFEST).write_text(json.dumps(manifest))
    for call in manifest["calls"]:
        src_dir = carry / call["dir"]
        for item in call["items"]:
            dst = stage_dir / item["name"]
            if dst.is_file() and dst.stat().st_size == item["size"]:
                continue
            src = src_dir / item["name"]
            if not src.is_file():
                continue
            if sha256(src) != item["sha256"]:
                raise SystemExit(f"{src}: checksum mismatch (carried file damaged or stale)")
            shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
            dst.with_name(dst.name + ".tmp").replace(dst)
    missing: list[str] = []
    for call in manifest["calls"]:
        names = [i["name"] for i in call["items"] if not (stage_dir / i["name"]).is_file()]
        if names:
            missing.append(f"{call['dir']} ({len(names)} file(s))")
    done = len(manifest["calls"]) - len(missing)
    log(f"staged {done}/{len(manifest['calls'])} call folder(s) in {stage_dir}")
    return missing


def assemble(stage_dir: Path) -> list[Path]:
    """Join each wheel's staged parts (checked against the manifest); return the wheels."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    wheels = stage_dir / "wheels"
    wheels.mkdir(exist_ok=True)
    parts: dict[str, list[dict[str, Any]]] = {}
    for call in manifest["calls"]:
        for item in call["items"]:
            parts.setdefault(item["source"], []).append(item)
    for name, meta in manifest["wheels"].items():
        out = wheels / name
        if not (out.is_file() and out.stat().st_size == meta["size"]):
            with out.with_name(name + ".tmp").open("wb") as f:
                for item in sorted(parts[name], key=lambda i: i["offset"]):
                    with (stage_dir / item["name"]).open("rb") as p:
                        shutil.copyfileobj(p, f, 16 * MIB)
            out.with_name(name + ".tmp").replace(out)
        if sha256(out) != meta["sha256"]:
            raise SystemExit(f"{name}: checksum mismatch after reassembly")
    return sorted(wheels / n for n in manifest["wheels"])


def install(stage_dir: Path, site_dir: Path, python: str) -> None:
    """Install the reassembled wheels (no index, no deps) into ``site_dir``, once."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    key = hashlib.sha256(json.dumps(manifest["wheels"], sort_keys=True).encode()).hexdigest()
    marker = site_dir / f".installed-{key[:16]}"
    if marker.is_file():
        log(f"wheels already installed in {site_dir}")
        return
    wheels = assemble(stage_dir)
    if site_dir.exists():
        shutil.rmtree(site_dir)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--target", str(site_dir)]
    cmd += [str(w) for w in wheels]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    marker.write_text(key)
    log(f"installed {len(manifest['wheels'])} wheels in {time.monotonic() - t0:.0f} s")


# ---------------------------------------------------------------- the benchmark model


def pad_tokenizer_vocab(tokenizer_json: Path, size: int) -> int:
    """Grow the BPE vocabulary to ``size`` with unreachable tokens that still decode to text.

    The trained tokenizer has ~1k tokens; the model samples from 128k. Ids past the tokenizer
    would decode to nothing, so most streamed chunks would be empty and the latency numbers
    meaningless. Filler tokens (" x1f3a": letters of the byte-level alphabet, made by no merge)
    are never produced by encoding, so prompts tokenize exactly as before.
    """
    data = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab.values()) | {int(t["id"]) for t in data.get("added_tokens", [])}
    if max(taken) >= size:
        raise ValueError(f"tokenizer already has id {max(taken)} >= {size}")
    next_id, n = 0, 0
    while len(taken) < size:
        while next_id in taken:
            next_id += 1
        token = f"\u0120x{n:x}"  # \u0120 is the byte-level alphabet's space
        n += 1
        if token in vocab:
            continue
        vocab[token] = next_id
        taken.add(next_id)
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
    return len(taken)


def build_model(out_dir: Path, *, layers: int, device: str, shape: dict[str, Any]) -> Path:
    """Write config, tokenizer and random bf16 safetensors shards for a Llama of ``shape``."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from serve.demo_model import BOS, EOS, train_tokenizer

    shape = dict(shape, num_hidden_layers=layers)
    stamp = json.dumps({"v": MODEL_VERSION, "shape": shape}, sort_keys=True)
    marker = out_dir / "BENCH_MODEL"
    if marker.is_file() and marker.read_text() == stamp:
        log(f"model already built in {out_dir}")
        return out_dir
    t0 = time.monotonic()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train_tokenizer(out_dir)
    vocab = int(shape["vocab_size"])
    pad_tokenizer_vocab(out_dir / "tokenizer.json", vocab)
    tok_json = json.loads((out_dir / "tokenizer.json").read_text())
    ids = {t["content"]: int(t["id"]) for t in tok_json["added_tokens"]}
    bos, eos = ids[BOS], ids[EOS]
    h, inter = int(shape["hidden_size"]), int(shape["intermediate_size"])
    heads, kv = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
    hd = h // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "bfloat16",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": True})
    )
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        # std 0.02 like a fresh Llama; made on the device: 8B normals on the CPU take minutes.
        t = torch.empty(dims, dtype=torch.bfloat16, device=device)
        return t.normal_(0.0, 0.02, generator=gen).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(vocab, h)},
        {"lm_head.weight": rand(vocab, h), "model.norm.weight": ones(h)},
    ]
    per_shard = 4  # ~1.7 GB per shard of 4 Llama-8B layers
    for i in range(layers):
        if i % per_shard == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update(
            {
                p + "self_attn.q_proj.weight": rand(heads * hd, h),
                p + "self_attn.k_proj.weight": rand(kv * hd, h),
                p + "self_attn.v_proj.weight": rand(kv * hd, h),
                p + "self_attn.o_proj.weight": rand(h, heads * hd),
                p + "mlp.gate_proj.weight": rand(inter, h),
                p + "mlp.up_proj.weight": rand(inter, h),
                p + "mlp.down_proj.weight": rand(h, inter),
                p + "input_layernorm.weight": ones(h),
                p + "post_attention_layernorm.weight": ones(h),
            }
        )
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    marker.write_text(stamp)
    log(f"built {total / 1e9:.1f} GB model ({layers} layers) in {time.monotonic() - t0:.0f} s")
    return out_dir


# ---------------------------------------------------------------- bench


def _bench_target(
    name: str,
    cmd: list[str],
    port: int,
    work: Path,
    bench_args: list[str],
    python: str,
    deadline: float,
    ready_paths: Sequence[str],
    ready_cap_s: float,
) -> dict[str, Any] | None:
    sys.path.insert(0, str(ROOT))
    from loadtest.servers import ServerProcess

    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    if left < 60:
        log(f"{name}: skipped, only {left:.0f} s left before the deadline")
        return None
    t0 = time.monotonic()
    with ServerProcess(
        name, cmd, port, log_path=out / "server.log", ready_paths=ready_paths, cwd=ROOT
    ) as srv:
        try:
            # Capped, so that one server stuck in compilation cannot take the other's time.
            wait = min(ready_cap_s, deadline - time.monotonic() - 40)
            srv.wait_ready(timeout_s=max(30.0, wait))
        except (RuntimeError, TimeoutError) as exc:
            log(f"{name}: not ready: {exc}")
            raise NotReady(str(exc)) from exc
        ready_s = time.monotonic() - t0
        log(f"{name}: ready in {ready_s:.0f} s")
        before = _scrape(srv.base_url)
        bench = [python, "-m", "loadtest.bench", "--base-url", srv.base_url + "/v1"]
        bench += ["--model", "bench", "--label", name, "--out", str(out), "--no-progress"]
        bench += bench_args
        left = deadline - time.monotonic()
        try:
            proc = subprocess.run(
                bench, cwd=ROOT, timeout=max(10.0, left), capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            log(f"{name}: bench cut at the deadline")
            return None
        (out / "bench.log").write_text(proc.stdout + "\n" + proc.stderr)
        print(proc.stdout, file=sys.stderr)
        after = _scrape(srv.base_url)
        _save_metrics(after, out)
        cpu_per_token = frontend_cpu_us_per_token(before, after)
        if proc.returncode != 0 or not (out / "results.json").is_file():
            log(f"{name}: bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            return None
    result = dict(json.loads((out / "results.json").read_text()))
    result["ready_s"] = ready_s
    result["frontend_cpu_us_per_token"] = cpu_per_token
    return result


class NotReady(Exception):
    """The server exited or timed out before it answered its readiness probe."""


def _scrape(base_url: str) -> str:
    """One /metrics scrape ("" when it fails: a measurement aid, never a reason to stop)."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode(errors="replace"))
    except OSError as exc:  # URLError and HTTPError are OSErrors
        log(f"/metrics scrape failed: {exc}")
        return ""


def metric_sum(text: str, name: str) -> float | None:
    """Sum of the samples of ``name`` in a Prometheus text scrape; None when it has none."""
    from prometheus_client.parser import text_string_to_metric_families  # in the image

    values = [
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
    return sum(values) if values else None


def frontend_cpu_us_per_token(before: str, after: str) -> float | None:
    """Front-end CPU per generated token between two scrapes of the same server.

    ``process_cpu_seconds_total`` is the API server's own process (the engine core is a child
    process, not counted); ``vllm:generation_tokens_total`` counts tokens in both servers.
    """
    cpu = [metric_sum(t, "process_cpu_seconds_total") for t in (before, after)]
    tokens = [metric_sum(t, "vllm:generation_tokens_total") for t in (before, after)]
    if None in cpu or None in tokens:
        return None
    made = tokens[1] - tokens[0]  # type: ignore[operator]
    return (cpu[1] - cpu[0]) / made * 1e6 if made > 0 else None  # type: ignore[operator]


def _save_metrics(text: str, out: Path) -> None:
    """Keep the scrape after the load: proof the Prometheus path works on this engine."""
    if not text:
        return
    (out / "metrics.txt").write_text(text)
    ours = [ln for ln in text.splitlines() if ln.startswith("avatar_") and "_bucket" not in ln]
    ours = [ln for ln in ours if "_created" not in ln]
    log(f"/metrics: {len(text.splitlines())} lines, {len(ours)} avatar_* samples (no buckets)")
    for ln in ours[:30]:
        print("  " + ln, file=sys.stderr)


def _log_highlights(log_path: Path, limit: int = 25) -> None:
    """Print the engine's start-up facts (backend, compile, graphs, KV cache) from a server log."""
    keys = ("backend", "torch.compile", "graph", "KV cache", "Loading weights", "init engine")
    keys += ("Error", "error:", "Traceback")
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    hits = [ln for ln in lines if any(k in ln for k in keys)]
    for ln in hits[:limit]:
        print("  | " + ln[:300], file=sys.stderr)


def _row(name: str, lv: dict[str, Any]) -> str:
    s = lv["summary"]

    def f(v: float | None, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    return (
        f"{name:<5} {lv['level']:>4g} {s['completed']:>5} {s['errors']:>4} "
        f"{f(s['output_token_throughput'], 0):>8} {f(s['ttft_ms']['p50']):>9} "
        f"{f(s['ttft_ms']['p99']):>9} {f(s['itl_ms']['p50'], 2):>8} {f(s['itl_ms']['p99'], 2):>8}"
    )


def summary_table(results: dict[str, dict[str, Any] | None]) -> list[str]:
    header = (
        f"{'srv':<5} {'conc':>4} {'ok':>5} {'err':>4} {'tok/s':>8} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    )
    lines = [header]
    for name, res in results.items():
        if res is None:
            lines.append(f"{name:<5} FAILED or skipped (see its server.log in bench-all.tar.gz)")
            continue
        lines += [_row(name, lv) for lv in res["levels"]]
    ours, theirs = results.get("ours"), results.get("vllm")
    if ours and theirs:
        for a, b in zip(ours["levels"], theirs["levels"], strict=False):
            sa, sb = a["summary"], b["summary"]
            ratio = []
            for key, label in (("ttft_ms", "TTFT p50"), ("itl_ms", "ITL p50")):
                x, y = sa[key]["p50"], sb[key]["p50"]
                ratio.append(f"{label} {x / y:.2f}x" if x and y else f"{label} -")
            x, y = sa["output_token_throughput"], sb["output_token_throughput"]
            ratio.append(f"tok/s {x / y:.2f}x" if x and y else "tok/s -")
            lines.append(f"ours/vllm conc {a['level']:g}: " + ", ".join(ratio))
    for name, res in results.items():
        cpu = (res or {}).get("frontend_cpu_us_per_token")
        if cpu is not None:
            lines.append(f"{name} front-end CPU: {cpu:.1f} us per output token (all levels)")
    return lines


def collect(work: Path, out: Path, results: dict[str, dict[str, Any] | None], table: str) -> None:
    """At most 8 files come back, 2 folders deep: the key ones, plus one archive of all."""
    out.mkdir(parents=True, exist_ok=True)
    for name in results:
        src = work / name
        if not src.is_dir():
            continue
        for fname in ("results.json", "summary.csv", "latency_throughput.png"):
            if (src / fname).is_file():
                (out / name).mkdir(exist_ok=True)
                shutil.copyfile(src / fname, out / name / fname)
    (out / "summary.md").write_text("```\n" + table + "\n```\n")
    with tarfile.open(out / "bench-all.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="bench")


def bench(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget_s
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from loadtest.servers import engine_flags, free_port, ours_command, vllm_command

    flags = engine_flags(
        args.model,
        "bench",
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes or None,
        enforce_eager=args.enforce_eager,
        extra=args.engine_extra.split() if args.engine_extra else (),
    )
    bench_args = args.bench_args.split()
    py = args.python
    # One at a time: one GPU does not hold two engines with the default memory share.
    targets = [
        ("ours", ours_command, f"{py} -m serve", ("/ready",)),
        ("vllm", vllm_command, f"{py} -m vllm.entrypoints.openai.api_server", ("/health",)),
    ]
    if args.api_servers > 1:
        # Last, and optional: several front ends over one engine core (--api-server-count).
        n = args.api_servers
        targets.append(
            (f"ours_x{n}", ours_command, f"{py} -m serve --api-server-count {n}", ("/ready",))
        )
    results: dict[str, dict[str, Any] | None] = {}
    used_flags: dict[str, list[str]] = {}
    for name, make_cmd, base, ready in targets:
        target_flags = flags
        for attempt in (1, 2):
            port = free_port()
            cmd = make_cmd(target_flags, port, base)
            log(f"{name}: {' '.join(cmd)}")
            used_flags[name] = target_flags
            try:
                results[name] = _bench_target(
                    name, cmd, port, work, bench_args, py, deadline, ready, args.ready_cap_s
                )
            except NotReady:
                results[name] = None
                # The device runs once per session: when a start fails (a torch.compile or
                # CUDA-graph problem on an untested stack), try once more without them.
                left = deadline - time.monotonic()
                if attempt == 1 and "--enforce-eager" not in target_flags and left > 180:
                    log(f"{name}: retrying with --enforce-eager")
                    target_flags = [*flags, "--enforce-eager"]
                    continue
            else:
                # A start that needed --enforce-eager sets it for the later servers too, so the
                # comparison stays fair; a server that fails either way leaves the flags alone.
                flags = target_flags
            break
        _log_highlights(work / name / "server.log")
    (work / "meta.json").write_text(
        json.dumps(
            {
                "flags": used_flags,
                "bench_args": bench_args,
                "model": args.model,
            },
            indent=1,
        )
    )
    table = "\n".join(summary_table(results))
    if len({tuple(f) for f in used_flags.values()}) > 1:
        differ = "; ".join(f"{n}: {' '.join(f)}" for n, f in used_flags.items())
        table += "\nflags differ: " + differ
    collect(work, Path(args.out), results, table)
    print(table, flush=True)
    # Several front ends are an optional extra: the two servers side by side are the result.
    return 0 if results.get("ours") and results.get("vllm") else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--stage-dir", default="/tmp/avatar-carry")
    i = sub.add_parser("install")
    i.add_argument("--stage-dir", default="/tmp/avatar-carry")
    i.add_argument("--site-dir", default="/tmp/avatar-site")
    m = sub.add_parser("model")
    m.add_argument("dir")
    m.add_argument("--layers", type=int, default=LLAMA_8B["num_hidden_layers"])
    m.add_argument("--device", default="cuda")
    m.add_argument("--tiny", action="store_true", help="a small shape, for tests on the CPU")
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--work", default="/tmp/avatar-bench")
    b.add_argument("--python", default=sys.executable)
    b.add_argument("--max-model-len", type=int, default=4096)
    b.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    b.add_argument("--enforce-eager", action="store_true")
    b.add_argument("--engine-extra", default="", help="more engine flags for both servers")
    b.add_argument("--bench-args", default="", help="flags for python -m loadtest.bench")
    b.add_argument("--budget-s", type=float, default=420.0, help="time for both servers")
    b.add_argument(
        "--api-servers",
        type=int,
        default=0,
        help="also bench ours with --api-server-count N (N > 1), after the two servers",
    )
    b.add_argument(
        "--ready-cap-s", type=float, default=300.0, help="longest wait for one server's start"
    )
    args = ap.parse_args(argv)
    if args.cmd == "stage":
        missing = stage(Path(args.stage_dir))
        if missing:
            log("not yet staged: " + ", ".join(missing))
        return 0
    if args.cmd == "install":
        missing = stage(Path(args.stage_dir))
        if missing:
            log(
                "MISSING parts: " + ", ".join(missing) + ". The machine was given back between "
                "calls (or a call was skipped): make the calls again from call 1."
            )
            return 3
        install(Path(args.stage_dir), Path(args.site_dir), sys.executable)
        return 0
    if args.cmd == "model":
        shape = dict(LLAMA_8B)
        if args.tiny:
            shape = shape | {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "vocab_size": 2048,
            }
        build_model(Path(args.dir), layers=args.layers, device=args.device, shape=shape)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
