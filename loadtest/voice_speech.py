"""The listener's side of a reply: when speech can start, and whether it ever runs dry.

A text-to-speech stage starts on the first sentence and then speaks at a steady rate (about 15
characters a second, 150 words a minute). What a person notices is the wait for that first
sentence and every moment the voice stops because the text has not arrived yet: an
**underrun**.

- **Speech starts** at the first sentence end (``.``, ``!``, ``?`` or a newline) once at least
  ``min_sentence_chars`` characters have arrived (shorter sentences are joined to the next, as
  LiveKit's sentence tokenizer does with its minimum length), or once ``max_first_chars``
  characters have arrived without one (a clause long enough for a streaming TTS, and what keeps
  a model that never ends a sentence, such as the random demo model, measurable), or at the end
  of the stream when the whole reply is shorter.
- **Speaking** consumes characters at ``cps`` from the start; the consumer is character-exact
  (no sentence buffering), which is the most lenient model of a TTS: a real one that needs a
  whole phrase before it speaks runs dry at least as often.
- An **underrun** is counted each time the consumer has spoken everything received while the
  reply has not ended (more text arrives later); the silence lasts until that text arrives.
- **Barge-in**: the user cuts in ``barge_in_s`` seconds after speech started; what was heard is
  the text spoken by then, and that is what the next turn's history holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SENTENCE_ENDS = frozenset(".!?\n")

TextEvent = tuple[float, str]  # (arrival time, text)


@dataclass(frozen=True)
class SpeechConfig:
    cps: float = 15.0
    min_sentence_chars: int = 20
    max_first_chars: int = 100


class Speakable:
    """Fed the reply's text piece by piece; says when the first speakable chunk is complete."""

    def __init__(self, cfg: SpeechConfig) -> None:
        self.cfg = cfg
        self.chars = 0
        self.ready = False

    def feed(self, piece: str) -> bool:
        """Add ``piece``; True once (and after) speech can start."""
        if self.ready:
            return True
        start = self.chars
        self.chars += len(piece)
        for i, ch in enumerate(piece, start + 1):
            if ch in SENTENCE_ENDS and i >= self.cfg.min_sentence_chars:
                self.ready = True
                break
        if self.chars >= self.cfg.max_first_chars:
            self.ready = True
        return self.ready


def speech_start(events: Sequence[TextEvent], end: float, cfg: SpeechConfig) -> float | None:
    """When speech can start: the event completing the first speakable chunk, else ``end``
    (the TTS flushes at the end of the stream); None when there is no text at all."""
    det = Speakable(cfg)
    for t, piece in events:
        if det.feed(piece):
            return t
    return end if det.chars > 0 else None


@dataclass(frozen=True)
class Speech:
    start: float | None  # when speaking began; None: nothing to say
    end: float | None  # when the voice stopped: the reply's end, or the barge-in
    heard_chars: int
    total_chars: int
    underruns: int
    stall_s: float  # total silence inside the reply, waiting for text
    cut: bool  # the user cut in before the end


def simulate(
    events: Sequence[TextEvent],
    start: float | None,
    *,
    cps: float,
    cut_at: float | None = None,
) -> Speech:
    """Speak ``events`` from ``start`` at ``cps`` characters a second, until the text ends or
    the user cuts in at ``cut_at``. ``events`` are what the stream delivered (a cut stream
    delivers nothing after its cut, which is never before ``cut_at``)."""
    pieces = [(t, len(s)) for t, s in events if s]
    total = sum(n for _, n in pieces)
    if start is None or total == 0:
        return Speech(None, None, 0, total, 0, 0.0, False)
    avail = sum(n for t, n in pieces if t <= start)
    later = [(t, n) for t, n in pieces if t > start]
    pos = 0.0
    now = start
    underruns = 0
    stall = 0.0
    for t, n in later:
        limit = t if cut_at is None else min(t, cut_at)
        dry = now + (avail - pos) / cps
        if dry < limit:
            underruns += 1  # spoke everything received; more text is still to come
            stall += limit - dry
            pos = avail
        else:
            pos += (limit - now) * cps
        now = limit
        if cut_at is not None and cut_at <= t:
            return Speech(
                start, cut_at, min(total, math.floor(pos + 1e-9)), total, underruns, stall, True
            )
        avail += n
    end = now + (avail - pos) / cps
    if cut_at is not None and cut_at < end:
        heard = math.floor(pos + (cut_at - now) * cps + 1e-9)
        return Speech(start, cut_at, min(total, heard), total, underruns, stall, True)
    return Speech(start, end, total, total, underruns, stall, False)
