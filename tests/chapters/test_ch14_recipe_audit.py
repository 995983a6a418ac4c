"""Chapter 14 (recipe audit): extracting the guide's snippets, the substitutions, the classification, and
the worker that runs each snippet in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import labkit
from labkit import book
from labkit.chapters import ch14_recipe_audit as ch

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "book" / "guide.md"
CI = book.get_profile("ci")


def _worker_module():
    """The worker, loaded by path as the audit loads it (without the labkit package)."""
    spec = importlib.util.spec_from_file_location("labkit_audit_worker_under_test", ch.WORKER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_worker_imports_nothing_from_labkit():
    source = ch.WORKER.read_text()
    assert "import labkit" not in source and "from labkit" not in source


def test_extract_the_guide():
    snippets = ch.extract_snippets(GUIDE.read_text())
    assert len(snippets) == 15
    assert [s.index for s in snippets] == list(range(1, 16))
    assert snippets[0].section == "Sampling: DDIM / Accelerated Samplers"
    assert "DDIMScheduler.from_pretrained(model_id" in snippets[0].code
    assert snippets[-1].section == "Monitoring and Validation"
    assert "FrechetInceptionDistance(feature=2048)" in snippets[-1].code
    lines = GUIDE.read_text().splitlines()
    assert all(lines[s.line - 1].strip() == "```python" for s in snippets)
    assert ch.default_guide().resolve() == GUIDE.resolve()


def test_extract_skips_other_languages_and_rejects_an_unclosed_fence():
    text = "# A\n```bash\nls\n```\n## B\n```python\nx = 1\n```\n```\nplain\n```\n"
    snippets = ch.extract_snippets(text)
    assert [(s.section, s.code) for s in snippets] == [("B", "x = 1\n")]
    with pytest.raises(ValueError, match="unclosed"):
        ch.extract_snippets("```python\nx = 1\n")


def snippet(code: str) -> ch.Snippet:
    return ch.Snippet(1, "s", code, 1)


def test_prepare_substitutes_hub_ids_and_defines_only_missing_names():
    preamble, code, changes = ch.prepare(
        snippet('vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")\n')
    )
    assert "stabilityai" not in code and "variants" in code
    assert preamble == "from diffusers import AutoencoderKL"
    assert any("hub id" in c for c in changes)
    preamble, code, _ = ch.prepare(snippet('pipe = StableDiffusionPipeline.from_pretrained("x")\n'))
    assert "pipe =" not in preamble and '"x"' in code  # not a known hub id: left alone
    preamble, _, _ = ch.prepare(snippet("m = load_quantized_model('q')\nimage = pipe(prompt)\n"))
    assert "load_quantized_model" not in preamble  # no library has it: never defined
    assert "pipe = " in preamble and "prompt = " in preamble
    preamble, _, _ = ch.prepare(snippet("import torch\nx = torch.ones(1)\n"))
    assert preamble == ""


def test_classify_takes_the_worst():
    assert ch.classify([]) == "works"
    assert ch.classify([{"kind": "internal"}]) == "works"
    assert ch.classify([{"kind": "deprecation"}]) == "works, deprecation warning"
    assert ch.classify([{"kind": "deprecation"}, {"kind": "gpu"}]) == "needs a GPU"
    assert ch.classify([{"kind": "gpu"}, {"kind": "error"}]) == "fails"


def test_modern_equivalents_are_keyed_by_the_error():
    m = ch.modern_equivalent
    assert "squaredcos_cap_v2" in m("NotImplementedError: cosine is not implemented for <class 'DDIM'>")
    assert "pipe.vae.enable_tiling()" in m(
        "AttributeError: 'StableDiffusionPipeline' object has no attribute 'enable_vae_tiling'"
    )
    assert "quantize_" in m("NameError: name 'load_quantized_model' is not defined")
    assert "SDPA" in m("ModuleNotFoundError: ... how to install xformers")
    assert "dtype=torch.float16" in m("FutureWarning: `torch_dtype` is deprecated and will be removed")
    assert m("KeyError: 'something new'") == ""


def test_notes_and_deprecation_relevance():
    notes = ch.snippet_notes("num_steps = 10-20\nprecision = 16\n")
    assert any("-10" in n for n in notes) and ch.CONFIG_ONLY_NOTE in notes
    assert ch.snippet_notes("pipe.enable_attention_slicing()\n") == []
    about = _worker_module().about_the_snippet
    assert about("`torch_dtype` is deprecated. Please use `dtype`.", "p(torch_dtype=x)")
    assert not about(
        "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.",
        "pipe.unet = torch.compile(pipe.unet)",
    )


def test_audit_scenarios_one_per_snippet_with_the_profiles_settings(tmp_path):
    scenarios = ch.audit_scenarios(CI)
    assert len(scenarios) == 15 and {s.kind for s in scenarios} == {"audit"}
    first = scenarios[0].options
    assert (first["max_steps"], first["max_size"], first["compile"]) == (CI.fast_steps, CI.size, CI.compile)
    assert first["versions"]["torch"] and first["versions"] == ch.library_versions()
    assert first["worker"] == ch.worker_digest()
    assert ch.audit_scenarios(CI, max_steps=None)[0].options["max_steps"] is None
    with pytest.raises(ValueError, match="unknown audit settings"):
        ch.audit_scenarios(CI, steps=3)
    with pytest.raises(FileNotFoundError, match="no guide"):
        ch.audit_scenarios(CI, tmp_path / "none.md")
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no ```python"):
        ch.audit_scenarios(CI, empty)


def test_verdict_and_tables():
    rows = [
        {"snippet": 1, "section": "A", "outcome": "works", "problem": "", "modern": "", "notes": []},
        {
            "snippet": 2,
            "section": "B",
            "outcome": "fails",
            "problem": "x" * 300,
            "modern": "y",
            "notes": ["n"],
        },
    ]
    assert [r["verdict"] for r in ch.verdict_rows(rows)] == ["holds", "does not hold"]
    table = ch.audit_table(rows, width=50)
    assert list(table.columns) == ["#", "section", "outcome", "what happened", "modern equivalent", "notes"]
    assert len(table.loc[1, "what happened"]) == 50
    assert ch.outcome_counts(rows) == {
        "works": 1,
        "works, deprecation warning": 0,
        "needs a GPU": 0,
        "fails": 1,
    }
    assert set(ch.setup_table()["kind"]) == {"substitution", "defined if used"}


TOY_GUIDE = """# Toy guide

## Works
```python
x = 1 + 1
print("two", x)
```

## Deprecated
```python
import warnings
def old_api():
    warnings.warn("`old_api` is deprecated, use `new_api`", FutureWarning)
old_api()
```

## Broken
```python
value = {}["missing"]
total = value + 1
print("still runs")
```

## Hangs
```python
while True:
    pass
```
"""


@pytest.mark.slow
def test_audit_runs_each_snippet_in_its_own_process(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text(TOY_GUIDE)
    scenarios = ch.audit_scenarios(CI, guide, timeout=8, max_steps=1, max_size=64, compile=False)
    rows = labkit.measure(scenarios, device="cpu", progress=False, say=None)
    outcomes = {r["section"]: r["outcome"] for r in rows}
    assert outcomes == {
        "Works": "works",
        "Deprecated": "works, deprecation warning",
        "Broken": "fails",
        "Hangs": "fails",
    }
    works, deprecated, broken, hangs = rows
    assert works["kind"] == "audit" and works["status"] == "ok" and works["process"] == "forked"
    assert works["stdout"].strip() == "two 2"
    assert "old_api" in deprecated["problem"]
    assert broken["problem"].startswith("line 1: KeyError")
    kinds = [p["kind"] for p in broken["problems"]]
    assert kinds == ["error", "skipped"]  # `total` needs `value`, which the failed line defines
    assert "still runs" in broken["stdout"]  # later statements still ran
    assert "TimeoutError" in hangs["problem"]
    assert ch.outcome_counts(rows)["fails"] == 2


@pytest.mark.slow
def test_the_worker_spawns_fresh_processes_once_a_fork_cannot_use_cuda(tmp_path):
    """A forked child that says CUDA could not be initialised in it sends the worker to spawned processes
    (each pays the imports: tens of seconds here)."""
    import subprocess

    jobs = [
        {"index": 1, "preamble": "", "code": "raise RuntimeError('Cannot re-initialize CUDA in forked subprocess')\n",
         "timeout": 60},
        {"index": 2, "preamble": "", "code": "print('fine')\n", "timeout": 60},
    ]  # fmt: skip
    loader = (
        "import importlib.util as u; s = u.spec_from_file_location('labkit_audit_worker', "
        f"{str(ch.WORKER)!r}); m = u.module_from_spec(s); "
        "import sys; sys.modules[s.name] = m; s.loader.exec_module(m); m.serve()"
    )
    done = subprocess.run(
        [sys.executable, "-c", loader], input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["process"] == "spawned" and "re-initialize CUDA" in first["problems"][0]["error"]
    assert second["process"] == "spawned" and second["stdout"] == "fine\n"
