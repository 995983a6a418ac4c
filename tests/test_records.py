"""The records store: appends are safe beside other writers, never rewrite the file, repair a missing final
newline, keep the file's mode and symlinks, and refuse an unwritable place before any work."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.records import (
    RecordsError,
    Store,
    append_records,
    check_writable,
    fingerprint,
    read_records,
    slug,
)

RECORDS = Path(__file__).resolve().parent.parent / "labkit" / "records.py"

# a writer process that loads records.py alone (not the package: its imports take seconds)
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("records", sys.argv[1])
records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(records)
for i in range(int(sys.argv[3])):
    records.append_records(sys.argv[2], {"writer": sys.argv[4], "i": i, "pad": "x" * 2000})
"""


def test_two_processes_appending_300_records_each_keep_all_600(tmp_path):
    path = tmp_path / "shared.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(RECORDS), str(path), "300", name])
        for name in "ab"
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    records = read_records(path)
    assert len(records) == 600
    for name in "ab":
        assert sorted(r["i"] for r in records if r["writer"] == name) == list(range(300))


def test_a_file_without_a_final_newline_is_repaired_not_glued(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"label": "old", "status": "ok"}')
    append_records(path, {"label": "new", "status": "ok"})
    assert [r["label"] for r in read_records(path)] == ["old", "new"]


def test_appending_keeps_the_mode_and_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real.jsonl"
    append_records(target, {"n": 1})
    os.chmod(target, 0o644)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    append_records(link, [{"n": 2}, {"n": 3}])
    assert link.is_symlink()
    assert [r["n"] for r in read_records(target)] == [1, 2, 3]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]  # no temporary file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_an_unwritable_place_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(RecordsError, match="not writable"):
            check_writable(folder / "results.jsonl")
    finally:
        folder.chmod(0o755)
    readonly = tmp_path / "ro.jsonl"
    readonly.write_text("")
    readonly.chmod(0o444)
    with pytest.raises(RecordsError, match="not writable"):
        check_writable(readonly)


def test_unwritable_paths_are_refused_even_for_root(tmp_path):
    with pytest.raises(RecordsError, match="is a folder"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RecordsError, match="cannot create the folder"):
        check_writable(blocker / "sub" / "results.jsonl")


def test_bad_lines_name_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n\n5\n')
    with pytest.raises(RecordsError, match=r"bad.jsonl, line 3: a record is a JSON object, not 5"):
        read_records(path)
    path.write_text('{"ok": 1}\n{"broken": \n')
    with pytest.raises(RecordsError, match=r"bad.jsonl, line 2: not JSON"):
        read_records(path)
    with pytest.raises(RecordsError, match="no records file"):
        read_records(tmp_path / "absent.jsonl")


def test_a_store_keeps_one_file_per_device_and_kind(tmp_path):
    store = Store(tmp_path / "records")
    store.check_writable()
    store.append({"device": "NVIDIA H200", "kind": "generate", "key": "k1", "fingerprint": "f", "v": 1})
    store.append({"device": "NVIDIA H200", "kind": "quality", "key": "k2", "fingerprint": "f"})
    store.append({"device": "Intel(R) Xeon(R), 2 cores", "kind": "generate", "key": "k1", "fingerprint": "f"})
    store.append({"device": "NVIDIA H200", "kind": "generate", "key": "k1", "fingerprint": "f", "v": 2})
    names = [p.name for p in store.files()]
    assert names == [
        "intel-r-xeon-r-2-cores.generate.jsonl",
        "nvidia-h200.generate.jsonl",
        "nvidia-h200.quality.jsonl",
    ]
    assert store.lookup("k1", "f", device="NVIDIA H200")["v"] == 2  # the last record of a setup wins
    assert store.lookup("k1", "other code", device="NVIDIA H200") is None
    assert len(store.records(kind="generate")) == 3 and len(store.records(device="NVIDIA H200")) == 3


def test_slug_and_fingerprint(tmp_path):
    assert slug("NVIDIA H200") == "nvidia-h200" and slug("") == "unknown"
    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    first = fingerprint([a], "0.2.0")
    assert first == fingerprint([a], "0.2.0") != fingerprint([a], "0.2.1")
    a.write_text("x = 2\n")
    assert fingerprint([a], "0.2.0") != first


def test_records_are_plain_json_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    append_records(path, [{"a": 1, "nan": float("nan")}, {"b": [1, 2]}])
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == {"b": [1, 2]}
    with pytest.raises(TypeError, match="a record is a dict"):
        append_records(path, [5])
