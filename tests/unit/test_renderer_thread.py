"""A long prompt is rendered and tokenized in the renderer thread, as vLLM's server does: while
it encodes, the event loop goes on answering other requests (their frames, their refusals)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from serve.app import create_app
from serve.engine.fake import FakeEngine
from tests.unit.conftest import chat_body, make_settings, open_client

LONG = "word " * 600  # 3,000 characters, a voice persona's prompt


class HeldEncoder(FakeEngine):
    """Encodes a long prompt only when the test lets it, holding no GIL meanwhile (as Hugging
    Face's tokenizer does); records the thread each prompt was encoded on."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.encoding = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        if LONG in text:
            self.encoding.set()
            self.release.wait(10)  # on the event loop, this would hold every other request
        return super().encode(text, add_special_tokens=add_special_tokens)


def ask(content: str) -> dict[str, Any]:
    return chat_body(messages=[{"role": "user", "content": content}])


async def test_other_requests_are_served_while_a_long_prompt_encodes() -> None:
    engine = HeldEncoder()
    async with open_client(create_app(make_settings(), engine)) as client:
        long = asyncio.create_task(client.post("/v1/chat/completions", json=ask(LONG)))
        assert await asyncio.to_thread(engine.encoding.wait, 5), "the long prompt never encoded"
        try:
            short = await asyncio.wait_for(client.post("/v1/chat/completions", json=ask("hi")), 5)
            assert short.status_code == 200, short.text
            assert not long.done(), "the long prompt's request ended while it was encoding"
        finally:
            engine.release.set()
        answered = await asyncio.wait_for(long, 5)
    assert answered.status_code == 200, answered.text
    long_thread, short_thread = engine.threads
    assert long_thread.startswith("renderer"), engine.threads
    assert short_thread == threading.main_thread().name  # a short prompt skips the trip
