"""RASD's datastore: token n-gram indexes over the text that retrieval drafts from.

Two sources, one index type (`NgramIndex`: the last n tokens -> the positions right after every
earlier occurrence, for n in min_n..max_n):

- the sequence under decoding (prompt and output so far), indexed incrementally as it grows;
- optionally a corpus the user points at (`datastore: path`, a UTF-8 text file or a folder of them),
  read, tokenized with the target's tokenizer and indexed once when the method is built, so that
  decoding only looks up.

A lookup takes the longest suffix of the history that occurs in the index and counts the
continuations that followed its occurrences (REST's retrieval, PLD's when the source is the
prompt). Bad datastores are refused when the method is built, before any decoding, in one line
naming the path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

#: Separates documents in a corpus index: no n-gram key holds it and continuations stop before it.
BOUNDARY = -1
#: Text a datastore may hold; indexing more would take minutes and gigabytes (one dict entry per n and token).
MAX_DATASTORE_BYTES = 16_000_000
#: Occurrences of one suffix whose continuations a lookup counts (a common n-gram occurs thousands of times).
MAX_SCANNED = 256


class NgramIndex:
    """n tokens (min_n <= n <= max_n) -> positions right after each occurrence, over one growing token list."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens; every position gets indexed under the n-grams that end right before it."""
        for token in tokens:
            position = len(self.tokens)
            self.tokens.append(token)
            if token == BOUNDARY:
                continue
            for n in range(self.min_n, min(self.max_n, position) + 1):
                key = tuple(self.tokens[position - n : position])
                if BOUNDARY not in key:
                    self.starts.setdefault(key, []).append(position)

    def continuations(self, history: Sequence[int], depth: int, recent: bool) -> Counter[tuple[int, ...]]:
        """Counts of the continuations (<= depth tokens each) after the longest indexed suffix of `history`.

        At most MAX_SCANNED occurrences are read: the latest ones, latest first (`recent`: the sequence
        under decoding, where the nearest text is the likeliest to repeat; equal counts then rank the
        latest first) or ones spread evenly over the index (a corpus, in file order).
        """
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            hits = self.starts.get(tuple(history[-n:]))
            if hits:
                scanned = _scanned(hits, recent)  # ascending positions
                return Counter(self._continuation(start, depth) for start in (reversed(scanned) if recent else scanned))
        return Counter()

    def _continuation(self, start: int, depth: int) -> tuple[int, ...]:
        tokens = self.tokens[start : start + depth]
        return tuple(tokens[: tokens.index(BOUNDARY)] if BOUNDARY in tokens else tokens)


def _scanned(hits: list[int], recent: bool) -> list[int]:
    if len(hits) <= MAX_SCANNED:
        return hits
    if recent:
        return hits[-MAX_SCANNED:]
    stride = -(-len(hits) // MAX_SCANNED)  # ceil: at most MAX_SCANNED, spread over the whole corpus
    return hits[::stride]


def read_texts(path: str) -> list[str]:
    """The datastore's documents: a UTF-8 text file, or every UTF-8 file under a folder (others skipped)."""
    where = Path(path).expanduser()
    if not where.exists():
        raise ValueError(f"datastore {path}: no such file or folder")
    if where.is_dir():
        return _folder_texts(where, path)
    return [_file_text(where, path)]


def _file_text(file: Path, path: str) -> str:
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"datastore {path}: cannot read it ({err.strerror or err})") from None
    _check_size(len(raw), path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"datastore {path}: not UTF-8 text (byte {err.start} cannot be decoded)") from None
    if not text.strip():
        raise ValueError(f"datastore {path}: the file holds no text")
    return text


def _folder_texts(folder: Path, path: str) -> list[str]:
    texts, total = [], 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            text = file.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # binaries and unreadable files in a folder of text
        if text.strip():
            total += len(text.encode("utf-8"))
            _check_size(total, path)
            texts.append(text)
    if not texts:
        raise ValueError(f"datastore {path}: the folder holds no UTF-8 text file")
    return texts


def _check_size(size: int, path: str) -> None:
    if size > MAX_DATASTORE_BYTES:
        raise ValueError(f"datastore {path}: more than {MAX_DATASTORE_BYTES // 1_000_000} MB of text "
                         f"(the most one build indexes); point it at a smaller file or folder")


def target_tokenizer(model: PreTrainedModel, path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the target (a pair folder's target/ or a hub id), to tokenize the datastore."""
    source = str(model.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"datastore {path}: cannot load the target's tokenizer from {source!r} ({reason})") from None


def corpus_index(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, min_n: int, max_n: int, path: str
                 ) -> NgramIndex:
    """Tokenize and index the datastore's documents (`read_texts(path)`) once; no n-gram spans two."""
    index = NgramIndex(min_n, max_n)
    for text in texts:
        # verbose=False: no "longer than the model's context" warning, the corpus is never fed to a model
        index.extend(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        index.extend([BOUNDARY])
    if not index.starts:
        raise ValueError(f"datastore {path}: its text holds no {min_n}-token n-gram to retrieve from")
    return index
