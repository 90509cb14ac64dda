"""A deterministic engine for HTTP-layer unit tests: no model, no vLLM, millisecond start.

Each prompt token is one whitespace-separated word; the reply cycles through ``WORDS``. Tests can
slow it down (``token_delay``), hold it before the first token (``first_token_gate``), fail a
request after some tokens as vLLM fails one (``fail_after``), kill it (``kill()``), and read
which requests it saw and which were aborted.

Agent tests give it a tokenizer (the demo model's) and a ``script``: the reply is then exactly
those text chunks, one engine step each, and a chat answer is parsed by vLLM's own tool-call and
reasoning parsers (``vllm_agents``, imported only then), as the real engine parses it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from serve.engine.base import (
    Adapter,
    ChatConfig,
    ChatTurn,
    ChoiceDelta,
    Delta,
    EngineBusyError,
    EngineDeadError,
    EngineInputError,
    EngineRequestError,
    LogprobEntry,
    SamplingOptions,
    TokenLogprobs,
)

WORDS = ("Hello", " there", ".", " How", " can", " I", " help", " you", " today", "?")


class FakeEngine:
    def __init__(
        self,
        max_model_len: int = 256,
        token_delay: float = 0.0,
        vocab_size: int = 1000,
        *,
        tokenizer: Any = None,
        reasoning_parser: str | None = None,
        adapter_rank: int | None = None,
        priority_scheduling: bool = False,
        max_num_seqs: int | None = None,
    ) -> None:
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self.token_delay = token_delay
        self.first_token_gate: asyncio.Event | None = None
        # Tokens after which every request fails as vLLM fails one (finish reason "error").
        self.fail_after: int | None = None
        # Every request refused at once, as vLLM's own valve refuses (--max-num-queued-reqs).
        self.busy = False
        self._alive = True
        self._unfinished: set[str] = set()
        self.seen: list[tuple[str, list[int], SamplingOptions]] = []
        self.aborted: list[str] = []
        self.rendered: list[list[dict[str, Any]]] = []
        self.turns: list[ChatTurn | None] = []  # the turn of each generate() call
        self.priorities: list[int] = []  # the priority of each generate() call
        self._priority_scheduling = priority_scheduling
        self._max_num_seqs = max_num_seqs
        self.script: list[str] | None = None  # the reply's text chunks, when set
        # Adapters: None serves none; else the largest rank, and the loads and uses seen.
        self._adapter_rank = adapter_rank
        self.loaded: list[Adapter] = []
        self.adapters: list[Adapter | None] = []  # the adapter of each generate() call
        self.load_gate: asyncio.Event | None = None  # holds load_adapter() until set
        self._tokenizer = tokenizer
        self._chat: Any = None
        if tokenizer is not None:
            from serve.engine.vllm_agents import ChatSupport

            self._chat = ChatSupport(tokenizer, reasoning_parser=reasoning_parser)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def is_alive(self) -> bool:
        return self._alive

    @property
    def version(self) -> str:
        return "0.0.0+fake"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def kill(self) -> None:
        self._alive = False

    @property
    def reasoning(self) -> bool:
        return self._chat is not None and bool(self._chat.reasoning)

    @property
    def priority_scheduling(self) -> bool:
        return self._priority_scheduling

    @property
    def max_num_seqs(self) -> int | None:
        return self._max_num_seqs

    @property
    def renderer_workers(self) -> int:
        return 1

    def check_chat_config(self, config: ChatConfig) -> None:
        if self._chat is not None:
            self._chat.check(config)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], turn: ChatTurn | None = None
    ) -> str:
        self.rendered.append([dict(m) for m in messages])
        return " ".join(f"<{m['role']}> {m['content'] or ''}" for m in messages) + " <assistant>"

    def parses(self, turn: ChatTurn) -> bool:
        return self._chat is not None and bool(self._chat.parses(turn))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [min(len(word), self._vocab_size - 1) for word in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(f"t{t}" for t in token_ids)

    @property
    def max_adapter_rank(self) -> int | None:
        return self._adapter_rank

    async def load_adapter(self, adapter: Adapter) -> None:
        """Checks what vLLM checks first: the folder, its config, the rank."""
        if self._adapter_rank is None:
            raise EngineInputError("The engine serves no adapters.")
        if self.load_gate is not None:
            await self.load_gate.wait()
        config = Path(adapter.path) / "adapter_config.json"
        try:
            rank = int(json.loads(config.read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineInputError(
                f"No adapter found for {adapter.path}: {exc}", param="lora_path", public=True
            ) from exc
        if rank > self._adapter_rank:
            raise EngineInputError(
                f"LoRA rank {rank} is greater than max_lora_rank {self._adapter_rank}",
                param="lora_path",
                public=True,
            )
        self.loaded.append(adapter)

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        turn: ChatTurn | None = None,
        adapter: Adapter | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[Delta, None]:
        if not self._alive:
            raise EngineDeadError("the engine is not running")
        if self.busy:
            raise EngineBusyError("the engine's request queue is full")
        self.adapters.append(adapter)
        if any(not 0 <= t < self._vocab_size for t in prompt_token_ids):
            raise EngineInputError("Token id out of vocabulary", param="prompt", public=True)
        self.seen.append((request_id, list(prompt_token_ids), options))
        self.turns.append(turn)
        self.priorities.append(priority)
        if self.script is not None:
            async for delta in self._scripted(prompt_token_ids, options, request_id, turn):
                yield delta
            return
        if options.detailed:
            async for choice in self._detailed(prompt_token_ids, options, request_id):
                yield choice
            return
        self._unfinished.add(request_id)
        queued = time.perf_counter()
        finished = False
        try:
            if self.first_token_gate is not None:
                await self.first_token_gate.wait()
            text_so_far = ""
            for i in range(options.max_tokens):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if not self._alive:
                    raise EngineDeadError("the engine is not running")
                if i == self.fail_after:
                    finished = True  # the engine ended it, not the client
                    raise EngineRequestError(f"the engine failed request {request_id}")
                word = WORDS[i % len(WORDS)]
                text_so_far += word
                stop_hit = next((s for s in options.stop if s in text_so_far), None)
                if stop_hit is not None:
                    word = word[
                        : max(0, len(word) - (len(text_so_far) - text_so_far.index(stop_hit)))
                    ]
                    finished = True
                    yield Delta(word, 1, "stop", len(prompt_token_ids) if i == 0 else None)
                    return
                if i == 0:
                    engine_times = (queued, queued, time.perf_counter())
                last = i == options.max_tokens - 1
                eos = not options.ignore_eos and word == "?" and i >= options.min_tokens
                reason = "stop" if eos else ("length" if last else None)
                finished = reason is not None
                yield Delta(
                    word,
                    1,
                    reason,
                    len(prompt_token_ids) if i == 0 else None,
                    engine_times if i == 0 else None,
                )
                if finished:
                    return
        finally:
            self._unfinished.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def _scripted(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        turn: ChatTurn | None,
    ) -> AsyncGenerator[Delta, None]:
        """The scripted reply, one chunk a step, parsed as the real engine parses it."""
        assert self.script is not None
        parser = None
        if turn is not None and self.parses(turn):
            parser = self._chat.start(turn, options, prompt_token_ids)
        chunks = self.script[: options.max_tokens]
        self._unfinished.add(request_id)
        finished = False
        try:
            for i, chunk in enumerate(chunks):
                await asyncio.sleep(self.token_delay)
                last = i == len(chunks) - 1
                reason = ("stop" if len(chunks) == len(self.script) else "length") if last else None
                ids = self._tokenizer.encode(chunk, add_special_tokens=False)
                if parser is not None:
                    delta = parser.feed(chunk, ids, reason)
                else:
                    delta = Delta(chunk, len(ids), reason)
                if i == 0:
                    delta.num_prompt_tokens = len(prompt_token_ids)
                    delta.num_cached_tokens = 0
                finished = last
                yield delta
        finally:
            self._unfinished.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def _detailed(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """n answers, step by step in turn; answer j starts j words into ``WORDS``. Word k of the
        cycle is token k + 1, logprob -(k + 1) / 10, its alternatives the words after it."""
        self._unfinished.add(request_id)
        done: set[int] = set()
        finished = False
        try:
            for i in range(options.max_tokens):
                await asyncio.sleep(self.token_delay)
                if not self._alive:
                    raise EngineDeadError("the engine is not running")
                if i == self.fail_after:
                    finished = True
                    raise EngineRequestError(f"the engine failed request {request_id}")
                for j in range(options.n):
                    if j in done:
                        continue
                    k = (i + j) % len(WORDS)
                    eos = not options.ignore_eos and WORDS[k] == "?" and i >= options.min_tokens
                    reason = "stop" if eos else ("length" if i == options.max_tokens - 1 else None)
                    delta = ChoiceDelta(WORDS[k], 1, reason, index=j, token_ids=(k + 1,))
                    if options.logprobs is not None:
                        delta.logprobs = (_fake_logprobs(k, options.logprobs),)
                    if i == 0 and j == 0:
                        delta.num_prompt_tokens = len(prompt_token_ids)
                        delta.num_cached_tokens = 0
                        if options.prompt_logprobs is not None:
                            delta.prompt_logprobs = (
                                None,
                                *tuple(
                                    TokenLogprobs(t, (LogprobEntry(t, f"t{t}", -1.0, 1),))
                                    for t in prompt_token_ids[1:]
                                ),
                            )
                    if reason is not None:
                        done.add(j)
                    yield delta
                if len(done) == options.n:
                    finished = True
                    return
        finally:
            self._unfinished.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def num_unfinished_requests(self) -> int:
        return len(self._unfinished)

    def kv_cache_usage(self) -> float | None:
        return 0.25 if self._unfinished else 0.0

    async def shutdown(self) -> None:
        self._alive = False


def _fake_logprobs(k: int, top: int) -> TokenLogprobs:
    entries = [LogprobEntry(k + 1, WORDS[k], -(k + 1) / 10, 1)]
    for r in range(1, top + 1):
        other = (k + r) % len(WORDS)
        entries.append(LogprobEntry(other + 1, WORDS[other], -(k + 1) / 10 - r, r + 1))
    return TokenLogprobs(k + 1, tuple(entries))
