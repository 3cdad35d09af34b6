"""Helpers shared by the writer and the reader: value coercion, upserts, lookups."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from spectune.store.errors import UnknownSweep
from spectune.store.schema import HARDWARE_FIELDS, Hardware, Sweep

_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars/arrays unwrapped, tuples as lists, NaN/inf as None."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    return str(obj)


def _number(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def as_float(name: str, value: Any) -> float | None:
    return _number(name, value, float)


def as_int(name: str, value: Any) -> int | None:
    return _number(name, value, int)


def as_bool(name: str, value: Any) -> bool | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    return bool(value)


def upsert(session: Session, table: sa.Table, values: dict[str, Any], keys: list[str],
           update: dict[str, Any] | None = None, returning: str = "id",
           fill: tuple[str, ...] = ()) -> Any:
    """INSERT ... ON CONFLICT (keys) DO UPDATE in one statement; returns the row's `returning`.

    On conflict the row gets ``update``, and the ``fill`` columns get the new value only
    where they are NULL. With neither, the row is left as it is (a no-op update, so that
    RETURNING still yields its key).
    """
    dialect = session.get_bind().dialect.name
    if dialect not in _INSERTS:
        raise NotImplementedError(f"the store supports SQLite and PostgreSQL, not {dialect}")
    stmt = _INSERTS[dialect](table).values(**values)
    set_ = {**{c: sa.func.coalesce(table.c[c], stmt.excluded[c]) for c in fill}, **(update or {})}
    set_ = set_ or {keys[0]: stmt.excluded[keys[0]]}
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_=set_)
    return session.execute(stmt.returning(table.c[returning])).scalar_one()


def sweep_id(session: Session, name: str) -> int:
    found = session.scalar(sa.select(Sweep.id).where(Sweep.name == name))
    if found is None:
        raise UnknownSweep(f"no sweep named {name!r}")
    return found


def hardware_values(hardware: Mapping[str, Any]) -> dict[str, Any]:
    """Column values of a hardware dict (unknown keys in `extra`) plus its fingerprint."""
    hw = jsonable(dict(hardware))
    values: dict[str, Any] = {f: hw.pop(f, None) for f in HARDWARE_FIELDS}
    values["device"] = str(values["device"] or "unknown")
    values["n_cpus"] = as_int("hardware.n_cpus", values["n_cpus"])
    for f in HARDWARE_FIELDS:
        if f != "n_cpus" and values[f] is not None:
            values[f] = str(values[f])
    values["extra"] = hw
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    values["fingerprint"] = hashlib.sha256(canonical.encode()).hexdigest()
    return values


def hardware_id(session: Session, hardware: Mapping[str, Any]) -> int:
    """The id of the row describing ``hardware``, inserted if new (identical rows are shared)."""
    return upsert(session, Hardware.__table__, hardware_values(hardware), ["fingerprint"])


def hardware_dict(hw: Hardware | None) -> dict[str, Any] | None:
    if hw is None:
        return None
    return {**{f: getattr(hw, f) for f in HARDWARE_FIELDS}, **(hw.extra or {})}


def hardware_summary(hw: Mapping[str, Any] | Hardware | None) -> str:
    """A short label such as ``cuda · NVIDIA H200`` or ``cpu · AMD EPYC 7B13 · 16 CPUs``."""
    if hw is None:
        return ""
    get = hw.get if isinstance(hw, Mapping) else lambda f: getattr(hw, f, None)
    device = get("device") or "unknown"
    model = get("gpu_model") if device != "cpu" and get("gpu_model") else get("cpu_model")
    parts = [device] + ([model] if model else [])
    if device == "cpu" and get("n_cpus"):
        parts.append(f"{get('n_cpus')} CPUs")
    return " · ".join(parts)
