"""The labkit command line: every argument checked before anything loads (exit 2 with the valid range),
unavailable never recorded as ok, records appended as they are measured."""

import json

import pytest
import torch

from labkit.cli import build_parser, main
from labkit.records import read_records

FAST = [
    "--model",
    "twin:tiny",
    "--steps",
    "2",
    "--size",
    "64",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--no-flops",
]


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"doctor", "bench", "compare", "evaluate", "lab", "train"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
    assert "usage: labkit bench" in capsys.readouterr().out


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "device" in report and "tier1" in report["presets on twin:sd15"]
    if not torch.cuda.is_available():
        # trained weights: the tuned VAE ships with shapes, not with a twin
        assert report["optimizations on shapes"]["swap_vae"] == "ok"
        assert "no tuned VAE" in report["optimizations on twin:sd15"]["swap_vae"]
        assert report["presets on twin:sd15"]["tier1"] != "ok"
        assert report["sdpa_backends"]["flash"] == "needs a CUDA GPU"


def test_doctor_text(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "optimizations on shapes:" in out and "presets on twin:sd15:" in out and "None" not in out


def test_bench_appends_records(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert (
        main(["bench", *FAST, "--preset", "baseline", "--apply", "dpm_solver", "fp16", "--out", str(out)])
        == 0
    )
    records = read_records(out)
    assert [r["label"] for r in records] == ["baseline", "dpm_solver + fp16"]
    assert records[1]["dtype"] == "float16" and records[1]["scheduler"] == "DPMSolverMultistepScheduler"
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_an_optimization_that_cannot_run_is_recorded_unavailable(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["bench", *FAST, "--apply", "xformers", "--out", str(out)]) == 0
    (record,) = read_records(out)
    assert record["status"] == "unavailable" and "CUDA" in record["reason"]
    assert "unavailable" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "-3"], "--steps: -3 is out of range: give a whole number >= 1"),
        (["--steps", "0"], "--steps: 0 is out of range"),
        (["--size", "0"], "--size: 0 is out of range"),
        (["--size", "65"], "not a multiple of 8"),
        (["--batch", "0"], "--batch: 0 is out of range"),
        (["--repeats", "0"], "--repeats: 0 is out of range"),
        (["--guidance", "nan"], "--guidance: nan is out of range"),
        (["--memory-cap", "0"], "--memory-cap: 0 is out of range"),
    ],
)
def test_bad_numbers_exit_2_with_the_valid_range(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "twin:tiny", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "baseline", "--preset", "fastest"], "unknown preset 'fastest'"),
        (["--apply", "dpm_solve"], "(did you mean 'dpm_solver'?)"),
        (["--apply", "dpm_solver:steps=abc"], "expected int"),
        (["--apply", "torch_compile:mode="], "has no value"),
        (["--apply", "fp16:foo=1"], "fp16 has no option 'foo'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "twin:sd16"], "unknown twin 'twin:sd16'"),
        (["--dtype", "fp64"], "unknown dtype 'fp64'"),
    ],
)
def test_bad_names_exit_2_before_any_model_loads(args, message, capsys, monkeypatch, tmp_path):
    from labkit import scenarios

    monkeypatch.setattr(scenarios, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "results.jsonl"
    assert main(["bench", "--model", "twin:tiny", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_a_memory_cap_on_a_cpu_exits_2(capsys):
    assert main(["bench", *FAST, "--memory-cap", "4"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from labkit import scenarios

    monkeypatch.setattr(scenarios, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["bench", *FAST, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_bench_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "absent"), "--no-flops"]) == 0
    assert "absent" in capsys.readouterr().out  # a folder that fails to load is an error record


def test_evaluate_scores_a_sampler_and_refuses_unknown_ones(capsys, tmp_path):
    assert main(["evaluate", "--sampler", "DPM++ 2M:2", "--n", "4", "--store", str(tmp_path)]) == 0
    assert "prompt accuracy" in capsys.readouterr().out
    assert read_records(next(tmp_path.glob("*.quality.jsonl")))[0]["n"] == 4
    assert main(["evaluate", "--sampler", "DPM:20"]) == 2
    assert "DPM++ 2M" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_a_preset_runs_as_far_as_it_can_and_says_what_it_left_out(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["bench", *FAST, "--preset", "tier1", "--out", str(out)]) == 0
    (record,) = read_records(out)
    assert record["label"] == "tier1 (without swap_vae)" and record["status"] == "ok"
    assert record["preset"] == "tier1" and record["unavailable"][0].startswith("swap_vae: ")
    assert record["guidance"] == 7.5 and record["dtype"] == "float16"  # the preset's own settings
    assert "tier1 (without swap_vae)" in capsys.readouterr().out
