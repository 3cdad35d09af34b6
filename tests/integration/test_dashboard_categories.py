"""Prompt categories from a real bench run, through the store, to the dashboard's table and figure;
and the certificate's within-tolerance verdict as the dashboard words it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_export import chat_micro_pair
from spectune.bench import contender, run_bench
from spectune.config import Settings
from spectune.dashboard.figures import category_figure, category_table, lossless_text
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts
from spectune.store import connect

HARDWARE = {"device": "cpu", "cpu_model": "test", "gpu_model": None, "n_cpus": 1, "torch_version": "x",
            "transformers_version": "x", "hostname": "here"}


def test_categories_reach_the_store_and_the_dashboard(micro_pair: Path, tmp_path: Path) -> None:
    pair = load_pair(PairRef.model_validate(str(chat_micro_pair(micro_pair, tmp_path))))
    settings = Settings(max_new_tokens=8, repeats=1, warmup=0)
    prompts = load_prompts("chat", 7)  # one per category
    rows = run_bench(pair, [contender(pair, METHODS.config(m, {})) for m in ("sps", "pld")], prompts, settings)
    with connect(f"sqlite:///{tmp_path / 'c.db'}") as store:
        store.create_sweep("chat", {"name": "chat"}, who="test", where="here")
        for row in rows:
            store.upsert_trial("chat", row.label, row.config, "running")
            store.record_result("chat", row.label, row, HARDWARE)
        frame = store.trials_frame("chat")
        stored = store.trial_detail(int(frame.trial_id.iloc[1]))["metrics"]["by_category"]
    assert stored == {name: dict(entry) for name, entry in rows[1].by_category.items()}  # JSON round trip
    table = category_table(stored)
    assert list(table["category"]) == sorted({p.category for p in prompts}) and table["n_prompts"].sum() == 7
    figure = category_figure(frame)
    assert figure is not None and {trace.name.split("(")[0] for trace in figure.data} == {"ar", "sps", "pld"}
    assert all(len(trace.x) == 7 for trace in figure.data)


def test_within_tolerance_is_lossless_and_says_so() -> None:
    row = {"lossless": True, "lossy_method": False, "lossless_status": "within_tolerance", "worst_margin": 0.125}
    assert lossless_text(row) == "yes, within tolerance (worst margin 0.12)"
    assert lossless_text({**row, "lossless_status": "exact"}) == "yes"
    assert lossless_text({**row, "lossless": False, "lossless_status": "lossy", "mismatches": 3}) == "NO (3 prompts differ)"
