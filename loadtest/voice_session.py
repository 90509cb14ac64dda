"""One voice session played against a server: the turn state machine.

Per turn (``voice_plan.TurnPlan``):
1. the user speaks for ``think_s``;
2. each speculative transcript is sent with the whole history and cancelled (the stream
   closed) after its delay; the next request goes out at that moment, as LiveKit's preemptive
   generation does when the transcript changes (at most three requests per turn);
3. the confirmed request: the whole history and the final transcript. On a tool turn it forces
   a call (with ``tool_choice`` "auto" elsewhere the model may call one too); the call and the
   tool's result are appended, and a follow-up request (``tool_choice`` "none") makes the
   spoken reply;
4. the reply is spoken (``voice_speech``); on a barge-in the user cuts in after
   ``barge_in_s`` seconds of speech, the stream is closed if still open, and the history keeps
   the reply only as far as it was heard;
5. the user listens until the voice stops, then the next turn begins.

A refused confirmed request (429 or 503) ends the session: the platform sends it to another
replica (``leave_on_refusal``; otherwise the session goes on without that exchange). Other
failures are counted and the session goes on without that exchange.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.voice_client import CONFIRMED, FOLLOWUP, SPECULATIVE, StreamResult, VoiceClient
from loadtest.voice_plan import TOOLS, Message, SessionPlan, ToolPlan, TurnPlan, fit_history
from loadtest.voice_speech import simulate

OK, REFUSED, ERROR = "ok", "refused", "error"
UNPLANNED_RESULT = '{"status": "ok"}'  # the result of a call the model chose itself


@dataclass
class TurnRecord:
    """One user turn, judged on its confirmed request (and, on a tool turn, its follow-up)."""

    session: int
    turn: int
    persona: str
    tool: bool
    sent_s: float = 0.0  # the confirmed request was sent, seconds after the level started
    speculative: int = 0  # speculative requests sent in this turn
    speculative_refused: int = 0
    outcome: str = OK
    status: int | None = None
    error: str | None = None
    error_code: str | None = None
    refusal_s: float | None = None  # sent -> refusal's status line
    ttft_s: float | None = None  # confirmed request sent -> its first generated token
    ttfs_s: float | None = None  # confirmed request sent -> the first speakable chunk spoken
    underruns: int = 0
    stall_s: float = 0.0
    barge_in: bool = False  # the user cut in before the reply ended
    stream_cut: bool = False  # ... while the reply was still streaming
    reply_chars: int = 0
    heard_chars: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None  # confirmed (+ follow-up) requests, from usage
    cached_tokens: int | None = None  # of those, served from the prefix cache
    after_cut: bool = False  # this session's previous reply was cut by a barge-in
    tool_args_invalid: bool = False  # the call's arguments were not JSON ("{}" sent back)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SessionOptions:
    tools: bool = True  # every request carries the tools (when the workload has tool turns)
    max_context_chars: int = 6500
    cps: float = 15.0
    tool_tokens: int = 40
    leave_on_refusal: bool = True
    tool_choice: str = "none"  # of the requests that do not force a call: "none" or "auto"


def _answered(rec: TurnRecord, r: StreamResult) -> bool:
    """Judge a confirmed or follow-up request; fill the record when it failed."""
    rec.status = r.status
    if r.refused:
        rec.outcome, rec.error, rec.error_code = REFUSED, r.error, r.error_code
        rec.refusal_s = (r.headers_at or r.end) - r.sent
        return False
    whole = r.done or r.cancelled  # cancelled here means cut by the barge-in
    if r.status == 200 and r.error is None and whole and r.first_token is not None:
        return True
    rec.outcome, rec.error_code = ERROR, r.error_code
    rec.error = r.error or ("no tokens in the answer" if r.status == 200 else f"HTTP {r.status}")
    return False


def _add_usage(rec: TurnRecord, r: StreamResult) -> None:
    usage = r.usage or {}
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = (rec.prompt_tokens or 0) + int(usage["prompt_tokens"])
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        rec.cached_tokens = (rec.cached_tokens or 0) + int(cached)


def _tool_messages(rec: TurnRecord, r: StreamResult, turn: TurnPlan, call_id: str) -> list[Message]:
    """The assistant's call and the tool's result, as the next request carries them."""
    call = r.tool_calls[min(r.tool_calls)]
    args = call["arguments"]
    try:
        json.loads(args)
    except ValueError:
        args, rec.tool_args_invalid = "{}", True
    call_id = call["id"] or call_id
    planned = turn.tool or ToolPlan(call["name"], UNPLANNED_RESULT)  # an "auto" call
    fn = {"name": call["name"] or planned.name, "arguments": args}
    return [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": fn}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": planned.result},
    ]


async def run_session(
    plan: SessionPlan,
    client: VoiceClient,
    opts: SessionOptions,
    *,
    t0: float,
    stop_at: float,
    turns_out: list[TurnRecord],
) -> None:
    """Play ``plan``'s turns until they end, the session is refused, or the next turn would
    begin after ``stop_at`` (a ``perf_counter`` time); the session then returns at once rather
    than wait out its user's speech. Each turn lands in ``turns_out`` as soon as it is judged."""
    clock = time.perf_counter
    history: list[Message] = list(plan.history)
    tools = [dict(t) for t in TOOLS] if opts.tools else None
    tools_chars = len(json.dumps(tools)) if tools else 0
    after_cut = False
    for k, turn in enumerate(plan.turns):
        if clock() + turn.think_s >= stop_at:
            return  # this turn would begin after the level's end
        await asyncio.sleep(turn.think_s)
        rec = TurnRecord(plan.index, k, plan.persona, turn.tool is not None, after_cut=after_cut)
        user: Message = {"role": "user", "content": turn.user_text}
        kept = fit_history(
            plan.system, history, opts.max_context_chars, tools_chars + len(turn.user_text)
        )
        base: list[Message] = [{"role": "system", "content": plan.system}, *kept]
        choice: Any = opts.tool_choice if tools else None
        max_tokens = turn.max_tokens
        if turn.tool is not None:
            choice = {"type": "function", "function": {"name": turn.tool.name}}
            max_tokens = opts.tool_tokens
        for text, delay in turn.partials:
            r = await client.stream(
                SPECULATIVE,
                [*base, {"role": "user", "content": text}],
                max_tokens=max_tokens,
                tools=tools,
                tool_choice=choice,
                cut_after_s=delay,
            )
            rec.speculative += 1
            rec.speculative_refused += int(r.refused)
            left = r.sent + delay - clock()  # the next transcript comes when it comes
            if left > 0:
                await asyncio.sleep(left)
        msgs = [*base, user]
        first = await client.stream(
            CONFIRMED,
            msgs,
            max_tokens=max_tokens,
            tools=tools,
            tool_choice=choice,
            barge_in_s=None if turn.tool else turn.barge_in_s,
        )
        rec.sent_s = first.sent - t0
        spoken, added = first, [user]
        ok = _answered(rec, first)
        if ok:
            assert first.first_token is not None
            rec.ttft_s = first.first_token - first.sent
            _add_usage(rec, first)
        if ok and (turn.tool is not None or (first.tool_calls and not first.cancelled)):
            rec.tool = True
            if not first.tool_calls:
                rec.outcome, rec.error = ERROR, "no tool call in a forced call's answer"
                ok = False
            else:
                tool_msgs = _tool_messages(rec, first, turn, f"call_{plan.index}_{k}")
                spoken = await client.stream(
                    FOLLOWUP,
                    [*msgs, *tool_msgs],
                    max_tokens=turn.max_tokens,
                    tools=tools,
                    tool_choice="none",
                    barge_in_s=turn.barge_in_s,
                )
                ok = _answered(rec, spoken)
                if ok:
                    _add_usage(rec, spoken)
                added += tool_msgs
        if not ok:
            turns_out.append(rec)
            if rec.outcome == REFUSED and opts.leave_on_refusal:
                return
            continue  # the exchange is lost; the user says something else next
        start = spoken.speakable_at
        if start is None and spoken.events:
            start = spoken.end  # the TTS flushes what there is at the end of the stream
        cut_at = None if start is None or turn.barge_in_s is None else start + turn.barge_in_s
        speech = simulate(spoken.events, start, cps=opts.cps, cut_at=cut_at)
        rec.ttfs_s = None if start is None else start - first.sent
        rec.underruns, rec.stall_s = speech.underruns, speech.stall_s
        rec.barge_in, rec.stream_cut = speech.cut, spoken.cancelled
        rec.reply_chars, rec.heard_chars = speech.total_chars, speech.heard_chars
        rec.completion_tokens = spoken.completion_tokens
        turns_out.append(rec)
        history += [*added, {"role": "assistant", "content": spoken.text[: speech.heard_chars]}]
        after_cut = speech.cut
        if k + 1 < len(plan.turns) and speech.end is not None:
            if speech.end + plan.turns[k + 1].think_s >= stop_at:
                return  # the next turn would begin after the level's end
            left = speech.end - clock()  # the user listens until the voice stops
            if left > 0:
                await asyncio.sleep(left)
