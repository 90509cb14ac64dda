"""Build the built-in demo model offline: a tiny random Llama with a locally trained tokenizer.

It answers gibberish; it exists so that the server, the tests and the benchmarks run end to end on
any machine with no download. Build it into a folder with ``python -m serve.demo_model DIR``.

Shape: hidden 128, 2 layers, 4 heads (head dim 32, which vLLM's CPU attention supports; 16 is
not), a byte-level BPE vocabulary trained on a small English corpus written below plus the
markers of tool calls and thinking, and a Jinja chat template that renders tools, tool calls and
tool results Hermes/Qwen style (so vLLM's ``hermes`` tool parser and ``deepseek_r1`` reasoning
parser read its output). The weights are seeded, so every build of one version is identical.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when the build changes in a way the fingerprint below cannot see (the weights' shape or
# seed, the trainer's settings). The template, the corpus and the marker tokens are in the
# fingerprint, so editing them rebuilds a stale cache by itself.
DEMO_MODEL_VERSION = "2"
DEMO_MODEL_NAME = "avatar-demo"

BOS = "<|begin_of_text|>"
EOS = "<|end|>"
TURN_START = "<|start|>"

# Marker tokens of the Hermes/Qwen tool-call format and of thinking, as plain added tokens (not
# "special"): the detokenized text keeps them, which is what vLLM's text-based tool parsers read,
# and each is one token id, which is what its reasoning parsers look for.
MARKER_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# The chat template, Hermes/Qwen style: tools in the system turn as JSON inside <tools>, an
# assistant's calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as a
# user turn of <tool_response> blocks; `enable_thinking=false` closes an empty <think> block in
# the generation prompt. Without tools it renders exactly as the first template did, byte for
# byte.
_TEMPLATE_SOURCE = r"""
{{ bos_token }}
{% set sys_first = messages and messages[0]['role'] in ('system', 'developer') %}
{% if tools %}
    <|start|>system\n
    {% if sys_first %}{{ messages[0]['content'] }}\n\n{% endif %}
    # Tools\n\nYou may call one or more functions to assist with the user query.\n\n
    You are provided with function signatures within <tools></tools> XML tags:\n<tools>
    {% for tool in tools %}\n{{ tool | tojson }}{% endfor %}
    \n</tools>\n\nFor each function call, return a json object with function name and
    {{ ' ' }}arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n
    {"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|end|>\n
    {% set rest = messages[1:] if sys_first else messages %}
{% else %}
    {% set rest = messages %}
{% endif %}
{% for message in rest %}
    {% if message['role'] == 'tool' %}
        {% if loop.first or loop.previtem['role'] != 'tool' %}<|start|>user{% endif %}
        \n<tool_response>\n{{ message['content'] }}\n</tool_response>
        {% if loop.last or loop.nextitem['role'] != 'tool' %}<|end|>\n{% endif %}
    {% else %}
        <|start|>{{ message['role'] }}\n{{ message['content'] or '' }}
        {% for call in message['tool_calls'] or [] %}
            {% if not loop.first or message['content'] %}\n{% endif %}
            <tool_call>\n{"name": {{ call['function']['name'] | tojson }}, "arguments":{{ ' ' }}
            {% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}
            {% else %}{{ call['function']['arguments'] | tojson }}{% endif %}
            }\n</tool_call>
        {% endfor %}
        <|end|>\n
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    <|start|>assistant\n
    {% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}
{% endif %}
"""
# Lines are joined without their indentation, and each \n becomes an expression: Transformers
# renders with trim_blocks, which would eat a real newline that follows a block tag.
CHAT_TEMPLATE = "".join(line.strip() for line in _TEMPLATE_SOURCE.splitlines()).replace(
    r"\n", "{{ '\\n' }}"
)

# A small, fixed corpus: conversational English of the kind an avatar speaks, so the merges
# look like words. Written here so that the build needs nothing from the network.
_CORPUS = """
Hello! It is good to see you again. How has your day been so far?
I am your virtual assistant, and I am happy to help with anything you need today.
Sure, I can explain that. The short answer is yes, but there are a few details worth knowing.
Let me think about that for a moment. There are three things to consider here.
First, the weather tomorrow looks sunny with a light breeze in the afternoon.
Second, your appointment with the doctor is on Tuesday at ten in the morning.
Third, remember to bring your documents and a bottle of water.
That is a great question! Many people ask me about it, and the answer often surprises them.
I understand how you feel. Would you like me to walk you through the steps again?
Of course. Take a deep breath, and we will go through it together, one step at a time.
The recipe needs two cups of flour, one egg, a pinch of salt and some warm milk.
Mix everything slowly, then let the dough rest for about thirty minutes.
The museum opens at nine and closes at five, except on Mondays when it is closed.
Tickets are cheaper online, and students get a discount with a valid card.
Thank you for your patience. I have found the information you were looking for.
Is there anything else I can help you with? I am here whenever you need me.
Good morning! Did you sleep well? Today we are going to practise your Spanish.
Let us start with a few simple phrases: hello, thank you, and where is the station?
Very good! Your pronunciation is getting better every day. Keep it up.
I am sorry, I did not catch that. Could you say it once more, a little slower?
The train to the city leaves every fifteen minutes from platform four.
If you feel tired, it may help to drink some water and take a short walk outside.
The meeting has been moved to Thursday afternoon, and the room is on the second floor.
We can talk about history, science, music, sports, cooking, travel or anything you like.
Music can change the mood of a room in seconds; what kind of songs do you enjoy?
The capital of France is Paris, and the river that runs through it is the Seine.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero.
A healthy breakfast gives you energy for the whole morning.
Goodbye for now! It was a pleasure talking with you. See you next time.
"""


def train_tokenizer(out_dir: Path) -> None:
    """Write the demo tokenizer (byte-level BPE, the chat template, BOS/EOS) into ``out_dir``.

    Public: the GPU benchmark kit builds its large model around the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[BOS, EOS, TURN_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that frequent pairs clearly win; the result is deterministic.
    tokenizer.train_from_iterator([_CORPUS] * 8, trainer=trainer)

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=4096,
    )
    fast.add_tokens(list(MARKER_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _build_weights(out_dir: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True}, indent=2)
    )


def fingerprint() -> str:
    """What a build depends on: ``--ensure`` rebuilds a model whose marker says otherwise."""
    digest = hashlib.sha256()
    for part in (DEMO_MODEL_VERSION, CHAT_TEMPLATE, _CORPUS, *MARKER_TOKENS):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{DEMO_MODEL_VERSION}:{digest.hexdigest()[:16]}"


_MARKER = "DEMO_MODEL_VERSION"


def build(out_dir: str | os.PathLike[str]) -> Path:
    """Build the demo model into ``out_dir`` (replaced atomically) and return its path."""
    target = Path(out_dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        train_tokenizer(staging)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(staging))
        bos, eos = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(EOS)
        assert isinstance(bos, int) and isinstance(eos, int)
        _build_weights(staging, len(tok), bos, eos)
        (staging / _MARKER).write_text(fingerprint())
        install_build(staging, target, is_built)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def install_build(staging: Path, target: Path, is_current: Callable[[Path], bool]) -> None:
    """Swap the new build in. Test runs and servers share one cache folder, so another process
    may be building the same model at the same moment: the old folder is moved aside rather
    than deleted in place, and a build that won the race is kept if ``is_current`` says it is
    current. The Qwen3 demo model (serve/demo_qwen3.py) is installed the same way."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".demo-model-old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another builder moved it first
            target.rename(old / "model")
    try:
        staging.rename(target)
    except OSError:
        if not is_current(target):  # someone else's build landed, and it is not current
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def is_built(path: str | os.PathLike[str]) -> bool:
    marker = Path(path).expanduser() / _MARKER
    return marker.is_file() and marker.read_text().strip() == fingerprint()


def ensure_built(path: str | os.PathLike[str]) -> Path:
    """Return the demo model folder, building it first if it is missing or stale."""
    if is_built(path):
        return Path(path).expanduser().resolve()
    return build(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serve.demo_model", description="Build the tiny random demo model offline."
    )
    parser.add_argument("dir", help="folder to build the model into (replaced if present)")
    parser.add_argument(
        "--ensure", action="store_true", help="keep a model already built there by this version"
    )
    args = parser.parse_args(argv)
    print(ensure_built(args.dir) if args.ensure else build(args.dir))


if __name__ == "__main__":
    main()
