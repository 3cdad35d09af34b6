"""Chat requests the target writes itself (Magpie: give an aligned model its chat template up to the user's
turn, and it writes a user's request from its own distribution).

The stdlib-made instructions (`spectune.models.distill_data`) cover the shipped chat set's categories, but
in one narrow register: every `qa` request asks what a stdlib module is for, every passage to summarise is
a docstring. Heads trained on the answers to them agreed with SmolLM2 at 0.54 on such requests and gained
far less on the shipped prompts (free-form questions, prose). Requests the target writes are free-form
text of the kind a user sends, in each category: each starts from an opener of that category (the start
of a request, never a whole one) and the target completes it at `temperature`, seeded per batch.

A request is kept when the target ended its turn (the chat template's end-of-turn text, or eos) within
`tokens`, it says something beyond its opener, and it is neither a request already kept nor one of the
shipped chat prompts (the benchmark's), so the heads never see a benchmark request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from spectune.heads.spec import HeadsError
from spectune.models.distill import generate_replies
from spectune.models.distill_data import CATEGORIES
from spectune.models.seeding import derive_seed
from spectune.prompts import CHAT_PROMPTS, load_prompts

# The start of a request in each category: the target writes the rest. Several per category, so the
# requests vary in form as users' do.
OPENERS: dict[str, tuple[str, ...]] = {
    "coding": ("Write a Python function that", "Write a Python program that", "How do I write Python code to",
               "Implement a function in Python that", "Write a function that takes"),
    "explain_code": ("Explain what this Python code does:\n\n```python\n", "What does this code do?\n\n```python\n",
                     "Can you explain this function?\n\n```python\ndef"),
    "qa": ("What is", "Why do", "Why is", "How does", "Who was", "What are the", "Which", "When did"),
    "summarise": ("Summarise the following passage in one sentence:\n\n", "Summarize this text:\n\n",
                  "Give a short summary of the following paragraph.\n\n"),
    "math": ("A", "Tom has", "If a", "Sarah buys", "How many", "A train"),
    "extraction": ("From the text below,", "Extract all the", "List every", "From the following text, find"),
    "rewriting": ("Rewrite this sentence", "Correct the grammar in", "Paraphrase the following",
                  "Make this text more formal:", "Rewrite the following paragraph"),
}
END_MARK = "\x00request\x00"  # stands for the user's text while the template is rendered around it


@dataclass(frozen=True)
class RequestWriting:
    temperature: float = 0.6  # 1.0 (Magpie's, for large models) made SmolLM2-135M write noise
    tokens: int = 96  # the longest request, in tokens
    batch: int = 16
    tries: int = 8  # batches written per batch of requests kept, before giving up


def user_turn(tokenizer) -> tuple[str, str]:
    """The chat template's text before a user's request, and what ends the user's turn: the rest of its line
    (SmolLM2's `<|im_end|>`), or the line's end when the template puts nothing there."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": END_MARK}], tokenize=False)
    head, tail = rendered.split(END_MARK, 1)
    return head, tail.split("\n", 1)[0] or "\n"


def written_requests(model, tokenizer, count: int, seed: int, avoid: set[str],
                     writing: RequestWriting = RequestWriting(), progress: bool = False) -> list[tuple[str, str]]:
    """`count` (category, request) pairs the target wrote, categories in turn; none in `avoid` or the shipped
    chat prompts (what was written is added to `avoid`)."""
    from tqdm.auto import tqdm

    head, end = user_turn(tokenizer)
    bar = tqdm(total=count, desc="requests the target writes", disable=not progress, dynamic_ncols=True)
    avoid.update(p.prompt for p in load_prompts(CHAT_PROMPTS))
    kept: list[tuple[str, str]] = []
    for attempt in range(writing.tries * max(1, -(-count // writing.batch))):
        if len(kept) == count:
            break
        rng = random.Random(derive_seed(seed, f"requests:{attempt}"))
        categories = [CATEGORIES[(len(kept) + i) % len(CATEGORIES)] for i in range(writing.batch)]
        openers = [rng.choice(OPENERS[c]) for c in categories]
        prompts = [tokenizer(head + o, add_special_tokens=False)["input_ids"] for o in openers]
        replies = generate_replies(model, tokenizer, prompts, writing.tokens, writing.temperature,
                                   derive_seed(seed, f"requests:{attempt}:sample"))
        for category, opener, reply in zip(categories, openers, replies):
            request = _ended(opener, tokenizer.decode(reply), end, tokenizer.eos_token)
            if request is not None and request not in avoid and len(kept) < count:
                avoid.add(request)
                kept.append((category, request))
                bar.update()
    bar.close()
    if len(kept) < count:
        raise HeadsError(f"the target ended only {len(kept)} of {count} requests it was asked to write "
                         f"(within {writing.tokens} tokens): ask for fewer, or train on --text stdlib")
    return kept


def _ended(opener: str, written: str, end: str, eos: str | None) -> str | None:
    """The request, when the target ended its turn and wrote something past the opener; else None."""
    stops = [i for i in (written.find(end), written.find(eos) if eos else -1) if i >= 0]
    if not stops:
        return None
    added = written[: min(stops)]
    return (opener + added).strip() if len(added.strip()) >= 8 else None
