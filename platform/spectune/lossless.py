"""Lossless status: the one owner of what it is, who decides it, which rows count, and how it reads.

A measured configuration is `exact` (outputs identical to the reference's), `within_tolerance`
(they differ, but the numerical certificate found every emitted token the target's argmax within
the dtype's rounding: `spectune.certificate`), `lossy` (the certificate found a token outside
it) or `unchecked` (sampling, or greedy outputs that differ where no certificate could be run).
The first two are *certified*. A method that does not claim to be lossless (`lossy_method`)
never counts, whatever its outputs did.

The store keeps three facts per result (columns `lossless`, `lossless_status`, `lossy_method`;
rows written before the certificate have no status): `counts_mask` (pandas) and
`counts_clause` (SQL) are built from one table of which facts count (`_COUNTS`, `_UNCHECKED`),
and `lossless_text` is the one way a result's status reads, in tables (short) and in prose (long).

Torch-, pandas- and SQLAlchemy-free at import: the dashboard, the store and the CLI import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any


class LosslessStatus(StrEnum):
    EXACT = "exact"
    WITHIN_TOLERANCE = "within_tolerance"
    LOSSY = "lossy"
    UNCHECKED = "unchecked"

    @property
    def certified(self) -> bool:
        """Counts as lossless: identical to the reference, or certified within the dtype's rounding."""
        return self in (LosslessStatus.EXACT, LosslessStatus.WITHIN_TOLERANCE)

    @property
    def flag(self) -> bool | None:
        """The stored `lossless` column: True when certified, False when lossy, None when unchecked."""
        if self is LosslessStatus.UNCHECKED:
            return None
        return self.certified

    @classmethod
    def of(cls, lossless: Any, status: Any) -> LosslessStatus:
        """Read back from the stored facts (a row from before the certificate has only the flag). A flag and
        a status that disagree read as the worse of the two, as the filters count them."""
        flagged = cls.UNCHECKED if _missing(lossless) else (cls.EXACT if bool(lossless) else cls.LOSSY)
        if _missing(status):
            return flagged
        told = cls(str(status))
        if _missing(lossless):
            return told
        for worse in (cls.LOSSY, cls.UNCHECKED):
            if worse in (flagged, told):
                return worse
        return told


LOSSLESS_STATUSES = tuple(s.value for s in LosslessStatus)
CERTIFIED = tuple(s.value for s in LosslessStatus if s.certified)
# the stored facts `lossless_text` reads
FACTS = ("lossless", "lossless_status", "lossy_method", "mismatches", "exact_match_rate", "worst_margin")


# --- deciding -----------------------------------------------------------------------------------

def decide(greedy: bool, identical: Sequence[bool] | None, failures: int | None = None,
           reference: bool = False) -> LosslessStatus:
    """The one verdict rule, for every backend.

    greedy: sampled outputs are never compared (`unchecked`). identical: per prompt, whether its
    output equals the reference's in every repeat. failures: tokens the numerical certificate found
    outside the tolerance, None where no certificate ran (then outputs that differ stay `unchecked`:
    a batched kernel may round a near-tie the other way, which only the certificate can tell from a
    bug). reference: the row *is* the reference (vLLM's no-speculation twin measured against itself):
    exact when greedy, unchecked when sampling, as spectune's engine marks its own AR row.
    """
    if not greedy:  # the reference too: sampled rows of both backends read alike
        return LosslessStatus.UNCHECKED
    if reference:
        return LosslessStatus.EXACT
    if identical is None:
        return LosslessStatus.UNCHECKED
    if all(identical):
        return LosslessStatus.EXACT
    if failures is None:
        return LosslessStatus.UNCHECKED
    return LosslessStatus.LOSSY if failures else LosslessStatus.WITHIN_TOLERANCE


# --- filtering ----------------------------------------------------------------------------------

# Which stored (lossless, lossless_status) pairs count; None = NULL. Everything else does not.
_COUNTS = ((True, None), *((True, s) for s in CERTIFIED))
_UNCHECKED = ((None, None), (None, LosslessStatus.UNCHECKED.value))


def _allowed(include_unchecked: bool) -> tuple[tuple[bool | None, str | None], ...]:
    return _COUNTS + (_UNCHECKED if include_unchecked else ())


def counts_clause(lossless: Any, status: Any, lossy_method: Any, include_unchecked: bool = False) -> Any:
    """SQL: the row counts as lossless (its three columns given); built from the same table as `counts_mask`."""
    import sqlalchemy as sa

    def equals(column: Any, value: Any) -> Any:
        return column.is_(value) if value is None or isinstance(value, bool) else column == value

    pairs = [sa.and_(equals(lossless, flag), equals(status, text)) for flag, text in _allowed(include_unchecked)]
    return sa.and_(sa.or_(*pairs), lossy_method.is_not(True))


def counts_mask(df: Any, include_unchecked: bool = False) -> Any:
    """pandas: per row of a trials frame, whether it counts as lossless. A frame without a
    `lossless` column carries no lossless facts: every row counts. Missing status or lossy_method
    columns read as NULL and False."""
    import pandas as pd

    if "lossless" not in df.columns:
        return pd.Series(True, index=df.index)
    flag = df["lossless"].astype("boolean")
    status = df["lossless_status"].astype("string") if "lossless_status" in df.columns else pd.Series(
        pd.NA, index=df.index, dtype="string")

    def equals(column: Any, value: Any) -> Any:
        return column.isna() if value is None else column.eq(value).fillna(False).astype(bool)

    out = pd.Series(False, index=df.index)
    for value, text in _allowed(include_unchecked):
        out |= equals(flag, value) & equals(status, text)
    return out & ~_lossy_method(df)


def unchecked_mask(df: Any) -> Any:
    """Finished rows of a lossless method whose outputs were never checked: they count only when asked."""
    import pandas as pd

    if "lossless" not in df.columns:
        return pd.Series(False, index=df.index)
    return counts_mask(df, include_unchecked=True) & ~counts_mask(df) & _finished(df)


def judged_mask(df: Any) -> Any:
    """Rows the rule applies to: finished ones (a pending or running trial has no facts yet), or
    a method known to be lossy."""
    return _finished(df) | _lossy_method(df)


def _lossy_method(df: Any) -> Any:
    import pandas as pd

    if "lossy_method" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["lossy_method"].astype("boolean").eq(True).fillna(False).astype(bool)


def _finished(df: Any) -> Any:
    import pandas as pd

    if "status" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["status"].eq("done").fillna(False).astype(bool)


# --- rendering ----------------------------------------------------------------------------------

def lossless_text(facts: Mapping[str, Any], long: bool = False) -> str:
    """How a result's lossless status reads: short in tables (bench, `spectune results`, the dashboard),
    long in prose (what `spectune serve` says it serves). `facts` holds the `FACTS` keys (a row, a
    metrics dict); NULL/NaN read as missing."""
    if not _missing(facts.get("lossy_method")) and bool(facts["lossy_method"]):
        return "lossy method: outputs may differ from plain decoding" if long else "lossy method"
    status = LosslessStatus.of(facts.get("lossless"), facts.get("lossless_status"))
    worst, share, mismatches = (facts.get(k) for k in ("worst_margin", "exact_match_rate", "mismatches"))
    if status is LosslessStatus.EXACT:
        return "certified lossless: greedy outputs identical to AR on every prompt" if long else "yes"
    if status is LosslessStatus.WITHIN_TOLERANCE:
        if not long:
            return "yes, within tolerance" + ("" if _missing(worst) else f" (worst margin {float(worst):.2g})")
        same = "" if _missing(share) else f"{float(share):.0%} identical to AR, "
        margin = "worst margin unknown" if _missing(worst) else f"worst margin {float(worst):.2g} logits"
        return f"certified lossless within tolerance: {same}every token the target's argmax within rounding ({margin})"
    if status is LosslessStatus.LOSSY:
        differ = "" if _missing(mismatches) else f"{int(mismatches)} prompts differ"
        if long:
            return "not lossless: " + (differ or "outputs differ") + " from plain decoding"
        return f"NO ({differ})" if differ else "NO"
    return "unchecked: outputs not compared with AR (sampling)" if long else "unchecked (sampling)"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


__all__ = ["CERTIFIED", "FACTS", "LOSSLESS_STATUSES", "LosslessStatus", "counts_clause", "counts_mask", "decide",
           "judged_mask", "lossless_text", "unchecked_mask"]
