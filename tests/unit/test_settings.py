"""Settings: every setting a flag and an env var, vLLM's engine flags unchanged, loud failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.cli import known_cli_flags, known_env_vars, parse_settings
from serve.settings import Settings


def test_flags_win_over_env_and_env_over_defaults() -> None:
    env = {"AVATAR_PORT": "9001", "AVATAR_API_KEY": "a, b", "AVATAR_MAX_MODEL_LEN": "512",
           "AVATAR_DTYPE": "float32"}  # fmt: skip
    s = parse_settings(["--port", "9002", "--max-model-len", "1024"], env)
    assert s.port == 9002
    assert s.api_key == ["a", "b"]
    # A key given on the command line replaces the variable's keys: a rotated-out key must
    # not stay valid because a manifest still sets it.
    assert parse_settings(["--api-key", "new"], env).api_key == ["new"]
    assert s.engine_args["max_model_len"] == 1024
    assert s.engine_args["dtype"] == "float32"
    assert parse_settings([], env).port == 9001
    assert parse_settings([], {}).port == 8000


def test_vllm_serve_command_lines_keep_working() -> None:
    s = parse_settings(
        ["--model", "/models/llama", "--served-model-name", "llama", "avatar",
         "--api-key", "k1", "--api-key", "k2", "--tensor-parallel-size", "2",
         "--max-num-seqs", "64", "--enforce-eager", "--no-enable-prefix-caching",
         "--kv-cache-memory-bytes", "1000000", "--gpu-memory-utilization", "0.85"],
        {},
    )  # fmt: skip
    e = s.engine_args
    assert e["model"] == "/models/llama"
    assert s.served_model_names == ["llama", "avatar"]
    assert s.api_key == ["k1", "k2"]
    assert (e["tensor_parallel_size"], e["max_num_seqs"], e["enforce_eager"]) == (2, 64, True)
    assert e["enable_prefix_caching"] is False
    assert (e["kv_cache_memory_bytes"], e["gpu_memory_utilization"]) == (1000000, 0.85)


def test_avatar_defaults() -> None:
    e = parse_settings([], {}).engine_args
    assert e["enable_prefix_caching"] is True, "every turn resends the conversation prefix"
    assert e["model"] is None, "no --model serves the demo model"


def test_boolean_engine_flags_from_env() -> None:
    assert (
        parse_settings([], {"AVATAR_ENABLE_PREFIX_CACHING": "false"}).engine_args[
            "enable_prefix_caching"
        ]
        is False
    )
    assert parse_settings([], {"AVATAR_ENFORCE_EAGER": "1"}).engine_args["enforce_eager"] is True


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--port", "70000"], {}), (["--max-running-requests", "0"], {}),
     ([], {"AVATAR_PORT": "http"}),
     (["--queue-timeout", "900", "--max-request-duration", "60"], {})],
)  # fmt: skip
def test_invalid_settings_fail_loudly(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, env)
    assert exc.value.code == 2
    assert "invalid settings" in capsys.readouterr().err


def test_unknown_flag_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--no-such-flag"], {})
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("var", "flag"),
    [("AVATAR_LOG_PROMPTS", "--log-prompts"), ("AVATAR_ENFORCE_EAGER", "--enforce-eager")],
)
def test_a_mistyped_boolean_is_an_error_naming_flag_and_variable(
    var: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings([], {var: "ture"})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert var in err and flag in err and "ture" in err


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("YES", True), (" off ", False)])
def test_boolean_words(raw: str, value: bool) -> None:
    assert parse_settings([], {"AVATAR_LOG_PROMPTS": raw}).log_prompts is value


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_PORT", "9999")
    monkeypatch.setenv("AVATAR_API_KEY", "from-the-machine")
    assert parse_settings([], {}).port == 8000
    assert Settings().api_key == []
    assert parse_settings([]).port == 9999  # no mapping given: the process environment


def test_every_setting_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--help=frontend"], {})
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        if name == "engine_args":
            continue
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"AVATAR_{name.upper()}" in help_text
        assert field.description


def test_known_names_cover_frontend_and_engine() -> None:
    flags, env = known_cli_flags(), known_env_vars()
    for flag in ("--model", "--served-model-name", "--host", "--port", "--api-key",
                 "--max-model-len", "--tensor-parallel-size", "--drain-timeout"):  # fmt: skip
        assert flag in flags
    for var in ("AVATAR_MODEL", "AVATAR_PORT", "AVATAR_API_KEY", "AVATAR_MAX_MODEL_LEN",
                "AVATAR_DRAIN_TIMEOUT", "AVATAR_LOG_LEVEL", "HF_TOKEN"):  # fmt: skip
        assert var in env


# -- personas (LoRA adapters) ---------------------------------------------------------------


def test_vllm_lora_command_lines_keep_working(tmp_path: Path) -> None:
    s = parse_settings(
        ["--model", "/m", "--served-model-name", "base", "--enable-lora", "--max-loras", "4",
         "--max-lora-rank", "16", "--max-cpu-loras", "8",
         "--lora-modules", "tutor=/a/tutor",
         '{"name": "guide", "path": "/a/guide", "base_model_name": "base"}'],
        {},
    )  # fmt: skip
    e = s.engine_args
    assert (e["enable_lora"], e["max_loras"], e["max_lora_rank"], e["max_cpu_loras"]) == (
        True, 4, 16, 8,
    )  # fmt: skip
    assert [(m.name, m.path, m.base_model_name) for m in s.lora_modules] == [
        ("tutor", "/a/tutor", None),
        ("guide", "/a/guide", "base"),
    ]


def test_lora_modules_from_the_environment() -> None:
    listed = parse_settings(["--enable-lora"], {"AVATAR_LORA_MODULES": "a=/x/a, b=/x/b"})
    assert [(m.name, m.path) for m in listed.lora_modules] == [("a", "/x/a"), ("b", "/x/b")]
    as_json = (
        '[{"name": "a", "path": "/x/a"}, {"name": "b", "path": "/x/b", "base_model_name": null}]'
    )
    parsed = parse_settings(["--enable-lora"], {"AVATAR_LORA_MODULES": as_json})
    assert [m.name for m in parsed.lora_modules] == ["a", "b"]


def test_vllm_runtime_switch_is_read(tmp_path: Path) -> None:
    argv = ["--enable-lora", "--api-key", "k", "--lora-adapter-root", str(tmp_path)]
    assert parse_settings(
        argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    ).allow_runtime_lora_updating
    assert not parse_settings(argv, {}).allow_runtime_lora_updating
    flag_wins = parse_settings(
        [*argv, "--no-allow-runtime-lora-updating"], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    )
    assert not flag_wins.allow_runtime_lora_updating


_RUNTIME = ["--enable-lora", "--allow-runtime-lora-updating"]
_ROOT = ["--lora-adapter-root", "{root}"]
_GUIDE_OF_Z = '{"name": "a", "path": "/x", "base_model_name": "z"}'


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-modules", "a=/x"], "need --enable-lora"),
        (["--enable-lora", "--lora-modules", "a"], "neither name=path nor JSON"),
        (["--enable-lora", "--lora-modules", "a=/x", "a=/y"], "must be unique"),
        (["--model", "/m", "--served-model-name", "b", "--enable-lora", "--lora-modules", "b=/x"],
         "clash"),
        (["--model", "/m", "--enable-lora", "--lora-modules", _GUIDE_OF_Z],
         "is not a served model name"),
        ([*_RUNTIME, "--api-key", "k"], "needs --lora-adapter-root"),
        ([*_RUNTIME, *_ROOT], "needs --api-key"),
        ([*_RUNTIME, *_ROOT, "--api-key", "k", "--api-server-count", "2"],
         "one front-end process"),
        (["--enable-lora", "--lora-adapter-root", "{root}/missing"], "is not a folder"),
        (["--model", "/m", "--demo-personas"], "drop --model"),
    ],
)  # fmt: skip
def test_persona_settings_fail_loudly(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings([a.replace("{root}", str(tmp_path)) for a in argv], {})
    assert message in capsys.readouterr().err


def test_demo_personas_turn_lora_on(tmp_path: Path) -> None:
    s = parse_settings(["--demo-personas", "--demo-model-dir", str(tmp_path / "demo")], {})
    assert s.engine_args["enable_lora"] is True
    assert s.lora_adapter_root == tmp_path / "demo-personas"


def test_write_timeout_and_admin_keys_from_flags_and_environment(tmp_path: Path) -> None:
    env = {"AVATAR_WRITE_TIMEOUT": "12.5", "AVATAR_ADMIN_API_KEY": "adm1, adm2"}
    s = parse_settings([], env)
    assert s.write_timeout == 12.5 and s.admin_api_key == ["adm1", "adm2"]
    argv = ["--write-timeout", "5", "--admin-api-key", "x", "--admin-api-key", "y"]
    s = parse_settings(argv, env)
    assert s.write_timeout == 5 and s.admin_api_key == ["x", "y"], "flags replace the variable"
    assert parse_settings([], {}).write_timeout == 30, "a stalled client holds a slot 30 s at most"
    # An admin key alone is a key for the runtime adapter routes (the chat then runs open).
    runtime = ["--enable-lora", "--allow-runtime-lora-updating", "--admin-api-key", "adm"]
    assert parse_settings([*runtime, "--lora-adapter-root", str(tmp_path)], {}).api_key == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--write-timeout", "0"], "--write-timeout"),
     (["--api-key", "same", "--admin-api-key", "same"], "must not also be an --api-key")],
)  # fmt: skip
def test_bad_write_timeout_or_shared_admin_key_fail_loudly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, {})
    assert message in capsys.readouterr().err
