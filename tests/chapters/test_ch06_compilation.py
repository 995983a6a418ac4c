"""Chapter 6, compilation: its scenarios (a profile without compiling makes ``unavailable`` records), the
compile table, CUDA-graph lines, the pieces and recompilation counts (kind ``recompilation``), the
verdict rows. No timing thresholds: timings belong in the chapter."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.book import PROFILES
from labkit.chapters import ch06_compilation as ch
from labkit.scenarios import check, measure


@pytest.mark.parametrize("name", ["ci", "gpu"])
def test_the_scenarios_are_valid_and_distinct(name):
    P = PROFILES[name]
    eager, compiled, counts = ch.eager_scenarios(P), ch.compiled_scenarios(P), ch.recompilation_scenarios(P)
    for scenario in eager + compiled + counts:
        check(scenario)
    everything = eager + compiled + counts
    assert len({s.key for s in everything}) == len(everything)
    assert [(s.label, s.batch, s.breakdown) for s in eager] == [
        (ch.REFERENCE, 1, True),
        (f"{ch.REFERENCE}, batch {P.batch_sizes[1]}", P.batch_sizes[1], True),
    ]
    assert [s.label for s in compiled] == list(ch.COMPILED)
    assert all(s.size == P.size and s.batch == 1 and s.steps == P.fast_steps for s in compiled)
    shapes = [(P.size, 1), (P.large_size, 1), (P.size, P.batch_sizes[1])]
    assert [(s.size, s.batch) for s in counts[:3]] == shapes
    assert all(s.kind == "recompilation" and s.options["backend"] == "eager" for s in counts)


def test_a_profile_without_compiling_switches_the_compiled_setups_off():
    ci, gpu = ch.compiled_scenarios(PROFILES["ci"]), ch.compiled_scenarios(PROFILES["gpu"])
    assert ch.compile_off(PROFILES["gpu"]) is None and all(s.kind == "generate" for s in gpu)
    why = ch.compile_off(PROFILES["ci"])
    assert why.startswith("profile ci has compile=False")
    off = [s for s in ci if s.kind == ch.SWITCHED_OFF]
    assert [s.label for s in off] == [label for label, spec in ch.COMPILED.items() if ch.compiles(spec)]
    assert all(s.options == {"reason": why} for s in off)
    assert [s.kind for s in ci if s.label == "fused QKV + channels_last, eager"] == ["generate"]
    # the same setup as the compiled one, but for its kind and the reason
    generate = off[0].but(kind="generate", options={})
    assert (
        generate.setup()
        == ch._generate(PROFILES["ci"], {off[0].label: ch.tier1(PROFILES["ci"]) + ch.COMPILED[off[0].label]})[
            0
        ].setup()
    )


def test_switched_off_setups_are_unavailable_records_without_running(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("nothing is loaded for a switched-off setup")

    monkeypatch.setattr("labkit.scenarios.load_pipeline", never)
    P = PROFILES["ci"]
    off = [s for s in ch.compiled_scenarios(P) if s.kind == ch.SWITCHED_OFF]
    records = measure(off, tmp_path, device="cpu", say=None)
    assert [r["label"] for r in records] == [s.label for s in off]
    assert all(r["status"] == "unavailable" and r["reason"] == ch.compile_off(P) for r in records)
    assert all(r["size"] == P.size and r["device"] for r in records)
    again = measure(off, tmp_path, device="cpu", say=None)
    assert [r["key"] for r in again] == [r["key"] for r in records]  # from the store
    assert len(list(tmp_path.glob("*.jsonl"))) == 1
    assert sum(1 for _ in next(tmp_path.glob("*.jsonl")).open()) == len(off)


# --------------------------------------------------------------------------------------------------
# compile cost, CUDA graphs and the verdict
# --------------------------------------------------------------------------------------------------


def fake(label, status="ok", s=1.0, **more):
    r = {"label": label, "status": status, "size": 512, "batch": 1, "warmup": 1, "device": "test GPU"}
    if status == "ok":
        r |= {"s_per_image": s, "warmup_s": 2 * s}
    elif status == "unavailable":
        r["reason"] = "needs a CUDA GPU"
    return r | more


def test_compile_table():
    eager = fake(ch.REFERENCE, s=1.0, warmup_s=1.5)  # 0.5 s of first-call overhead
    compiled = fake("compiled", s=0.5, warmup_s=60.5)  # 60 s of compile
    table = ch.compile_table([eager, compiled, fake("x", "unavailable")])
    assert list(table["configuration"]) == [ch.REFERENCE, "compiled", "x"]
    assert table["compile s"][1] == pytest.approx(60.0)
    assert table["break-even images"][1] == pytest.approx(119.0)  # 59.5 s / 0.5 s
    assert table[["break-even images"]].iloc[0].isna().all() and table[["compile s"]].iloc[2].isna().all()
    assert table["speed-up"][1] == pytest.approx(2.0) and table["note"][2] == "needs a CUDA GPU"


def test_cuda_graph_lines():
    unavailable = [
        fake(ch.REFERENCE),
        fake("compile default", "unavailable"),
        fake("compile reduce-overhead", "unavailable"),
    ]
    assert ch.cuda_graph_lines(unavailable) == [
        "not measured here: compile default is unavailable, reduce-overhead unavailable"
    ]
    ran = [
        fake(ch.REFERENCE, busy_share=0.4),
        fake("compile default", s=0.8),
        fake("compile reduce-overhead", s=0.4),
    ]
    assert ch.cuda_graph_lines(ran) == [
        "CUDA graphs, at batch 1: 2.00x faster than the same compiled UNet without them",
        "the eager GPU was idle 60% of the time: that is what they remove",
    ]
    assert len(ch.cuda_graph_lines([fake(ch.REFERENCE, busy_share=None), *ran[1:]])) == 1


def test_verdict_rows_when_compiling_is_switched_off():
    why = ch.compile_off(PROFILES["ci"])
    records = [fake(ch.REFERENCE)] + [
        fake(label, "unavailable", reason=why) for label, spec in ch.COMPILED.items() if ch.compiles(spec)
    ]
    rows = ch.verdict_rows(records)
    assert [r["verdict"] for r in rows] == ["not measured"] * 3
    assert all(r["measured"] == why for r in rows)


def test_verdict_rows_when_compiled():
    records = [
        fake(ch.REFERENCE, s=1.0, warmup_s=1.0),
        fake("compile default", s=0.9, warmup_s=40.9),
        fake("compile reduce-overhead", s=0.8, warmup_s=60.8),
    ]
    speed, default, warmup = ch.verdict_rows(records)
    assert speed["measured"] == "+25% (1 -> 0.8 s/image)" and speed["verdict"] == "holds"
    assert default["verdict"] == "below the claim"
    assert warmup == {
        "claim": "the speed-up comes after a warm-up",
        "claimed": "a one-off warm-up",
        "measured": "warm-up 60 s; paid back after 300 images",
        "verdict": "holds",
    }
    slower = [records[0], records[1], fake("compile reduce-overhead", s=1.2, warmup_s=61.2)]
    assert ch.verdict_rows(slower)[2]["verdict"] == "does not hold"
    with pytest.raises(ValueError, match="no 'tier 1, eager' record"):
        ch.verdict_rows(records[1:])


# --------------------------------------------------------------------------------------------------
# compilation: pieces and recompilation counts
# --------------------------------------------------------------------------------------------------


def test_compile_pieces_run(tiny):
    unet, make = ch.compile_piece(tiny.unet, "unet")
    args, kwargs = make(64, 1)
    with torch.inference_mode():
        assert unet(*args, **kwargs).sample.shape == (2, 4, 8, 8)  # CFG doubles the batch
    block, make = ch.compile_piece(tiny.unet, "block")
    args, kwargs = make(128, 2)
    with torch.inference_mode():
        assert block(*args, **kwargs).shape == args[0].shape == (4, 256, 32)
    with pytest.raises(ValueError):
        ch.compile_piece(tiny.unet, "vae")


def test_recompilations_count_new_graphs(tiny):
    block, make = ch.compile_piece(tiny.unet, "block")
    records = ch.recompilations(block, make, [(64, 1), (64, 1), (128, 1)], {"dynamic": False})
    assert [r["new_graphs"] for r in records] == [1, 0, 1]
    assert [r["graphs"] for r in records] == [1, 1, 2]
    assert all(r["module"] == "BasicTransformerBlock" and r["backend"] == "eager" for r in records)
    assert all(r["first_call_s"] > 0 and r["second_call_s"] > 0 for r in records)
    json.dumps(records)


@pytest.mark.slow
def test_regional_recompilation_compiles_only_the_blocks(tiny):
    unet, make = ch.compile_piece(tiny.unet, "unet")
    (record,) = ch.recompilations(unet, make, [(64, 1)], {"regional": True})
    assert record["new_graphs"] >= 1 and record["module"] == "UNet2DConditionModel"
    assert not hasattr(tiny.unet, "_orig_mod"), "the module itself is left uncompiled"


@pytest.mark.slow
def test_recompilation_records_keep_their_fields_and_share_one_run(tmp_path, monkeypatch):
    loads = []
    real = ch.load_pipeline

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ch, "load_pipeline", counted)
    ch._RUNS.clear()
    P = PROFILES["ci"]
    work = [s for s in ch.recompilation_scenarios(P) if s.label == "default (dynamic=None)"]
    records = measure(work, tmp_path, device="cpu", say=None)
    assert len(loads) == 1, "the shapes of one setting are one run"
    fields = ["label", "kind", "backend", "module", "size", "batch"]
    assert [[r[f] for f in fields] for r in records] == [
        ["default (dynamic=None)", "recompilation", "eager", "BasicTransformerBlock", s.size, s.batch]
        for s in work
    ]
    assert records[0]["new_graphs"] >= 1
    assert [r["graphs"] for r in records] == [
        sum(r["new_graphs"] for r in records[: i + 1]) for i in range(3)
    ]
    assert all(r["first_call_s"] > 0 and r["second_call_s"] > 0 for r in records)
    with pytest.raises(ValueError, match="are not shape 0"):
        measure([work[0].but(size=P.large_size)], tmp_path, device="cpu", say=None)
