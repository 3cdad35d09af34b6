"""What heads learn from when they will be asked chat requests: the target's own answers (self-distillation).

EAGLE, Medusa and Hydra train on the target's answers to conversations, not on arbitrary text: a
draft learns the distribution it will be asked to predict. Here the instructions come from the
categories of the shipped chat set, from two sources: made from the stdlib's own functions and seeded
arithmetic (`spectune.models.distill_data`, train and held-out from the corpus's two file splits), and
written by the target itself from each category's openers (`spectune.heads.written_requests`, Magpie),
`written` of them; none is a benchmark prompt. The target answers them through its chat template,
greedily and (every `sampled_every`-th batch) by sampling at `temperature`, seeded per batch.

The answers are cached beside the pair (`heads/features/chat-<digest>.jsonl`, one line per batch
after a header naming the target and tokenizer), so an interrupted generation resumes where it
stopped and a second training reads them back. A cache whose header names another target or
tokenizer is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spectune.heads.spec import HeadsError
from spectune.heads.written_requests import written_requests
from spectune.models.corpus import Corpus
from spectune.models.distill import chat_ids, generate_replies
from spectune.models.distill_data import instructions
from spectune.models.seeding import derive_seed

CHAT_TEXT_VERSION = 1


@dataclass(frozen=True)
class ChatText:
    answers: int = 256  # training instructions the target answers
    heldout: int = 32  # held-out instructions (the card's agreement is measured on their answers)
    answer_tokens: int = 160  # the most new tokens per answer
    sampled_every: int = 2  # every n-th batch is sampled at `temperature` (0: all greedy)
    temperature: float = 0.7
    batch: int = 16  # answers generated at once (length-sorted, left-padded)
    written: float = 0.5  # the share of requests (train and held-out) the target writes itself; the rest from the stdlib


@dataclass(frozen=True)
class Answer:
    category: str
    prompt: list[int]  # the chat-templated request
    answer: list[int]  # the target's reply (ends with eos when it stopped on its own)
    sampled: bool


def tokenizer_print(tokenizer) -> str:
    """A fingerprint of the vocabulary and chat template: answers made with another tokenizer are other tokens."""
    keyed = json.dumps([sorted(tokenizer.get_vocab().items()), getattr(tokenizer, "chat_template", None)])
    return hashlib.sha1(keyed.encode()).hexdigest()[:16]


def chat_answers(folder: Path, model, tokenizer, text: ChatText, corpus: Corpus, seed: int, target_print: str,
                 progress: bool = True) -> dict[str, list[Answer]]:
    """The target's answers, train and held-out, from the cache in `folder` (generated where missing)."""
    if not getattr(tokenizer, "chat_template", None):
        raise HeadsError(f"target {model.name_or_path} has no chat template: train its heads on --text stdlib")
    header = {"version": CHAT_TEXT_VERSION, "target": target_print, "tokenizer": tokenizer_print(tokenizer),
              "dtype": str(model.dtype), "text": asdict(text), "seed": seed}
    digest = hashlib.sha1(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"chat-{digest}.jsonl"
    done = _read(path, header)
    asked = _requests(path, model, tokenizer, text, corpus, seed, done, progress)
    return {split: _answered(path, model, tokenizer, text, seed, split, prompts, done, progress)
            for split, prompts in asked.items()}


def _requests(path: Path, model, tokenizer, text: ChatText, corpus: Corpus, seed: int,
              done: dict, progress: bool) -> dict[str, list[tuple[str, str]]]:
    """Each split's (category, request) pairs: stdlib-made, then the target's own (cached on their first writing)."""
    counts = {"train": text.answers, "heldout": text.heldout}
    files = {"train": corpus.train, "heldout": corpus.heldout}
    asked, seen = {}, set()
    for offset, (split, count) in enumerate(counts.items()):
        written = round(count * text.written)
        mine = done.get((split, "requests"))
        if written and mine is None:
            mine = written_requests(model, tokenizer, written, derive_seed(seed, f"chat:{split}"), seen,
                                    progress=progress)
            with path.open("a") as out:
                out.write(json.dumps({"split": split, "requests": mine}) + "\n")
        mine = [tuple(pair) for pair in mine or []]
        seen.update(request for _, request in mine)  # held-out never repeats train
        asked[split] = instructions(files[split], count - written, seed + offset) + mine
    return asked


def _read(path: Path, header: dict) -> dict[tuple[str, int | str], list]:
    """What is already made: {(split, batch index): answers} and {(split, "requests"): the target's own requests};
    a new file gets the header."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header, sort_keys=True) + "\n")
        return {}
    lines = path.read_text().splitlines()
    found = json.loads(lines[0]) if lines else {}
    for key in ("target", "tokenizer", "dtype"):
        if found.get(key) != header[key]:
            raise HeadsError(f"chat text cache {path} was made by {key} {found.get(key)!r}, not this target's "
                             f"{header[key]!r}: delete it or train with this target's own cache")
    done = {}
    for kept, line in enumerate(lines[1:], start=1):
        try:
            record = json.loads(line)
        except ValueError:  # cut by an interruption: dropped (with anything after it), its batch made again
            path.write_text("\n".join(lines[:kept]) + "\n")
            break
        if "requests" in record:
            done[(record["split"], "requests")] = record["requests"]
        else:
            done[(record["split"], record["batch"])] = [Answer(**a) for a in record["answers"]]
    return done


def _answered(path: Path, model, tokenizer, text: ChatText, seed: int, split: str,
              prompts: list[tuple[str, str]], done: dict, progress: bool) -> list[Answer]:
    from tqdm.auto import tqdm

    encoded = [(category, chat_ids(tokenizer, request)) for category, request in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][1]), i))
    batches = [order[i : i + text.batch] for i in range(0, len(order), text.batch)]
    answers: dict[int, Answer] = {}
    for index, batch in enumerate(tqdm(batches, desc=f"target answers ({split})", disable=not progress,
                                       dynamic_ncols=True)):
        made = done.get((split, index))
        if made is None:
            sampled = text.sampled_every > 0 and index % text.sampled_every == text.sampled_every - 1
            replies = generate_replies(model, tokenizer, [encoded[i][1] for i in batch], text.answer_tokens,
                                       text.temperature if sampled else 0.0, derive_seed(seed, f"chat:{split}:{index}"))
            made = [Answer(encoded[i][0], encoded[i][1], reply, sampled) for i, reply in zip(batch, replies)]
            with path.open("a") as out:  # one line per batch: an interruption loses at most this one
                out.write(json.dumps({"split": split, "batch": index, "answers": [asdict(a) for a in made]}) + "\n")
        answers.update(zip(batch, made))
    return [answers[i] for i in range(len(encoded))]


def answer_windows(answers: list[Answer], seq_len: int, eos: int | None) -> torch.Tensor:
    """The requests and their answers as one stream (each exchange ended by eos), cut into [n, seq_len] windows."""
    ids: list[int] = []
    for a in answers:
        ids.extend(a.prompt)
        ids.extend(a.answer)
        if eos is not None and (not a.answer or a.answer[-1] != eos):
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)  # [n, T]
