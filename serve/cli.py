"""Command line and environment → ``Settings``, with vLLM's own engine flags unchanged.

Front-end flags come from the fields of ``Settings``; engine flags are added by vLLM's
``AsyncEngineArgs.add_cli_args``, so ``--model``, ``--served-model-name``, ``--max-model-len``,
``--tensor-parallel-size``... keep vLLM's names and meanings. Each engine flag also reads
``AVATAR_<FLAG_IN_UPPER_SNAKE>``, as do the front-end flags: a variable becomes the flag's
default, so a flag given on the command line wins.

This module imports vLLM; the HTTP layer does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from serve.demo_model import DEMO_MODEL_NAME as DEMO_SERVED_NAME
from serve.settings import (
    DEFAULT_DEMO_DIR,
    ENV_PREFIX,
    PASSTHROUGH_ENV_PREFIXES,
    PASSTHROUGH_ENV_VARS,
    LoRAModule,
    Settings,
    demo_personas_dir,
    frontend_env_vars,
)

# Defaults that differ from vLLM's, chosen for avatars: every turn resends the conversation so
# far, so prefix caching pays on every request.
# enforce_eager None means "decide by platform": eager on CPU, where compiling costs minutes.
AVATAR_ENGINE_DEFAULTS: dict[str, Any] = {
    "model": None,
    "enable_prefix_caching": True,
    "enforce_eager": None,
}
# On CPU, vLLM's default GPU-memory fraction does not apply; size the KV cache to the machine.
CPU_KV_CACHE_CAP_BYTES = 4 * 1024**3
CPU_KV_CACHE_MEMORY_SHARE = 0.2

_FRONTEND_GROUP = "Frontend"


def build_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="python -m serve",
        description="OpenAI-compatible streaming server for real-time avatars on vLLM. "
        "Every flag is also an environment variable AVATAR_<FLAG_IN_UPPER_SNAKE> "
        "(for example --max-model-len is AVATAR_MAX_MODEL_LEN); a flag wins over its variable.",
        epilog="Show one group's flags with --help=<group> (--help=frontend for the server's own "
        "settings), every flag with --help=all, or flags matching a word with --help=<word>.",
    )
    group = parser.add_argument_group(_FRONTEND_GROUP, "Settings of the HTTP front end.")
    for name, field in Settings.model_fields.items():
        if name == "engine_args":
            continue
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} [env {env}; default: {default!r}]"
        if field.annotation is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(field.annotation) is list:
            group.add_argument(
                flag, nargs="+", action=_RepeatableList, default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                flag, default=argparse.SUPPRESS, help=help_text, metavar=name.upper()
            )
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(**AVATAR_ENGINE_DEFAULTS)
    return parser


class _RepeatableList(argparse.Action):
    """A list flag, repeatable (``--api-key a --api-key b``) or spaced (``--api-key a b``).

    The command line replaces a list that came from the environment instead of adding to it:
    a flag wins over its variable, and a key left in a manifest's ``AVATAR_API_KEY`` must not
    stay valid beside the ``--api-key`` that replaced it (argparse's ``extend`` would keep it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given = False  # a parser is built per parse, so this is per command line

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        earlier = list(getattr(namespace, self.dest, None) or []) if self._given else []
        self._given = True
        setattr(namespace, self.dest, [*earlier, *values])


def _engine_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    return [
        a
        for a in parser._actions
        if a.dest in fields and any(o.startswith("--") for o in a.option_strings)
    ]


def engine_env_vars() -> set[str]:
    return {ENV_PREFIX + a.dest.upper() for a in _engine_actions(build_parser())}


def known_env_vars() -> set[str]:
    """Every environment variable name the server reads (front end, engine flags, passthrough)."""
    return frontend_env_vars() | engine_env_vars() | set(PASSTHROUGH_ENV_VARS)


def is_known_env_var(name: str) -> bool:
    return name in known_env_vars() or name.startswith(PASSTHROUGH_ENV_PREFIXES)


def known_cli_flags() -> set[str]:
    """Every long CLI flag ``python -m serve`` accepts."""
    parser = build_parser()
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")}


def _env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> dict[str, Any]:
    """Environment variables as parser defaults: the command line still wins, and a value is
    converted and checked exactly as the flag's own value would be."""
    defaults: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        var = ENV_PREFIX + action.dest.upper()
        raw = environ.get(var)
        if raw is None:
            continue
        try:
            defaults[action.dest] = _convert(action, raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            flag = next(o for o in action.option_strings if o.startswith("--"))
            parser.error(f"invalid {var}={raw!r} (flag {flag}): {exc}")
    return defaults


def _convert(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return parse_bool(raw)
    convert = action.type if callable(action.type) else (lambda v: v)
    if action.nargs in ("+", "*") and raw.lstrip().startswith(("[", "{")):
        return [raw]  # JSON (--lora-modules): its commas are not separators
    if action.nargs in ("+", "*"):
        return [convert(v.strip()) for v in raw.split(",") if v.strip()]
    value = convert(raw)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"choose from {sorted(map(str, action.choices))}")
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(value: str) -> bool:
    """A strict boolean: a typo such as ``ture`` is an error, never a silent False."""
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse flags and environment into validated ``Settings``; exits with a message if invalid."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    engine_dests = {a.dest for a in _engine_actions(parser)}
    parser.set_defaults(**_env_defaults(parser, environ))
    args = parser.parse_args(list(argv or []))
    values = vars(args)
    engine_args = {k: v for k, v in values.items() if k in engine_dests}
    frontend = {k: v for k, v in values.items() if k not in engine_dests}
    _persona_defaults(parser, frontend, engine_args, environ)
    try:
        settings = Settings(**frontend, engine_args=engine_args)
    except ValidationError as exc:
        parser.error(_describe(exc))
    _check_chat_flags(parser, settings)
    return settings


def _persona_defaults(
    parser: argparse.ArgumentParser,
    frontend: dict[str, Any],
    engine_args: dict[str, Any],
    environ: Mapping[str, str],
) -> None:
    """vLLM's switch for runtime adapter loads, and what ``--demo-personas`` implies."""
    if "allow_runtime_lora_updating" not in frontend:
        vllm_switch = environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower()
        if vllm_switch in ("1", "true"):  # vLLM's own reading of it
            frontend["allow_runtime_lora_updating"] = True
    if engine_args.get("model") and frontend.get("demo_model", "llama") != "llama":
        parser.error("--demo-model picks the model served when no --model is given: drop one")
    if not frontend.get("demo_personas"):
        return
    if engine_args.get("model"):
        parser.error("--demo-personas serves the demo model's personas: drop --model")
    engine_args["enable_lora"] = True
    if frontend.get("lora_adapter_root") is None:
        demo_dir = _demo_folder(
            Path(frontend.get("demo_model_dir") or DEFAULT_DEMO_DIR).expanduser(),
            frontend.get("demo_model") or "llama",
        )
        root = demo_personas_dir(demo_dir)
        root.mkdir(parents=True, exist_ok=True)
        frontend["lora_adapter_root"] = root


def _check_chat_flags(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Refuse a tool parser vLLM does not know, or a template that cannot be read, at once
    (the engine would only find out after loading the model)."""
    if settings.tool_parser_plugin:
        from vllm.tool_parsers import ToolParserManager

        try:
            ToolParserManager.import_tool_parser(settings.tool_parser_plugin)
        except Exception as exc:
            parser.error(f"--tool-parser-plugin {settings.tool_parser_plugin}: {exc}")
    if settings.tool_call_parser:
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if settings.tool_call_parser not in known:
            parser.error(
                f"--tool-call-parser {settings.tool_call_parser!r} is not one of vLLM's "
                f"parsers: {', '.join(known)}"
            )
    if settings.chat_template:
        from vllm.renderers.chat_utils import load_chat_template

        try:
            load_chat_template(settings.chat_template)
        except Exception as exc:  # vLLM's validation error is not a ValueError
            parser.error(f"--chat-template: {exc}")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        flag = "--" + loc.replace("_", "-") if loc else "settings"
        parts.append(f"{flag} (env {ENV_PREFIX}{loc.upper()}): {err['msg']}")
    return "invalid settings: " + "; ".join(parts)


def _demo_folder(demo_model_dir: Path, demo_model: str) -> Path:
    """The folder the chosen demo model is built in; its personas go beside it (their stamp
    does not record the base's shape, so Llama and Qwen3 personas must not share a folder)."""
    if demo_model == "qwen3":
        from serve.demo_qwen3 import qwen3_folder_beside

        return qwen3_folder_beside(demo_model_dir)
    return demo_model_dir


def _add_demo_personas(settings: Settings, model_dir: Path) -> None:
    from serve.demo_personas import ensure_demo_personas

    root = settings.lora_adapter_root or demo_personas_dir(model_dir)
    taken = {m.name for m in settings.lora_modules}
    for name, folder in ensure_demo_personas(model_dir, root).items():
        if name not in taken:
            settings.lora_modules.append(LoRAModule(name=name, path=str(folder)))


def finalize_engine_args(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Resolve what depends on the machine: the demo model, CPU defaults.

    Returns the final ``AsyncEngineArgs`` fields and records them in ``settings.engine_args``.
    This is the one place engine arguments are built; it sets no engine environment. (An
    earlier ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` default was dropped: ``AsyncLLM`` runs its
    engine core in a process of its own regardless, as tests/e2e/test_lifecycle_e2e.py checks;
    on the CPU build the variable only decides whether the model runs in that process or in a
    worker below it (``vllm/platforms/cpu.py``), and vLLM's own server leaves it at 1.)
    """
    environ = os.environ if environ is None else environ
    from vllm.platforms import current_platform

    from serve import demo_model

    args = dict(settings.engine_args)
    if not args.get("model"):
        folder = _demo_folder(settings.demo_model_dir, settings.demo_model)
        if settings.demo_model == "qwen3":
            from serve import demo_qwen3

            try:
                args["model"] = str(demo_qwen3.ensure_built(folder))
            except demo_qwen3.TokenizerFetchError as exc:
                raise SystemExit(f"--demo-model qwen3: {exc}") from exc
            served = demo_qwen3.DEMO_QWEN3_NAME
        else:
            args["model"] = str(demo_model.ensure_built(folder))
            served = DEMO_SERVED_NAME
        if not args.get("served_model_name"):
            args["served_model_name"] = [served]
        if settings.demo_personas:
            _add_demo_personas(settings, Path(args["model"]))
    is_cpu = current_platform.is_cpu()
    if args.get("enforce_eager") is None:
        args["enforce_eager"] = is_cpu
    sized = args.get("kv_cache_memory_bytes") or "VLLM_CPU_KVCACHE_SPACE" in environ
    if is_cpu and not sized:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        args["kv_cache_memory_bytes"] = int(
            min(CPU_KV_CACHE_CAP_BYTES, total * CPU_KV_CACHE_MEMORY_SHARE)
        )
    settings.engine_args = args
    return args
