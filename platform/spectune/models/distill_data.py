"""What a distilled drafter learns from: stdlib code, and the target's own answers to instructions.

Both exist on every machine. Instructions are made from the stdlib itself (its functions,
docstrings and modules) and from seeded arithmetic templates, in the categories the shipped
chat prompts use; the train split's files give the training instructions and the held-out
split's files the held-out ones (:mod:`.corpus` splits by path hash), so none of them is a
shipped benchmark prompt. The target answers them greedily: the drafter then learns the
distribution it will be asked to predict (EAGLE and Medusa train on self-generated data too).
"""

from __future__ import annotations

import ast
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from .corpus import CorpusFile

CATEGORIES = ("coding", "explain_code", "qa", "summarise", "math", "extraction", "rewriting")
MAX_SOURCE_CHARS = 700  # functions longer than this make prompts longer than the drafter's windows


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    signature: str
    docstring: str
    source: str


def stdlib_functions(files: Sequence[CorpusFile]) -> list[Function]:
    """Top-level functions with a docstring, in file order (files are sorted by path)."""
    found = []
    for file in files:
        try:
            tree = ast.parse(file.text)
        except (SyntaxError, ValueError):
            continue
        module = file.relpath.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                source = ast.get_source_segment(file.text, node) or ""
                if 0 < len(source) <= MAX_SOURCE_CHARS:
                    signature = f"{node.name}({ast.unparse(node.args)})"
                    found.append(Function(module, node.name, signature, ast.get_docstring(node) or "", source))
    return found


def _first_sentence(doc: str) -> str:
    line = doc.strip().splitlines()[0].strip().rstrip(".")
    return line[:1].lower() + line[1:]


def _instruction(category: str, fn: Function, rng: random.Random) -> str | None:
    doc = " ".join(fn.docstring.split())
    if category == "coding":
        return f"Write a Python function `{fn.signature}` that {_first_sentence(fn.docstring)}."
    if category == "explain_code":
        return f"Explain what this Python function does:\n\n```python\n{fn.source}\n```"
    if category == "qa":
        return f"What is the Python standard library module `{fn.module}` used for? Answer briefly."
    if category == "summarise" and len(doc) > 160:
        return f"Summarise the following passage in one or two sentences:\n\n{textwrap.fill(doc, 100)}"
    if category == "extraction":
        return (f"From the function below, list each parameter and what it is for.\n\n"
                f"```python\ndef {fn.signature}:\n    \"\"\"{fn.docstring.strip()}\"\"\"\n```")
    if category == "rewriting" and len(doc) > 80:
        return f"Rewrite this text so that it is clearer and more concise:\n\n{doc}"
    if category == "math":
        return _math_problem(rng)
    return None


def _math_problem(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 60), rng.randint(2, 25), rng.randint(2, 12)
    templates = (
        f"A library has {a} books and buys {b} more every month. How many books does it have after {c} months?",
        f"A train travels at {a} km per hour for {c} hours and then at {b} km per hour for {c} hours. "
        "How far does it travel in total?",
        f"Sam has {a} apples. He gives {b} to each of his {c} friends, if he can. How many apples are left?",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and its perimeter?",
        f"A shop sells pens at {b} dollars each. How much do {c} pens cost with a {a}% discount?",
    )
    return rng.choice(templates)


def instructions(files: Sequence[CorpusFile], count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (category, instruction) pairs, categories in turn, drawn deterministically from `files`."""
    rng = random.Random(seed)
    functions = stdlib_functions(files)
    rng.shuffle(functions)
    made: list[tuple[str, str]] = []
    for fn, category in zip(functions, _cycle(CATEGORIES, len(functions))):
        text = _instruction(category, fn, rng)
        if text is not None:
            made.append((category, text))
        if len(made) == count:
            break
    return made


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]
