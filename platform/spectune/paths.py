"""Where spectune keeps what it builds and records: one cache folder, `$SPECTUNE_CACHE` or ~/.cache/spectune."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SPECTUNE_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache folder (read from the environment at each call), or a path inside it."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "spectune"
    return root.joinpath(*parts)
