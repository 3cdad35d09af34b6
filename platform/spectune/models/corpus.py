"""The training corpus: the Python standard library's own ``.py`` source.

It exists on every machine that runs spectune, needs no download, and is real code, so
a model trained on it gives speculative decoding something realistic to predict
(repeated identifiers, indentation, boilerplate) without any weights from the Hub.

Determinism: files are listed sorted by their path relative to the stdlib root; the
held-out split and the byte cap depend only on those relative paths (sha1), never on
directory-listing order, mtimes or the process's hash seed. The corpus is therefore
identical on every machine with the same Python version (the stdlib differs between
Python versions, so trained pairs do too).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

#: Path components that exclude a file: test suites (large, repetitive, not the
#: library's own code), IDLE, third-party packages, bytecode caches, and two
#: directories that are data rather than code (``encodings/`` is ~120 generated
#: charmap tables of hex literals; ``pydoc_data/`` is one 750 KB string).
EXCLUDED_PARTS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)

#: Files larger than this are skipped ("huge": generated tables, _pydecimal, ...).
MAX_FILE_BYTES = 100_000

#: A file is held out when int(sha1(relative path)) % HELDOUT_MODULUS == 0 (~10%).
HELDOUT_MODULUS = 10


def stdlib_root() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _path_hash(relpath: str) -> int:
    return int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16)


def is_heldout(relpath: str) -> bool:
    """Whether a file (by POSIX path relative to the stdlib root) is in the held-out split."""
    return _path_hash(relpath) % HELDOUT_MODULUS == 0


def list_stdlib_files(root: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Relative POSIX paths of the usable ``.py`` files under ``root``, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_PARTS]  # prune excluded trees
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 0 < size <= max_file_bytes:
                out.append(path.relative_to(root).as_posix())
    out.sort()
    return out


@dataclass(frozen=True)
class CorpusFile:
    relpath: str
    text: str

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Corpus:
    """The selected files of each split, each split sorted by relative path."""

    root: str
    train: tuple[CorpusFile, ...]
    heldout: tuple[CorpusFile, ...]

    @property
    def train_bytes(self) -> int:
        return sum(f.n_bytes for f in self.train)

    @property
    def heldout_bytes(self) -> int:
        return sum(f.n_bytes for f in self.heldout)

    def digest(self) -> str:
        """sha1 over both splits' paths and contents: equal digests, equal corpora."""
        h = hashlib.sha1()
        for split, files in (("train", self.train), ("heldout", self.heldout)):
            for f in files:
                h.update(f"{split}\0{f.relpath}\0".encode())
                h.update(f.text.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()

    def describe(self) -> dict:
        """The JSON-able description stored in a pair's card."""
        return {
            "source": "python-stdlib",
            "root": self.root,
            "n_files_train": len(self.train),
            "n_files_heldout": len(self.heldout),
            "bytes_train": self.train_bytes,
            "bytes_heldout": self.heldout_bytes,
            "sha1": self.digest(),
            "heldout_rule": f"sha1(relpath) % {HELDOUT_MODULUS} == 0",
            "excluded_parts": sorted(EXCLUDED_PARTS),
            "max_file_bytes": MAX_FILE_BYTES,
        }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _select(root: Path, relpaths: list[str], cap: int) -> tuple[CorpusFile, ...]:
    """Files of one split up to ``cap`` bytes.

    Candidates are visited in sha1 order of their relative path (a fixed pseudo-random
    order, so a small cap still samples the whole library instead of the alphabetically
    first modules); a file that would overflow the cap is skipped. The result is sorted
    by relative path.
    """
    chosen: list[CorpusFile] = []
    total = 0
    for rel in sorted(relpaths, key=lambda r: (hashlib.sha1(r.encode()).hexdigest(), r)):
        text = _read(root / rel)
        if not text:
            continue
        n = len(text.encode("utf-8"))
        if total + n > cap:
            continue
        chosen.append(CorpusFile(rel, text))
        total += n
    chosen.sort(key=lambda f: f.relpath)
    return tuple(chosen)


def load_corpus(max_train_bytes: int, max_heldout_bytes: int, root: Path | None = None) -> Corpus:
    """Read the stdlib corpus, split it, and cap each split's size in bytes."""
    root = Path(root) if root is not None else stdlib_root()
    files = list_stdlib_files(root)
    train = [r for r in files if not is_heldout(r)]
    held = [r for r in files if is_heldout(r)]
    corpus = Corpus(str(root), _select(root, train, max_train_bytes), _select(root, held, max_heldout_bytes))
    if not corpus.train or not corpus.heldout:
        raise RuntimeError(
            f"the standard-library corpus under {root} is empty or too small "
            f"({len(corpus.train)} train / {len(corpus.heldout)} held-out files)"
        )
    return corpus
