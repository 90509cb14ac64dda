"""The names a request's ``model`` may take: the served base model's, and its personas'.

A persona is a LoRA adapter over the base model. Those named by ``--lora-modules`` load at
start-up (a bad one fails the start); with ``--allow-runtime-lora-updating`` a key holder may
load and unload more, from folders under ``--lora-adapter-root`` only.

Each load gets a new engine id, and every load after a name's first a new engine name too, so a
request keeps the adapter it started with: unloading or reloading a name never disturbs a stream
in flight, never mixes two loads' weights in one batch, and never serves KV blocks computed with
an earlier load's weights; the engine's own LRU cache (``--max-cpu-loras``) frees weights no
request uses. One ``Personas`` is shared by the
requests of a process; it holds only the catalogue, never per-request state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.engine.base import Adapter, Engine
from serve.errors import APIError, invalid_request, model_not_found, to_api_error
from serve.settings import LoRAModule, Settings

log = logging.getLogger(__name__)
# A start-up load that the engine core has not answered in this long is sent again (the same
# adapter and id: vLLM takes a load of an id it holds as done). With --api-server-count 2, one
# front end's first call to the engine core once went unanswered for minutes while the other
# front end's loads were answered at once (the cause, the engine core's ipc paths removed before
# it connected, is mended in serve/multiproc.py). A start that waits forever serves nothing and
# never fails, so the orchestrator never restarts it: the bound stays.
START_LOAD_TIMEOUT_S = 30.0
START_LOAD_TRIES = 3
OTHER_LABEL = "other"  # the metrics' model label once --max-model-labels names are taken


class Personas:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._base_names = list(settings.served_model_names)
        self._static = [(m, Path(m.path).expanduser()) for m in settings.lora_modules]
        root = settings.lora_adapter_root
        self._root = root.expanduser().resolve() if root is not None else None
        self.runtime_updates = settings.allow_runtime_lora_updating
        # Each persona's adapter and its /v1/models entry, in load order.
        self._loaded: dict[str, _Persona] = {}
        # Ids count from 1 in --lora-modules order, so every front-end process of one server
        # (--api-server-count) gives a static persona the same id in the shared engine core.
        self._ids = itertools.count(1)
        # Every engine name given in this process: never given twice, so a later load of a
        # public name gets one of its own. Grows only with successful loads, which need the key.
        self._engine_names: set[str] = set()
        # Updates of one name run one at a time; of different names, side by side (a slow load
        # must not hold up the unload of another persona). A name's lock lives only while an
        # update of it runs or waits: a table that kept every name sent would grow for ever.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._labels: set[str] = set(self._base_names[: settings.max_model_labels])
        self._max_labels = settings.max_model_labels
        started = int(time.time())
        # vLLM's cards: a base model's root is the model it loaded, a persona's its adapter.
        model = str(settings.engine_args.get("model") or self._base_names[0])
        self._base_cards = [_card(name, started, model, None) for name in self._base_names]
        for card in self._base_cards:
            card["max_model_len"] = engine.max_model_len

    async def start(self) -> None:
        """Load the ``--lora-modules`` personas; any that cannot load stops the start-up."""
        for module, folder in self._static:
            try:
                await self._load(module.name, folder, module, patience=START_LOAD_TIMEOUT_S)
            except APIError as exc:
                raise RuntimeError(f"--lora-modules {module.name}: {exc.message}") from exc
            except TimeoutError:
                raise RuntimeError(
                    f"--lora-modules {module.name}: the engine core did not answer the load in "
                    f"{START_LOAD_TRIES} tries of {START_LOAD_TIMEOUT_S:.0f} s"
                ) from None
            log.info("persona %s loaded from %s", module.name, module.path)

    def resolve(self, name: str) -> Adapter | None:
        """The adapter a request's ``model`` names (None for the base model); 404 if neither."""
        persona = self._loaded.get(name)
        if persona is None and name not in self._base_names:
            raise model_not_found(name)
        return persona.adapter if persona is not None else None

    def label(self, name: str) -> str:
        """The metrics' ``model`` label of a served name: bounded by ``--max-model-labels``."""
        if name in self._labels:
            return name
        if len(self._labels) < self._max_labels:
            self._labels.add(name)
            return name
        return OTHER_LABEL

    def cards(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: base models, then personas with their ``parent``."""
        return self._base_cards + [persona.card for persona in self._loaded.values()]

    def card(self, name: str) -> dict[str, Any]:
        """``/v1/models/{name}``: one served name's entry; 404 if nobody serves it."""
        persona = self._loaded.get(name)
        if persona is not None:
            return persona.card
        for card in self._base_cards:
            if card["id"] == name:
                return card
        raise model_not_found(name)

    # -- runtime updates (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) -----------

    async def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        self.check_runtime_updates()
        if name in self._base_names:
            raise invalid_request(
                f"The adapter name `{name}` is a served base model's name.", param="lora_name"
            )
        folder = self._under_root(path)
        async with self._updating(name):
            if name in self._loaded and not inplace:
                raise invalid_request(
                    f"The adapter `{name}` is already loaded: unload it first, or set "
                    "`load_inplace` to replace it.",
                    param="lora_name",
                    code="adapter_exists",
                )
            await self._load(name, folder, None)
        # The resolved folder, quoted: the client's text never reaches the log as it was sent.
        log.info("persona %s loaded at runtime from %r", name, str(folder))

    async def unload(self, name: str) -> None:
        self.check_runtime_updates()
        async with self._updating(name):
            if self._loaded.pop(name, None) is None:
                raise APIError(
                    404,
                    f"The adapter `{name}` is not loaded.",
                    param="lora_name",
                    code="adapter_not_found",
                )
        log.info("persona %s unloaded", name)

    @contextlib.asynccontextmanager
    async def _updating(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[name]

    def check_runtime_updates(self) -> None:
        if not self.runtime_updates:
            raise APIError(
                404,
                "Runtime adapter loading is off: start the server with "
                "--allow-runtime-lora-updating and --lora-adapter-root.",
                code="not_found",
            )

    def _under_root(self, path: str) -> Path:
        """The adapter folder ``path`` names, refused unless it lies under the root.

        The path is the client's text: it is never ``~``-expanded (``~user`` would tell which
        local users exist), and one the OS cannot take (a NUL byte, a lone surrogate, a name
        too long, a link loop) is the client's error, not the server's.
        """
        assert self._root is not None  # settings require a root for runtime updates
        if any(ch < " " or ch == "\x7f" for ch in path):
            raise invalid_request(
                "`lora_path` must not hold control characters.",
                param="lora_path",
                code="invalid_value",
            )
        try:
            given = Path(path)
            folder = (given if given.is_absolute() else self._root / given).resolve()
            inside = folder.is_relative_to(self._root)
            found = inside and folder.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:
            raise invalid_request(
                "`lora_path` is not a path this server can open.",
                param="lora_path",
                code="invalid_value",
            ) from exc
        if not inside:
            raise invalid_request(
                "`lora_path` must lie under the server's adapter root "
                "(--lora-adapter-root); give it relative to that folder.",
                param="lora_path",
                code="path_outside_root",
            )
        if not found:
            raise invalid_request(
                f"No adapter folder at `{path}` under the adapter root.",
                param="lora_path",
                code="adapter_not_found",
            )
        return folder

    async def _load(
        self, name: str, folder: Path, module: LoRAModule | None, patience: float | None = None
    ) -> None:
        engine_id = next(self._ids)
        # A name's first load keeps the name in the engine, so vLLM's adapter metrics (read by
        # the gateway's LoRA affinity) say the persona's name; later loads get one of their own.
        engine_name = name
        if engine_name in self._engine_names:
            engine_name = f"{name} #{engine_id}"
        while engine_name in self._engine_names:  # a public name may look like one
            engine_name += "#"
        adapter = Adapter(name=name, path=str(folder), id=engine_id, engine_name=engine_name)
        # The engine reads and checks the files; what it refuses becomes a 400 for the client.
        try:
            await self._load_in_engine(adapter, patience)
        except TimeoutError:
            raise
        except Exception as exc:
            raise to_api_error(exc) from exc
        self._engine_names.add(engine_name)
        parent = (module.base_model_name if module is not None else None) or self._base_names[0]
        card = _card(name, int(time.time()), adapter.path, parent)
        self._loaded[name] = _Persona(adapter, card)

    async def _load_in_engine(self, adapter: Adapter, patience: float | None) -> None:
        """The engine's load; with ``patience``, each try bounded, the same load sent again."""
        if patience is None:
            await self._engine.load_adapter(adapter)
            return
        for attempt in range(1, START_LOAD_TRIES + 1):
            try:
                await asyncio.wait_for(self._engine.load_adapter(adapter), patience)
                return
            except TimeoutError:
                log.warning(
                    "persona %s: the engine core has not answered the load in %.0f s (try %d "
                    "of %d)", adapter.name, patience, attempt, START_LOAD_TRIES,
                )  # fmt: skip
        raise TimeoutError


@dataclass(frozen=True, slots=True)
class _Persona:
    adapter: Adapter
    card: dict[str, Any]  # its /v1/models entry


def _card(name: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "avatar-llm-serve",
        "root": root,
        "parent": parent,
    }
