"""labkit.runner: the chapter runner, its book folders, its records store and its failures.

Most tests replace papermill by a fake executor (no kernel), so they take milliseconds; one test runs
real papermill on two trivial notebooks.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import nbformat
import pytest

from labkit import runner
from labkit.records import Store, read_records

# --------------------------------------------------------------------------------------------------
# A tiny project: notebooks/ with two chapters, book/ with config and one published result
# --------------------------------------------------------------------------------------------------

PARAMETERS = 'profile = "auto"\ndevice = None\nmodel = None\nstore = None\npublished = None'
BODY = """\
import json, pathlib
print(f"device: {device or 'cpu'}")
if store:
    pathlib.Path(store).mkdir(parents=True, exist_ok=True)
    with open(pathlib.Path(store) / "cpu.generate.jsonl", "a") as f:
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
    (book / "records").mkdir(parents=True)
    (book / "_config.yml").write_text('title: t\nexecute:\n  execute_notebooks: "off"\n')
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (book / "intro.md").write_text("# Intro\n")
    (book / "records" / "nvidia-h200.generate.jsonl").write_text(json.dumps({"label": "published"}) + "\n")
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
        store = (cwd / parameters["store"]).resolve()
        with open(store / "cpu.generate.jsonl", "a") as f:
            f.write(json.dumps({"label": source.stem}) + "\n")
        nbformat.write(nb, output)
        if source.stem == self.interrupt_on:
            raise KeyboardInterrupt
        if source.stem == self.fail_on:
            raise RuntimeError("boom")


def _run(project: Path, monkeypatch, executor: FakeExecutor | None = None, **kwargs) -> runner.LabRun:
    monkeypatch.setattr(runner, "_execute", executor or FakeExecutor())
    kwargs.setdefault("profile", "ci")
    return runner.run_lab(root=project, build=False, quiet=True, **kwargs)


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
    assert [r["label"] for r in Store(run.out / "records").records()] == ["00_zero", "01_one"]
    assert run.measured == {"00_zero": 1, "01_one": 1}
    assert (run.out / "intro.md").is_file() and (run.out / "_config.yml").is_file()
    # the published chapters are untouched; their records are copied to show beside ours
    assert not (project / "book" / "chapters").exists()
    assert (run.out / "published" / "nvidia-h200.generate.jsonl").is_file()
    params = dict(fake.calls)
    assert params["01_one"]["published"] == "../published"
    assert params["00_zero"]["store"] == "../records"
    assert params["00_zero"]["profile"] == "ci"
    # absolute paths of the run are not left in the notebook
    meta = nbformat.read(run.out / "chapters" / "00_zero.ipynb", as_version=4).metadata["papermill"]
    assert meta == {"input_path": "notebooks/00_zero.ipynb", "output_path": "chapters/00_zero.ipynb"}
    assert "00_zero" in runner.read_manifest(run.out)["chapters"]


def test_unchanged_chapters_are_skipped_unless_forced(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    again = _run(project, monkeypatch, out=out)
    assert again.executed == [] and again.skipped == ["00_zero", "01_one"]

    forced = _run(project, monkeypatch, out=out, force=True)
    assert forced.executed == ["00_zero", "01_one"]
    # the store is append-only: it keeps every record (measure() looks setups up in it)
    assert len(Store(out / "records").records()) == 4

    nb = nbformat.read(project / "notebooks" / "01_one.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, project / "notebooks" / "01_one.ipynb")
    edited = _run(project, monkeypatch, out=out)
    assert edited.executed == ["01_one"] and edited.skipped == ["00_zero"]

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fake executor needs no GPU
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
    assert not (out / "chapters" / "01_one.ipynb").exists()
    assert list(runner.read_manifest(out)["chapters"]) == ["00_zero"]


def test_interruption_keeps_finished_chapters_and_every_record(project, monkeypatch, tmp_path, capsys):
    out = tmp_path / "mine"
    run = _run(project, monkeypatch, FakeExecutor(interrupt_on="01_one"), out=out)
    assert run.interrupted and not run.ok
    assert run.executed == ["00_zero"]
    assert (out / "chapters" / "00_zero.ipynb").is_file()
    assert not (out / "chapters" / "01_one.ipynb").exists()  # the unfinished chapter is not kept
    assert [r["label"] for r in Store(out / "records").records()] == ["00_zero", "01_one"]  # its records are
    assert list(runner.read_manifest(out)["chapters"]) == ["00_zero"]
    assert not (out / ".lab-tmp").exists()

    resumed = _run(project, monkeypatch, out=out)
    assert resumed.skipped == ["00_zero"] and resumed.executed == ["01_one"]


def test_after_an_interrupt_under_force_the_advice_drops_force(project, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "_execute", FakeExecutor(interrupt_on="01_one"))
    runner.run_lab(profile="ci", root=project, out=tmp_path / "o", build=False, force=True)
    assert "the same command without --force" in capsys.readouterr().out


def test_a_failed_chapter_keeps_its_previous_version(project, monkeypatch, tmp_path):
    out = tmp_path / "mine"
    _run(project, monkeypatch, out=out)
    before = (out / "chapters" / "00_zero.ipynb").read_text()
    run = _run(project, monkeypatch, FakeExecutor(fail_on="00_zero"), out=out, force=True)
    assert run.failed == ["00_zero"] and run.executed == ["01_one"] and not run.ok
    assert (out / "chapters" / "00_zero.ipynb").read_text() == before
    assert (out / "_failed" / "00_zero.ipynb").is_file()
    assert "boom" in (out / "_failed" / "00_zero.txt").read_text()
    assert run.measured["00_zero"] == 1  # what it measured before failing is kept
    fixed = _run(project, monkeypatch, out=out, force=True)
    assert fixed.ok and not (out / "_failed" / "00_zero.ipynb").exists()


def test_publish_writes_into_book(project, monkeypatch):
    fake = FakeExecutor()
    run = _run(project, monkeypatch, fake, publish=True, chapters=["1"])
    assert run.out == project / "book"
    assert (project / "book" / "chapters" / "01_one.ipynb").is_file()
    assert [r["label"] for r in Store(project / "book" / "records").records()] == ["01_one", "published"]
    assert dict(fake.calls)["01_one"]["published"] is None
    assert not (project / "runs").exists()


def test_book_is_written_only_by_publish(project, monkeypatch):
    with pytest.raises(ValueError, match="publish=True"):
        _run(project, monkeypatch, out=project / "book")
    with pytest.raises(ValueError, match="do not pass out="):
        _run(project, monkeypatch, out=project / "elsewhere", publish=True)


def test_lab_command_arguments(project, monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    runner.add_lab_arguments(parser)
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
    monkeypatch.setattr(runner, "_execute", FakeExecutor())
    assert runner.lab_command(args) == 0
    assert (tmp_path / "o" / "chapters" / "00_zero.ipynb").is_file()


def test_real_papermill_run(project, tmp_path):
    """Two trivial chapters through papermill and a real kernel."""
    out = tmp_path / "real"
    run = runner.run_lab(profile="ci", root=project, out=out, build=False, quiet=True)
    assert run.executed == ["00_zero", "01_one"] and run.ok
    nb = nbformat.read(out / "chapters" / "01_one.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'profile = "ci"' in injected[0].source
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "device: cpu" in printed
    records = read_records(out / "records" / "cpu.generate.jsonl")
    assert records[-1] == {"label": "x", "profile": "ci", "published": "../published"}


def test_unknown_chapters_and_gpu_profiles_on_a_cpu_are_refused_before_any_folder(
    project, monkeypatch, tmp_path
):
    import torch

    with pytest.raises(ValueError, match="no chapter matches '99'"):
        _run(project, monkeypatch, out=tmp_path / "x", chapters=["99"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="none is visible"):
        _run(project, monkeypatch, out=tmp_path / "x", profile="gpu")
    assert not (tmp_path / "x").exists()


def test_a_failed_chapter_prints_its_cell_and_error(project, monkeypatch, tmp_path, capsys):
    class Failing(FakeExecutor):
        def __call__(self, source, output, parameters, cwd):
            error = RuntimeError("boom")
            error.ename, error.evalue, error.source = (
                "ZeroDivisionError",
                "division by zero",
                "x = 1\ny = x / 0",
            )
            raise error

    monkeypatch.setattr(runner, "_execute", Failing())
    runner.run_lab(profile="ci", root=project, out=tmp_path / "o", build=False, chapters=["0"])
    printed = capsys.readouterr()
    assert "y = x / 0" in printed.err + printed.out
    text = (tmp_path / "o" / "_failed" / "00_zero.txt").read_text()
    assert "y = x / 0" in text and "ZeroDivisionError: division by zero" in text


def test_list_chapters(project):
    assert [p.stem for p in runner.list_chapters(project)] == ["00_zero", "01_one"]
    assert [p.stem for p in runner.list_chapters(project, ["1"])] == ["01_one"]
    assert [p.stem for p in runner.list_chapters(project, ["01", "00_z"])] == ["00_zero", "01_one"]
    with pytest.raises(ValueError, match="no chapter matches"):
        runner.list_chapters(project, ["7"])
