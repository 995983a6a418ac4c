"""The notebook checks of CI (issue 4):

1. papermill runs every chapter of ``notebooks/`` with the ``ci`` profile (into a temporary book folder);
2. nbval (``--nbval-lax``) re-runs those executed notebooks, with the run's records store, and checks
   the cells marked ``# NBVAL_CHECK_OUTPUT``;
3. the book builds with warnings as errors, both the CI run's and the published ``book/``;
4. every executed chapter in ``book/chapters/`` has the same code as its source (no stale pages)
   and records the device it ran on;
5. no notebook in ``notebooks/`` stores outputs.

The chapter runs take most of the time (seconds per chapter on the ``ci`` profile); they are marked
``slow`` but are part of a plain ``pytest`` run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit import runner

# with `pytest -n 2 --dist loadgroup` (what `make test` runs) these tests share one worker, and one run
# of the chapters, while the unit tests run on the other
pytestmark = pytest.mark.xdist_group("notebooks")

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PUBLISHED = sorted((ROOT / "book" / "chapters").glob("*.ipynb"))
PARAMETERS = ("profile", "device", "model", "store", "published")
DEVICE_LINE = re.compile(r"device: \S+")


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    """Sources of the code cells, without the cell papermill injects."""
    return [
        c.source.strip()
        for c in nb.cells
        if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
    ]


def printed_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# 5. sources are clean, and follow the conventions the runner relies on
# --------------------------------------------------------------------------------------------------


def test_there_are_chapters():
    assert SOURCES, "no chapter sources in notebooks/"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_sources_store_no_outputs(source):
    nb = nbformat.read(source, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{source.name}: cells {dirty} store outputs; run `jupyter nbconvert --clear-output --inplace`"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_sources_have_a_parameters_cell(source):
    nb = nbformat.read(source, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{source.name}: needs exactly one cell tagged 'parameters'"
    for name in PARAMETERS:
        assert re.search(rf"^{name} = ", tagged[0].source, re.M), (
            f"{source.name}: parameters cell lacks {name!r}"
        )
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a title"


# --------------------------------------------------------------------------------------------------
# 1 and 3: every chapter on the ci profile, then the book build (warnings as errors)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory) -> runner.LabRun:
    """Run every chapter with the ci profile into a temporary book folder, and build it."""
    out = tmp_path_factory.mktemp("ci-book")
    # two chapters side by side: the 2-core CI machine finishes the book in about two thirds of the time
    return runner.run_lab(
        profile="ci", out=out, force=True, build=True, strict=True, root=ROOT, quiet=True, jobs=2
    )


@pytest.mark.slow
def test_every_chapter_runs_on_the_ci_profile(ci_run):
    failed = {stem: (ci_run.out / "_failed" / f"{stem}.txt").read_text() for stem in ci_run.failed}
    assert not failed, f"chapters failed (executed notebooks in {ci_run.out / '_failed'}): {failed}"
    assert ci_run.executed == [p.stem for p in SOURCES]
    for source in SOURCES:
        executed = nbformat.read(ci_run.out / "chapters" / source.name, as_version=4)
        assert DEVICE_LINE.search(printed_text(executed)), f"{source.name} does not print its device"


@pytest.mark.slow
def test_ci_book_builds_without_warnings(ci_run):
    assert ci_run.build_ok, f"jupyter-book build -W failed for {ci_run.out}"
    for source in SOURCES:
        assert (ci_run.out / "_build" / "html" / "chapters" / f"{source.stem}.html").is_file()


@pytest.mark.slow
def test_a_forced_second_run_measures_nothing_the_store_holds(ci_run):
    again = runner.run_lab(
        profile="ci", out=ci_run.out, chapters=["0"], force=True, build=False, root=ROOT, quiet=True
    )
    assert again.executed == ["00_setup_and_baseline"] and again.measured == {"00_setup_and_baseline": 0}


@pytest.mark.slow
def test_published_book_builds_without_warnings(tmp_path):
    """The committed book/ (whatever chapters it holds) builds offline with warnings as errors."""
    copy = tmp_path / "book"
    shutil.copytree(ROOT / "book", copy, ignore=shutil.ignore_patterns("_build"))
    ok, index = runner.build_book(copy, strict=True)
    assert ok and index.is_file()


# --------------------------------------------------------------------------------------------------
# 2. nbval on the executed notebooks
# --------------------------------------------------------------------------------------------------


NBVAL_SANITIZE = r"""
[log prefixes: time and process id]
regex: [IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+
replace: LOG-PREFIX

[memory addresses]
regex: 0x[0-9a-fA-F]+
replace: 0xADDRESS
"""


@pytest.mark.slow
def test_nbval_on_executed_chapters(ci_run, tmp_path):
    # a copy, with a copy of the run's records store: nbval's re-run takes every measurement from the
    # store (nothing is measured twice) and checks that the marked outputs come out the same
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    shutil.copytree(ci_run.out / "records", tmp_path / "records")
    for source in SOURCES:
        shutil.copy2(ci_run.out / "chapters" / source.name, chapters / source.name)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sanitize = tmp_path / "sanitize.cfg"
    sanitize.write_text(NBVAL_SANITIZE)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-sanitize-with", str(sanitize),
         "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), "-n", "2", "--dist", "loadfile",
         *sorted(str(p) for p in chapters.glob("*.ipynb"))],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# 4. the published chapters are current and say where they ran
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("executed", PUBLISHED, ids=lambda p: p.stem)
def test_published_chapter_matches_its_source(executed):
    source = ROOT / "notebooks" / executed.name
    assert source.is_file(), f"book/chapters/{executed.name} has no source in notebooks/: remove it"
    published = nbformat.read(executed, as_version=4)
    assert code_cells(published) == code_cells(nbformat.read(source, as_version=4)), (
        f"book/chapters/{executed.name} is stale: re-run `labkit lab --profile gpu --publish --chapters {executed.name[:2]}`"
    )
    assert DEVICE_LINE.search(printed_text(published)), (
        f"book/chapters/{executed.name} does not record its device"
    )


@pytest.mark.parametrize("executed", PUBLISHED, ids=lambda p: p.stem)
def test_published_chapter_ran_without_errors(executed):
    nb = nbformat.read(executed, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"book/chapters/{executed.name} holds an error output"
