"""labkit.compare: the regression check (`compare_records`) and ``labkit compare``."""

from __future__ import annotations

import json

import pytest

from labkit import compare
from labkit.cli import main


def record(label="prod", s=1.0, status="ok", **extra) -> dict:
    r = {
        "label": label, "source": "shapes", "size": 64, "steps": 20, "batch": 1, "dtype": "float32",
        "guidance": 7.5, "status": status,
    }  # fmt: skip
    if status == "ok":
        r |= {"s_per_image": s, "peak_allocated_gb": None}
    return r | extra


def verdicts(rows, metric=None):
    return [r["verdict"] for r in rows if metric is None or r["metric"] == metric]


def test_a_run_against_itself_passes():
    run = [record(s=1.0, prompt_accuracy=0.9, fid=10.0), record("other", s=2.0)]
    rows = compare.compare_records(run, run)
    assert not any(r["fails"] for r in rows)
    assert {r["metric"] for r in rows} == {"s / image", "prompt accuracy", "FID (our features)"}
    assert set(verdicts(rows)) == {"within the tolerance"}


def test_slower_beyond_the_tolerance_fails_and_within_passes():
    base = [record(s=1.0)]
    assert compare.compare_records(base, [record(s=1.05)])[0]["fails"] is False
    slow = compare.compare_records(base, [record(s=1.2)])[0]
    assert slow["fails"] and slow["verdict"] == "slower beyond the tolerance"
    assert slow["change"] == "+20.0%"
    assert not compare.compare_records(base, [record(s=1.2)], time_tolerance=0.25)[0]["fails"]
    assert compare.compare_records(base, [record(s=0.5)])[0]["verdict"] == "faster"


def test_quality_tolerances():
    base = [record(prompt_accuracy=0.90, fid=10.0)]
    rows = compare.compare_records(base, [record(prompt_accuracy=0.85, fid=10.5)])
    accuracy = next(r for r in rows if r["metric"] == "prompt accuracy")
    fid = next(r for r in rows if r["metric"] == "FID (our features)")
    assert accuracy["fails"] and accuracy["change"] == "-0.050"
    assert not fid["fails"]  # +5% < 10%
    rows = compare.compare_records(base, [record(prompt_accuracy=0.89, fid=12.0)])
    assert [r["fails"] for r in rows if r["metric"] != "s / image"] == [False, True]


def test_status_transitions():
    rows = compare.compare_records([record()], [record(status="oom")])
    assert rows[0]["fails"] and rows[0]["verdict"] == "regressed: ok -> oom"
    rows = compare.compare_records([record(status="oom")], [record(s=1.0)])
    assert not rows[0]["fails"] and rows[0]["verdict"] == "fixed: oom -> ok"
    rows = compare.compare_records([record(status="nan")], [record(status="nan")])
    assert not rows[0]["fails"]


def test_setups_are_matched_by_their_keys():
    base = [record(s=1.0), record(s=1.0, steps=4)]
    new = [record(s=1.0, steps=4), record(s=9.0, size=128)]  # steps=20 missing, size=128 new
    rows = compare.compare_records(base, new)
    missing = [r for r in rows if r["verdict"] == "missing in the new run"]
    added = [r for r in rows if r["verdict"] == "new setup (not compared)"]
    assert len(missing) == 1 and missing[0]["fails"] and "20 steps" in missing[0]["setup"]
    assert len(added) == 1 and not added[0]["fails"] and "128 px" in added[0]["setup"]


def test_the_last_record_of_a_setup_counts():
    rows = compare.compare_records([record(s=5.0), record(s=1.0)], [record(s=1.0)])
    assert len(rows) == 1 and not rows[0]["fails"]


def test_bad_tolerance():
    with pytest.raises(ValueError, match="time_tolerance"):
        compare.compare_records([record()], [record()], time_tolerance=-1)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_cli_exit_codes(tmp_path, capsys):
    base = write(tmp_path / "base.jsonl", [record(s=1.0, prompt_accuracy=0.9)])
    same = write(tmp_path / "same.jsonl", [record(s=1.02, prompt_accuracy=0.9)])
    slow = write(tmp_path / "slow.jsonl", [record(s=1.5, prompt_accuracy=0.9)])
    assert main(["compare", base, base]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["compare", base, same]) == 0
    assert main(["compare", base, slow]) == 1
    out = capsys.readouterr().out
    assert "slower beyond the tolerance" in out and "FAIL" in out
    for column in ("setup", "base", "new", "change", "verdict"):
        assert column in out
    assert main(["compare", base, slow, "--time-tolerance", "0.6"]) == 0


def test_cli_bad_input(tmp_path, capsys):
    base = write(tmp_path / "base.jsonl", [record()])
    assert main(["compare", base, str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    other = write(tmp_path / "other.jsonl", [record(label="something else")])
    assert main(["compare", base, other]) == 2
    assert "no setup of the new run matches" in capsys.readouterr().err
    empty = write(tmp_path / "empty.jsonl", [])
    assert main(["compare", base, empty]) == 2


def test_a_line_that_is_not_a_record_is_bad_input_with_its_file_and_line(tmp_path, capsys):
    base = write(tmp_path / "base.jsonl", [record()])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(record()) + "\n5\n")
    assert main(["compare", base, str(broken)]) == 2  # 1 is kept for "a regression was found"
    captured = capsys.readouterr()
    assert "broken.jsonl, line 2: a record is a JSON object" in captured.err and captured.out == ""
    broken.write_text(json.dumps(record()) + "\n" + json.dumps(record()) + "\n{oops\n")
    assert main(["compare", base, str(broken)]) == 2
    assert "broken.jsonl, line 3: not JSON" in capsys.readouterr().err


def test_compare_table_columns():
    rows = compare.compare_records([record(s=1.0)], [record(s=1.0)])
    table = compare.compare_table(rows)
    assert list(table.columns) == ["setup", "metric", "base", "new", "change", "verdict"]
