"""labkit.audit: extracting the guide's snippets, the substitutions, and the classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import audit

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "book" / "guide.md"


def test_the_book_holds_the_guide_verbatim():
    shared = Path("/work/shared/GUIDE.md")
    if not shared.is_file():
        pytest.skip("the shared guide is not on this machine")
    assert GUIDE.read_text() == shared.read_text()


def test_extract_the_guide():
    snippets = audit.extract_snippets(GUIDE.read_text())
    assert len(snippets) == 15
    assert [s.index for s in snippets] == list(range(1, 16))
    assert snippets[0].section == "Sampling: DDIM / Accelerated Samplers"
    assert "DDIMScheduler.from_pretrained(model_id" in snippets[0].code
    assert snippets[-1].section == "Monitoring and Validation"
    assert "FrechetInceptionDistance(feature=2048)" in snippets[-1].code
    lines = GUIDE.read_text().splitlines()
    assert all(lines[s.line - 1].strip() == "```python" for s in snippets)


def test_extract_skips_other_languages_and_rejects_an_unclosed_fence():
    text = "# A\n```bash\nls\n```\n## B\n```python\nx = 1\n```\n```\nplain\n```\n"
    snippets = audit.extract_snippets(text)
    assert [(s.section, s.code) for s in snippets] == [("B", "x = 1\n")]
    with pytest.raises(ValueError, match="unclosed"):
        audit.extract_snippets("```python\nx = 1\n")


def snippet(code: str) -> audit.Snippet:
    return audit.Snippet(1, "s", code, 1)


def test_prepare_substitutes_hub_ids_and_defines_only_missing_names():
    preamble, code, changes = audit.prepare(
        snippet('vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")\n')
    )
    assert "stabilityai" not in code and "variants" in code
    assert preamble == "from diffusers import AutoencoderKL"
    assert any("hub id" in c for c in changes)
    preamble, code, _ = audit.prepare(snippet('pipe = StableDiffusionPipeline.from_pretrained("x")\n'))
    assert "pipe =" not in preamble and '"x"' in code  # not a known hub id: left alone
    preamble, _, _ = audit.prepare(snippet("m = load_quantized_model('q')\nimage = pipe(prompt)\n"))
    assert "load_quantized_model" not in preamble  # no library has it: never defined
    assert "pipe = " in preamble and "prompt = " in preamble
    preamble, _, _ = audit.prepare(snippet("import torch\nx = torch.ones(1)\n"))
    assert preamble == ""


def test_classify_takes_the_worst():
    assert audit.classify([]) == "works"
    assert audit.classify([{"kind": "internal"}]) == "works"
    assert audit.classify([{"kind": "deprecation"}]) == "works, deprecation warning"
    assert audit.classify([{"kind": "deprecation"}, {"kind": "gpu"}]) == "needs a GPU"
    assert audit.classify([{"kind": "gpu"}, {"kind": "error"}]) == "fails"


def test_modern_equivalents_are_keyed_by_the_error():
    m = audit.modern_equivalent
    assert "squaredcos_cap_v2" in m("NotImplementedError: cosine is not implemented for <class 'DDIM'>")
    assert "pipe.vae.enable_tiling()" in m(
        "AttributeError: 'StableDiffusionPipeline' object has no attribute 'enable_vae_tiling'"
    )
    assert "quantize_" in m("NameError: name 'load_quantized_model' is not defined")
    assert "SDPA" in m("ModuleNotFoundError: ... how to install xformers")
    assert "dtype=torch.float16" in m("FutureWarning: `torch_dtype` is deprecated and will be removed")
    assert m("KeyError: 'something new'") == ""


def test_notes_and_deprecation_relevance():
    notes = audit.snippet_notes("num_steps = 10-20\nprecision = 16\n")
    assert any("-10" in n for n in notes) and audit.CONFIG_ONLY_NOTE in notes
    assert audit.snippet_notes("pipe.enable_attention_slicing()\n") == []
    about = audit.about_the_snippet
    assert about("`torch_dtype` is deprecated. Please use `dtype`.", "p(torch_dtype=x)")
    assert not about(
        "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.",
        "pipe.unet = torch.compile(pipe.unet)",
    )


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


def test_audit_runs_each_snippet_in_its_own_process(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text(TOY_GUIDE)
    rows = audit.audit(guide, timeout=8, max_steps=1, max_size=64, compile=False, device="cpu")
    outcomes = {r["section"]: r["outcome"] for r in rows}
    assert outcomes == {
        "Works": "works",
        "Deprecated": "works, deprecation warning",
        "Broken": "fails",
        "Hangs": "fails",
    }
    works, deprecated, broken, hangs = rows
    assert works["stdout"].strip() == "two 2"
    assert "old_api" in deprecated["problem"]
    assert broken["problem"].startswith("line 1: KeyError")
    kinds = [p["kind"] for p in broken["problems"]]
    assert kinds == ["error", "skipped"]  # `total` needs `value`, which the failed line defines
    assert "still runs" in broken["stdout"]  # later statements still ran
    assert "TimeoutError" in hangs["problem"]
    table = audit.audit_table(rows)
    assert list(table.columns) == ["#", "section", "outcome", "what happened", "modern equivalent", "notes"]
    assert audit.outcome_counts(rows)["fails"] == 2


def test_audit_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no guide"):
        audit.audit(tmp_path / "none.md")
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no ```python"):
        audit.audit(empty)
