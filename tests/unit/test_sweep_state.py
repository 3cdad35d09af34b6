"""Where a sweep's Tune state lives (per store and name), and failing without hiding the first error."""

from __future__ import annotations

from pathlib import Path

from spectune.store import connect
from spectune.sweeps.launcher import SweepOptions, _mark, experiment_path, store_key
from spectune.sweeps.spec import parse_spec
from support import sweep_spec


def test_tune_state_is_kept_per_store_and_name(tmp_path: Path) -> None:
    spec = parse_spec(sweep_spec("quick", tmp_path / "pair", {"pld": {}}))
    options = SweepOptions(storage=str(tmp_path / "tune"))
    one, other = (experiment_path(spec, options, f"sqlite:///{tmp_path / name}") for name in ("a.db", "b.db"))
    assert one != other and one.endswith("/quick") and one.startswith(str(tmp_path / "tune") + "/sqlite-")
    pg = "postgresql+psycopg://u:{}@db.example:5432/spectune"
    assert store_key(pg.format("secret")) == store_key(pg.format("rotated"))  # the password is no part of it
    assert "secret" not in store_key(pg.format("secret")) and store_key(pg.format("x")).startswith("postgresql-")


def test_a_status_that_cannot_be_set_is_noted_on_the_first_error(tmp_path: Path) -> None:
    first = RuntimeError("the sweep failed")
    with connect(f"sqlite:///{tmp_path / 's.db'}") as store:
        _mark(store, "never-created", "error", first)  # the store refuses: no such sweep
    [note] = first.__notes__
    assert "could not be set to 'error'" in note and "UnknownSweep" in note
