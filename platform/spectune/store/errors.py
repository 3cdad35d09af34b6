"""Exceptions raised by the results store."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreUnavailable(StoreError, RuntimeError):
    """The database cannot be reached or brought to the current schema."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url  # password already masked
        self.reason = " ".join(reason.split()) or "unknown error"
        super().__init__(f"cannot reach database {self.url}: {self.reason}")


class SweepExists(StoreError, ValueError):
    """`create_sweep` with a name already taken (and no ``resume=True``)."""


class UnknownSweep(StoreError, LookupError):
    """No sweep of that name."""


class UnknownTrial(StoreError, LookupError):
    """No trial with that id."""
