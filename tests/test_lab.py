"""Unit tests of labkit.lab: profiles, chapter helpers and the chapter runner.

Most runner tests replace papermill by a fake executor (no kernel), so they take milliseconds;
one test runs real papermill on two trivial notebooks.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import nbformat
import pytest

from labkit import lab

# --------------------------------------------------------------------------------------------------
# A tiny project: notebooks/ with two chapters, book/ with config and one published result
# --------------------------------------------------------------------------------------------------

PARAMETERS = 'profile = "auto"\ndevice = None\nmodel = None\nresults = None\npublished = None'
BODY = """\
import json, pathlib
print(f"device: {device or 'cpu'}")
if results:
    pathlib.Path(results).parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps({"label": "x", "profile": profile, "published": published}) + "\\n")
"""


def _chapter(title: str, body: str = BODY) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    nbformat.write(_chapter("Zero"), root / "notebooks" / "00_zero.ipynb")
    nbformat.write(_chapter("One"), root / "notebooks" / "01_one.ipynb")
    book = root / "book"
    (book / "results").mkdir(parents=True)
    (book / "_config.yml").write_text('title: t\nexecute:\n  execute_notebooks: "off"\n')
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (book / "intro.md").write_text("# Intro\n")
    (book / "results" / "01_one.jsonl").write_text(json.dumps({"label": "published"}) + "\n")
    return root


class FakeExecutor:
    """Stands in for papermill: records calls, writes the output notebook and a results line."""

    def __init__(self, fail_on: str | None = None, interrupt_on: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail_on = fail_on
        self.interrupt_on = interrupt_on

    def __call__(self, source: Path, output: Path, parameters: dict, cwd: Path) -> None:
        self.calls.append((source.stem, dict(parameters)))
        nb = nbformat.read(source, as_version=4)
        injected = nbformat.v4.new_code_cell(f"profile = {parameters['profile']!r}")
        injected.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(2, injected)
        nb.metadata["papermill"] = {"input_path": str(source), "output_path": str(output)}
        results = (cwd / parameters["results"]).resolve()
        with open(results, "a") as f:
            f.write(json.dumps({"label": "partial"}) + "\n")
        nbformat.write(nb, output)
        if source.stem == self.interrupt_on:
            raise KeyboardInterrupt
        if source.stem == self.fail_on:
            raise RuntimeError("boom")


def _run(project: Path, monkeypatch, executor: FakeExecutor | None = None, **kwargs) -> lab.LabRun:
    monkeypatch.setattr(lab, "_execute", executor or FakeExecutor())
    kwargs.setdefault("profile", "ci")
    return lab.run_lab(root=project, build=False, quiet=True, **kwargs)


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


def test_ci_profile_is_small_and_on_the_cpu():
    p = lab.get_profile("ci")
    assert (p.name, p.device, p.twin, p.model) == ("ci", "cpu", "twin:tiny", "shapes")
    assert p.size <= 64 and p.steps <= 4 and p.repeats >= 2 and not p.compile


def test_gpu_profile_is_real_scale():
    p = lab.get_profile("gpu")
    assert (p.device, p.twin, p.size) == ("cuda", "twin:sd15", 512)
    assert p.steps == 50 and p.fast_steps == 20 and p.repeats >= 3


@pytest.mark.parametrize(
    ("memory", "expected"), [(None, "ci"), (80.0, "gpu"), (24.0, "gpu"), (16.0, "gpu-small")]
)
def test_auto_picks_by_hardware(monkeypatch, memory, expected):
    monkeypatch.setattr(lab, "_cuda_memory_gb", lambda device="cuda": memory)
    assert lab.get_profile("auto").name == expected


def test_auto_with_cpu_device_is_ci(monkeypatch):
    monkeypatch.setattr(lab, "_cuda_memory_gb", lambda device="cuda": 80.0)
    assert lab.get_profile("auto", device="cpu").name == "ci"


def test_device_override_and_unknown_profile():
    assert lab.get_profile("gpu", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="unknown profile"):
        lab.get_profile("tpu")


def test_profile_as_dict_is_json():
    d = lab.get_profile("gpu").as_dict()
    assert json.loads(json.dumps(d))["batch_sizes"] == [1, 4, 16]


# --------------------------------------------------------------------------------------------------
# Chapter helpers
# --------------------------------------------------------------------------------------------------


def test_start_chapter_names_the_device(capsys):
    p = lab.start_chapter("ci", model="twin:sd15")
    out = capsys.readouterr().out
    assert "profile ci" in out and "device: cpu" in out
    assert p.twin == "twin:sd15"


def test_judge():
    assert lab.judge(15, 10, 20) == "holds"
    assert lab.judge(5, 10, 20) == "below the claim"
    assert lab.judge(30, 10, 20) == "above the claim"
    assert lab.judge(0.95, 1.0) == "holds"  # within the 10% tolerance
    assert lab.judge(None, 1.0) == "not measured"
    assert lab.judge(float("nan"), 1.0) == "not measured"


def test_verdict_renders_as_a_box():
    v = lab.verdict(
        [{"claim": "fp16", "claimed": "2x", "measured": "1.1x", "verdict": "below the claim"}], device="cpu"
    )
    assert 'class="admonition' in v._repr_html_() and "below the claim" in v._repr_html_()
    assert "below the claim" in repr(v)
    assert list(v.table().columns) == ["claim", "claimed", "measured", "verdict"]


def test_published_records_and_beside(tmp_path):
    assert lab.load_published(None) == [] and lab.load_published(tmp_path / "missing.jsonl") == []
    path = tmp_path / "p.jsonl"
    path.write_text('{"label": "baseline", "s_per_image": 3.4}\n\n')
    published = lab.load_published(path)
    table = lab.beside_published(
        [{"label": "baseline", "s_per_image": 9.0}], published, ["label", "s_per_image"]
    )
    assert table["run"].tolist() == ["this run", "published"]
    assert table["s_per_image"].tolist() == [9.0, 3.4]


def test_list_chapters(project):
    assert [p.stem for p in lab.list_chapters(project)] == ["00_zero", "01_one"]
    assert [p.stem for p in lab.list_chapters(project, ["1"])] == ["01_one"]
    assert [p.stem for p in lab.list_chapters(project, ["01", "00_z"])] == ["00_zero", "01_one"]
    with pytest.raises(ValueError, match="no chapter matches"):
        lab.list_chapters(project, ["7"])


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


def test_learner_run_goes_into_its_own_folder(project, monkeypatch):
    fake = FakeExecutor()
    run = _run(project, monkeypatch, fake)
    host = socket.gethostname().split(".")[0]
    assert run.out.parent == project / "runs" and run.out.name.startswith("ci-") and host[:3] in run.out.name
    assert run.executed == ["00_zero", "01_one"] and run.ok
    assert (run.out / "chapters" / "00_zero.ipynb").is_file()
    assert (run.out / "results" / "01_one.jsonl").is_file()
    assert (run.out / "intro.md").is_file() and (run.out / "_config.yml").is_file()
    # the published chapters are untouched; their results are copied to show beside ours
    assert not (project / "book" / "chapters").exists()
    assert (run.out / "published" / "01_one.jsonl").is_file()
    params = dict(fake.calls)
    assert params["01_one"]["published"] == "../published/01_one.jsonl"
    assert params["00_zero"]["published"] is None  # nothing published for it
    assert params["00_zero"]["results"] == "../results/00_zero.jsonl"
    assert params["00_zero"]["profile"] == "ci"
    # absolute paths of the run are not left in the notebook
    meta = nbformat.read(run.out / "chapters" / "00_zero.ipynb", as_version=4).metadata["papermill"]
    assert meta == {"input_path": "notebooks/00_zero.ipynb", "output_path": "chapters/00_zero.ipynb"}
    assert "00_zero" in lab.read_manifest(run.out)["chapters"]


def test_unchanged_chapters_are_skipped_unless_forced(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    again = _run(project, monkeypatch, out=out)
    assert again.executed == [] and again.skipped == ["00_zero", "01_one"]

    forced = _run(project, monkeypatch, out=out, force=True)
    assert forced.executed == ["00_zero", "01_one"]
    # results are those of the latest execution only, not appended across runs
    assert len((out / "results" / "00_zero.jsonl").read_text().splitlines()) == 1

    nb = nbformat.read(project / "notebooks" / "01_one.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, project / "notebooks" / "01_one.ipynb")
    edited = _run(project, monkeypatch, out=out)
    assert edited.executed == ["01_one"] and edited.skipped == ["00_zero"]

    other_profile = _run(project, monkeypatch, out=out, profile="gpu")
    assert other_profile.executed == ["00_zero", "01_one"]


def test_a_missing_executed_chapter_is_run_again(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    (out / "chapters" / "00_zero.ipynb").unlink()
    assert _run(project, monkeypatch, out=out).executed == ["00_zero"]


def test_chapters_whose_source_is_gone_are_removed(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    (project / "notebooks" / "01_one.ipynb").unlink()
    assert _run(project, monkeypatch, out=out, chapters=["0"]).removed == []  # a selection prunes nothing
    run = _run(project, monkeypatch, out=out)
    assert run.removed == ["01_one"]
    assert (
        not (out / "chapters" / "01_one.ipynb").exists() and not (out / "results" / "01_one.jsonl").exists()
    )
    assert list(lab.read_manifest(out)["chapters"]) == ["00_zero"]


def test_interruption_keeps_finished_chapters(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    (out / "results").mkdir(parents=True)
    (out / "results" / "01_one.jsonl").write_text('{"label": "earlier run"}\n')
    run = _run(project, monkeypatch, FakeExecutor(interrupt_on="01_one"), out=out)
    assert run.interrupted and not run.ok
    assert run.executed == ["00_zero"]
    assert (out / "chapters" / "00_zero.ipynb").is_file()
    assert not (out / "chapters" / "01_one.ipynb").exists()  # the unfinished chapter is not kept
    assert (out / "results" / "01_one.jsonl").read_text() == '{"label": "earlier run"}\n'  # restored
    assert list(lab.read_manifest(out)["chapters"]) == ["00_zero"]
    assert not (out / ".lab-tmp").exists()

    resumed = _run(project, monkeypatch, out=out)
    assert resumed.skipped == ["00_zero"] and resumed.executed == ["01_one"]


def test_a_failed_chapter_keeps_its_previous_version(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    before = (out / "chapters" / "00_zero.ipynb").read_text()
    run = _run(project, monkeypatch, FakeExecutor(fail_on="00_zero"), out=out, force=True)
    assert run.failed == ["00_zero"] and run.executed == ["01_one"] and not run.ok
    assert (out / "chapters" / "00_zero.ipynb").read_text() == before
    assert (out / "_failed" / "00_zero.ipynb").is_file()
    assert "boom" in (out / "_failed" / "00_zero.txt").read_text()
    fixed = _run(project, monkeypatch, out=out, force=True)
    assert fixed.ok and not (out / "_failed" / "00_zero.ipynb").exists()


def test_publish_writes_into_book(project, monkeypatch):
    fake = FakeExecutor()
    run = _run(project, monkeypatch, fake, publish=True, chapters=["1"])
    assert run.out == project / "book"
    assert (project / "book" / "chapters" / "01_one.ipynb").is_file()
    assert (project / "book" / "results" / "01_one.jsonl").read_text().count("\n") == 1  # replaced
    assert dict(fake.calls)["01_one"]["published"] is None
    assert not (project / "runs").exists()


def test_book_is_written_only_by_publish(project, monkeypatch):
    with pytest.raises(ValueError, match="publish=True"):
        _run(project, monkeypatch, out=project / "book")
    with pytest.raises(ValueError, match="do not pass out="):
        _run(project, monkeypatch, out=project / "elsewhere", publish=True)


def test_lab_command_arguments(project, monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    lab.add_lab_arguments(parser)
    args = parser.parse_args(
        ["--profile", "ci", "--chapters", "0", "--force", "--no-build", "--out", str(tmp_path / "o")]
    )
    assert (args.profile, args.chapters, args.force, args.publish, args.no_build) == (
        "ci",
        ["0"],
        True,
        False,
        True,
    )
    monkeypatch.chdir(project)
    monkeypatch.setattr(lab, "_execute", FakeExecutor())
    assert lab.lab_command(args) == 0
    assert (tmp_path / "o" / "chapters" / "00_zero.ipynb").is_file()


def test_real_papermill_run(project, tmp_path):
    """Two trivial chapters through papermill and a real kernel."""
    out = tmp_path / "real"
    run = lab.run_lab(profile="ci", root=project, out=out, build=False, quiet=True)
    assert run.executed == ["00_zero", "01_one"] and run.ok
    nb = nbformat.read(out / "chapters" / "01_one.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'profile = "ci"' in injected[0].source
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "device: cpu" in printed
    record = json.loads((out / "results" / "01_one.jsonl").read_text())
    assert record == {"label": "x", "profile": "ci", "published": "../published/01_one.jsonl"}
