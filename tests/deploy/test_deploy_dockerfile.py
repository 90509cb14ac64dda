"""Dockerfile.gpu: hadolint-clean and built the way the deployment expects."""

from __future__ import annotations

import json
import re
import subprocess

import deploylib as dl


def test_hadolint_clean(tools):
    proc = subprocess.run(
        [str(dl.HADOLINT), "--no-color", "--failure-threshold", "info", str(dl.DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tools, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run(
        [str(dl.HADOLINT), "--no-color", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_structure():
    ins = dl.dockerfile_instructions()
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dl.DOCKERFILE.read_text(), re.M))
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        assert re.fullmatch(
            r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", image
        ), image
    assert any("--from=builder" in rest and "/opt/venv" in rest for w, rest in ins if w == "COPY")
    assert any(w == "RUN" and "[${EXTRA}]" in rest and "pip install" in rest for w, rest in ins)
    assert re.search(r"^ARG EXTRA=gpu$", dl.DOCKERFILE.read_text(), re.M)
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1].split(":")[0] == "1000"
    env = dl.dockerfile_env()
    volumes = [v for w, rest in ins if w == "VOLUME" for v in json.loads(rest)]
    assert any(env["HF_HOME"].startswith(v.rstrip("/") + "/") for v in volumes), (
        env["HF_HOME"],
        volumes,
    )
    entry = [rest for w, rest in ins if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["python", "-m", "serve"]
    hc = " ".join(rest for w, rest in ins if w == "HEALTHCHECK")
    assert "urllib" in hc and "/health" in hc and "curl" not in hc


def test_dockerignore_keeps_context_small():
    lines = [
        ln.strip()
        for ln in (dl.REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list style expected"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for w, rest in dl.dockerfile_instructions():
        if w == "COPY" and "--from" not in rest:
            copied |= {p.rstrip("/") for p in rest.split()[:-1]}
    assert copied <= allowed, f"COPY uses paths excluded from the context: {copied - allowed}"
    assert not allowed & {".venv", ".git", ".tools", "tests", "k8s"}
