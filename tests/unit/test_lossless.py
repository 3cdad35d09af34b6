"""The lossless status has one owner (spectune.lossless): one rule decides it, one table says which stored
facts count (pandas and SQL built from it agree), one function renders it."""

from __future__ import annotations

import itertools
import os

import pandas as pd
import pytest
import sqlalchemy as sa

from spectune.lossless import (
    CERTIFIED, LOSSLESS_STATUSES, LosslessStatus, counts_clause, counts_mask, decide, lossless_text, unchecked_mask,
)

S = LosslessStatus


def test_the_verdict_rule_for_every_backend():
    assert decide(False, [True, True]) is S.UNCHECKED  # sampling: never compared
    assert decide(True, [True, True]) is S.EXACT
    assert decide(True, [True, False]) is S.UNCHECKED  # outputs differ and no certificate ran (vLLM without one)
    assert decide(True, [True, False], failures=0) is S.WITHIN_TOLERANCE  # the certificate found every token in
    assert decide(True, [True, False], failures=2) is S.LOSSY
    assert decide(True, None, reference=True) is S.EXACT  # the greedy reference measured against itself
    # sampled, the reference reads as spectune's engine marks its own AR row (vLLM's twin said exact before)
    assert decide(False, None, reference=True) is S.UNCHECKED
    assert [s.certified for s in S] == [True, True, False, False] and CERTIFIED == ("exact", "within_tolerance")
    assert [s.flag for s in S] == [True, True, False, None]
    assert LOSSLESS_STATUSES == ("exact", "within_tolerance", "lossy", "unchecked")
    assert LosslessStatus.of(True, None) is S.EXACT and LosslessStatus.of(None, float("nan")) is S.UNCHECKED
    assert LosslessStatus.of(True, "within_tolerance") is S.WITHIN_TOLERANCE
    assert LosslessStatus.of(True, "lossy") is S.LOSSY and LosslessStatus.of(False, "exact") is S.LOSSY  # the worse


FACTS = list(itertools.product([True, False, None], [None, *LOSSLESS_STATUSES], [True, False]))


DATABASES = ["sqlite://", *filter(None, [os.environ.get("SPECTUNE_TEST_PG_URL")])]  # PostgreSQL when one is set up


@pytest.mark.parametrize("url", DATABASES)
@pytest.mark.parametrize("include_unchecked", [False, True])
def test_the_pandas_mask_and_the_sql_clause_count_the_same_rows(include_unchecked: bool, url: str):
    engine = sa.create_engine(url)
    table = sa.Table(f"lossless_rule_{os.getpid()}", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("lossless", sa.Boolean), sa.Column("lossless_status", sa.String(32)),
                     sa.Column("lossy_method", sa.Boolean))
    table.metadata.create_all(engine)
    rows = [{"id": i, "lossless": f, "lossless_status": s, "lossy_method": m} for i, (f, s, m) in enumerate(FACTS)]
    try:
        with engine.begin() as c:
            c.execute(table.insert(), rows)
            clause = counts_clause(table.c.lossless, table.c.lossless_status, table.c.lossy_method, include_unchecked)
            in_sql = set(c.scalars(sa.select(table.c.id).where(clause)))
    finally:
        table.metadata.drop_all(engine)
        engine.dispose()
    df = pd.DataFrame(rows).astype({"lossless": "boolean", "lossy_method": "boolean"})
    in_pandas = set(df.loc[counts_mask(df, include_unchecked), "id"])
    assert in_sql == in_pandas
    counted = {FACTS[i] for i in in_pandas}
    expected = {(True, None, False), (True, "exact", False), (True, "within_tolerance", False)}
    if include_unchecked:
        expected |= {(None, None, False), (None, "unchecked", False)}
    assert counted == expected


def test_unchecked_rows_are_finished_sampling_rows_of_a_lossless_method():
    df = pd.DataFrame({"status": ["done", "running", "done", "done"],
                       "lossless": pd.array([None, None, None, True], dtype="boolean"),
                       "lossless_status": ["unchecked", None, "unchecked", "exact"],
                       "lossy_method": [False, False, True, False]})
    assert unchecked_mask(df).tolist() == [True, False, False, False]


def test_one_text_short_in_tables_long_in_prose():
    exact = {"lossless": True, "lossless_status": "exact", "lossy_method": False}
    within = {"lossless": True, "lossless_status": "within_tolerance", "lossy_method": False,
              "exact_match_rate": 0.5, "worst_margin": 0.125}
    lossy = {"lossless": False, "lossless_status": "lossy", "lossy_method": False, "mismatches": 3}
    sampled = {"lossless": None, "lossless_status": "unchecked", "lossy_method": False}
    assert [lossless_text(f) for f in (exact, within, lossy, sampled)] == [
        "yes", "yes, within tolerance (worst margin 0.12)", "NO (3 prompts differ)", "unchecked (sampling)"]
    assert lossless_text({**exact, "lossy_method": True}) == "lossy method"
    assert lossless_text(exact, long=True) == "certified lossless: greedy outputs identical to AR on every prompt"
    assert lossless_text(within, long=True) == ("certified lossless within tolerance: 50% identical to AR, every "
                                                "token the target's argmax within rounding (worst margin 0.12 logits)")
    assert lossless_text({"lossless": False, "mismatches": float("nan")}) == "NO"  # a row from before the status
