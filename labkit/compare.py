"""Regression checks: is a new run slower or worse than a stored one, setup by setup?

`compare_records` matches the records of two runs by setup and says, metric by metric, whether the new
run is slower or worse beyond a tolerance; ``labkit compare BASE NEW`` is the command-line form, which
exits 1 on a regression and 2 on bad input (for a user's own CI).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from labkit.records import RecordsError, read_records

SETUP_KEYS = ("source", "size", "steps", "batch", "dtype")
"""What two records must share to be compared (their devices may differ)."""

COMPARE_KEYS = ("label", *SETUP_KEYS, "guidance", "memory_cap_gb")
"""What two records must share to be compared by `compare_records`: the configuration's label,
`SETUP_KEYS` (source, size, steps, batch, dtype), guidance and the memory cap."""

GOOD = ("ok",)
BAD = ("oom", "nan", "error", "unavailable")


@dataclass(frozen=True)
class Metric:
    """A record field `compare_records` checks: which direction is worse, and how the tolerance applies."""

    field: str
    name: str
    higher_is_worse: bool
    relative: bool
    """Relative tolerance (a fraction of the base value) or absolute (in the field's units)."""
    tolerance: str
    """Which tolerance of `compare_records` applies: ``time``, ``memory``, ``quality`` or ``fid``."""


METRICS = (
    Metric("s_per_image", "s / image", True, True, "time"),
    Metric("peak_allocated_gb", "peak allocated GB", True, True, "memory"),
    Metric("prompt_accuracy", "prompt accuracy", False, False, "quality"),
    Metric("fid", "FID (our features)", True, True, "fid"),
)
"""The metrics `compare_records` checks, when both records hold them."""


# ---------------------------------------------------------------------------------------------------
# The regression check
# ---------------------------------------------------------------------------------------------------


def setup_key(record: dict, keys: Sequence[str] = COMPARE_KEYS) -> tuple:
    """The values of ``keys`` in ``record``: records with equal keys measured the same setup."""
    return tuple(record.get(k) for k in keys)


def setup_name(record: dict) -> str:
    """A short readable name of a record's setup, for the comparison table."""
    parts = [str(record.get("label", "?")), str(record.get("source", "?"))]
    if record.get("size") is not None:
        parts.append(f"{record['size']} px")
    if record.get("steps") is not None:
        parts.append(f"{record['steps']} steps")
    if record.get("batch") not in (None, 1):
        parts.append(f"batch {record['batch']}")
    if record.get("dtype"):
        parts.append(str(record["dtype"]))
    if record.get("memory_cap_gb") is not None:
        parts.append(f"cap {record['memory_cap_gb']:g} GB")
    return ", ".join(parts)


def _latest_by_setup(records: Sequence[dict], keys: Sequence[str]) -> dict[tuple, dict]:
    """Records keyed by setup; where a file holds a setup more than once, the last record wins."""
    out: dict[tuple, dict] = {}
    for r in records:
        if "status" not in r:
            continue  # not a benchmark record (e.g. an audit row)
        out[setup_key(r, keys)] = r
    return out


def compare_records(
    base: Sequence[dict],
    new: Sequence[dict],
    *,
    time_tolerance: float = 0.1,
    memory_tolerance: float = 0.1,
    quality_tolerance: float = 0.02,
    fid_tolerance: float = 0.1,
    keys: Sequence[str] = COMPARE_KEYS,
) -> list[dict]:
    """Compare a new run with a base run, setup by setup and metric by metric.

    Records are matched when they share ``keys`` (`COMPARE_KEYS`: label, source, size, steps, batch,
    dtype, guidance, memory cap); where a run holds a setup twice, its last record counts. Each row
    is ``{"setup", "metric", "base", "new", "change", "verdict", "fails"}``. A metric fails when the
    new value is worse than the base beyond its tolerance: seconds per image and peak allocated
    memory by more than ``time_tolerance`` / ``memory_tolerance`` (relative), prompt accuracy by more
    than ``quality_tolerance`` (absolute), FID by more than ``fid_tolerance`` (relative). A setup
    that was ``ok`` and is now ``oom``, ``nan``, ``error`` or ``unavailable`` fails, and so does a
    setup of the base run that the new run lacks. A setup only the new run has is listed, not failed.
    Metrics a record lacks (memory on a CPU, quality on a twin) are skipped.
    """
    for name, value in (
        ("time_tolerance", time_tolerance),
        ("memory_tolerance", memory_tolerance),
        ("quality_tolerance", quality_tolerance),
        ("fid_tolerance", fid_tolerance),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a fraction such as 0.1), got {value}")
    tolerances = {
        "time": time_tolerance,
        "memory": memory_tolerance,
        "quality": quality_tolerance,
        "fid": fid_tolerance,
    }
    old, now = _latest_by_setup(base, keys), _latest_by_setup(new, keys)
    rows: list[dict] = []

    def row(record, metric, b, n, change, verdict, fails):
        rows.append(
            {
                "setup": setup_name(record),
                "metric": metric,
                "base": b,
                "new": n,
                "change": change,
                "verdict": verdict,
                "fails": fails,
            }
        )

    for key, b in old.items():
        n = now.get(key)
        if n is None:
            row(b, "status", b["status"], "missing", "", "missing in the new run", True)
            continue
        if b["status"] != n["status"]:
            if b["status"] in GOOD and n["status"] not in GOOD:
                verdict, fails = f"regressed: {b['status']} -> {n['status']}", True
            elif n["status"] in GOOD:
                verdict, fails = f"fixed: {b['status']} -> {n['status']}", False
            else:
                verdict, fails = f"still not ok: {b['status']} -> {n['status']}", False
            row(b, "status", b["status"], n["status"], "", verdict, fails)
            continue
        if b["status"] not in GOOD:
            row(b, "status", b["status"], n["status"], "", f"still {n['status']}", False)
            continue
        for m in METRICS:
            bv, nv = b.get(m.field), n.get(m.field)
            if bv is None or nv is None:
                continue
            tolerance = tolerances[m.tolerance]
            worse = (nv - bv) if m.higher_is_worse else (bv - nv)
            if m.relative:
                change = nv / bv - 1 if bv else float("inf") if nv else 0.0
                limit = tolerance * abs(bv)
                shown = f"{change:+.1%}"
            else:
                change = nv - bv
                limit = tolerance
                shown = f"{change:+.3f}"
            fails = worse > limit
            if fails:
                verdict = "slower" if m.field == "s_per_image" else "worse"
                verdict += " beyond the tolerance"
            elif worse < -limit:
                verdict = "faster" if m.field == "s_per_image" else "better"
            else:
                verdict = "within the tolerance"
            row(b, m.name, bv, nv, shown, verdict, fails)
    for key, n in now.items():
        if key not in old:
            row(n, "status", "missing", n["status"], "", "new setup (not compared)", False)
    return rows


def compare_table(rows: Sequence[dict]):
    """The rows of `compare_records` as a table: setup, metric, base, new, change, verdict."""
    import pandas as pd

    table = pd.DataFrame(list(rows), columns=["setup", "metric", "base", "new", "change", "verdict"])
    for column in ("base", "new"):
        table[column] = [f"{v:.4g}" if isinstance(v, float) else v for v in table[column]]
    return table


def compare_files(base: str | Path, new: str | Path, **tolerances) -> list[dict]:
    """`compare_records` on two JSON-lines results files (what ``labkit compare`` does).

    Raises `FileNotFoundError` or `ValueError` with what to do when a file is missing, holds no
    records, or no setup of ``new`` matches one of ``base``.
    """
    runs = []
    for name, path in (("base", base), ("new", new)):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{name} results file {path} not found: give a JSON-lines file written by "
                "`labkit bench --out` or a records file of a book's records/ folder"
            )
        records = [r for r in read_records(path) if "status" in r]
        if not records:
            raise ValueError(f"{name} results file {path} holds no result records")
        runs.append(records)
    rows = compare_records(*runs, **tolerances)
    if all(r["verdict"] in ("missing in the new run", "new setup (not compared)") for r in rows):
        raise ValueError(
            "no setup of the new run matches one of the base run (same "
            + ", ".join(COMPARE_KEYS)
            + "): benchmark the same configurations, with the same labels"
        )
    return rows


def compare_command(args) -> int:
    """``labkit compare BASE NEW``: print the comparison table; 1 on a regression, 2 on bad input."""
    try:
        rows = compare_files(
            args.base,
            args.new,
            time_tolerance=args.time_tolerance,
            memory_tolerance=args.memory_tolerance,
            quality_tolerance=args.quality_tolerance,
            fid_tolerance=args.fid_tolerance,
        )
    except (FileNotFoundError, ValueError, RecordsError) as error:
        print(f"labkit compare: {error}", file=sys.stderr)
        return 2
    print(compare_table(rows).to_string(index=False))
    failed = [r for r in rows if r["fails"]]
    if failed:
        print(f"\nFAIL: {len(failed)} regression(s) beyond the tolerance in {args.new}")
        return 1
    print(f"\nPASS: no regression beyond the tolerance ({len(rows)} checks)")
    return 0


def add_compare_arguments(parser) -> None:
    """The arguments of ``labkit compare`` (wired into `labkit.cli`)."""
    parser.add_argument("base", help="the stored run: a JSON-lines results file")
    parser.add_argument("new", help="the run to check against it")
    parser.add_argument(
        "--time-tolerance", type=float, default=0.1, help="allowed slow-down, relative (default 0.1)"
    )
    parser.add_argument(
        "--memory-tolerance", type=float, default=0.1, help="allowed peak memory growth, relative"
    )
    parser.add_argument(
        "--quality-tolerance", type=float, default=0.02, help="allowed prompt accuracy drop, absolute"
    )
    parser.add_argument("--fid-tolerance", type=float, default=0.1, help="allowed FID rise, relative")
