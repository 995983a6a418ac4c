"""The labkit command line: doctor and bench."""

import json

import labkit
from labkit.cli import main


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "device" in report and "tier1" in report["presets"]


def test_doctor_text(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "optimizations:" in out and "presets:" in out


def test_bench_appends_records(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = [
        "bench",
        "--model",
        "twin:tiny",
        "--preset",
        "baseline",
        "--apply",
        "dpm_solver",
        "fp16",
        "--steps",
        "2",
        "--size",
        "64",
        "--repeats",
        "1",
        "--no-flops",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    records = labkit.load_results(out)
    assert [r["label"] for r in records] == ["baseline", "dpm_solver + fp16"]
    assert records[1]["dtype"] == "float16" and records[1]["scheduler"] == "DPMSolverMultistepScheduler"
    assert "speed-up" in capsys.readouterr().out


def test_bench_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "absent"), "--no-flops"]) == 2
    assert "twin:sd15" in capsys.readouterr().err


def test_train_shapes_passes_its_flags_through(capsys):
    # the README's form, `labkit train-shapes --preset ...`: the flags reach the trainer's parser
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["train-shapes", "--preset", "cpu", "--help"])
    assert exit_info.value.code == 0
    assert "--prediction-type" in capsys.readouterr().out
    assert main(["train-shapes", "--stages", "nonsense"]) == 2
    assert "unknown stage" in capsys.readouterr().err
