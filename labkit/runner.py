"""The chapter runner: execute the chapters with papermill for one profile, then build the book.

A *chapter* is a notebook ``notebooks/NN_topic.ipynb`` with a papermill ``parameters`` cell.
`run_lab` executes the chapters for one `labkit.book.Profile` into a book folder and builds the HTML
with Jupyter Book::

    labkit lab                      # auto profile, into runs/<profile>-<host>/, then build the HTML
    labkit lab --profile ci         # tiny sizes on the CPU (what CI runs)
    labkit lab --publish            # the published book: writes book/chapters and book/records

A book folder holds ``chapters/`` (the executed notebooks), ``records/`` (the records store every
chapter measures into: a setup two chapters share is measured once, and a run again measures only
what the store lacks) and, in a learner's folder, ``published/`` (a copy of ``book/records``, shown
beside the learner's own numbers). A learner's run never writes into ``book/``; only ``publish=True``
does. Chapters whose source, profile and labkit version have not changed since their last execution
in that folder are skipped (a hash per chapter is kept in ``lab-manifest.json``); ``force=True``
re-runs them, and their scenarios then come from the store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit._version import __version__
from labkit.book import PROFILES, Profile, get_profile
from labkit.records import RecordsError, Store

MANIFEST = "lab-manifest.json"
"""File name of the manifest in a book folder: one entry per executed chapter."""

CHAPTERS_DIR = "chapters"
RECORDS_DIR = "records"
PUBLISHED_DIR = "published"
FAILED_DIR = "_failed"
_TMP_DIR = ".lab-tmp"
# Never copied from book/ into a learner's folder: these belong to the published run.
_NOT_COPIED = {CHAPTERS_DIR, RECORDS_DIR, PUBLISHED_DIR, FAILED_DIR, _TMP_DIR, "_build", MANIFEST}


@dataclass
class LabRun:
    """What :func:`run_lab` did."""

    out: Path
    """The book folder the run wrote into."""
    profile: Profile
    executed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    """Executed chapters removed because their source is gone (only when all chapters run)."""
    measured: dict[str, int] = dataclasses.field(default_factory=dict)
    """Records each executed chapter added to the store (0: everything came from the store); counted
    per chapter when chapters run one at a time."""
    added: int | None = None
    """Records the whole run added, when chapters ran side by side."""
    interrupted: bool = False
    html: Path | None = None
    """``index.html`` of the built book, when it was built."""
    build_ok: bool | None = None

    @property
    def ok(self) -> bool:
        """True when nothing failed, nothing was interrupted and the build (if any) passed."""
        return not self.failed and not self.interrupted and self.build_ok is not False


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The labkit project folder (the one holding ``notebooks/`` and ``book/``).

    Looks at ``start`` (default: the current folder) and its parents, then next to the package.
    """
    candidates = []
    here = Path(start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    candidates.append(Path(__file__).resolve().parent.parent)
    for c in candidates:
        if (c / "notebooks").is_dir() and (c / "book" / "_config.yml").is_file():
            return c
    raise FileNotFoundError(
        "could not find the labkit project (a folder with notebooks/ and book/_config.yml); "
        "run from a clone of the labkit repository or pass root="
    )


def list_chapters(root: str | os.PathLike, chapters: Sequence[str | int] | None = None) -> list[Path]:
    """Chapter sources ``notebooks/NN_*.ipynb`` in order, optionally only those selected.

    A selection item is a chapter number (``0``, ``"00"``, ``"3"``) or the start of a file name
    (``"00_setup"``).
    """
    found = sorted(p for p in (Path(root) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if chapters is None:
        return found
    picked: list[Path] = []
    for item in chapters:
        item = str(item).strip()
        if item.isdigit():
            match = [p for p in found if int(p.name[:2]) == int(item)]
        else:
            match = [p for p in found if p.stem.startswith(item)]
        if not match:
            raise ValueError(f"no chapter matches {item!r}; chapters: {', '.join(p.stem for p in found)}")
        picked += [p for p in match if p not in picked]
    return sorted(picked)


def chapter_key(source: Path, profile: Profile, extra: dict | None = None) -> str:
    """Hash of what decides a chapter's outputs: its source, the profile and the labkit version."""
    h = hashlib.sha256()
    h.update(Path(source).read_bytes())
    h.update(json.dumps(profile.as_dict(), sort_keys=True).encode())
    h.update(__version__.encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of a book folder (``{"chapters": {stem: entry}}``); empty if there is none."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {"chapters": {}}
    data = json.loads(path.read_text())
    data.setdefault("chapters", {})
    return data


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def default_out(root: Path, profile: Profile) -> Path:
    """A learner's run folder: ``runs/<profile>-<host>/`` in the project."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "host"
    return root / "runs" / f"{profile.name}-{host}"


def prepare_book(root: Path, out: Path) -> None:
    """Copy the book sources (config, TOC, prose pages; not the published chapters) into ``out``.

    The published records (``book/records``) are copied into ``out/published/``, so that chapters can
    show them beside the run's own numbers.
    """
    book = root / "book"
    out.mkdir(parents=True, exist_ok=True)
    for item in book.iterdir():
        if item.name in _NOT_COPIED or item.name.startswith("."):
            continue
        target = out / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    published = out / PUBLISHED_DIR
    if published.exists():
        shutil.rmtree(published)
    published.mkdir()
    for f in sorted((book / RECORDS_DIR).glob("*.jsonl")):
        shutil.copy2(f, published / f.name)


@contextlib.contextmanager
def _kernel_environment(root: Path, jobs: int = 1) -> Iterator[None]:
    """Environment for chapter kernels: labkit importable, no progress bars, offline hub; with several
    chapters side by side, the CPU cores shared among them (each kernel's torch gets its share)."""
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [saved.get("PYTHONPATH")])])
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = threads
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _execute(source: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Run one chapter with papermill (separated out so tests can replace it)."""
    import papermill as pm

    pm.execute_notebook(
        str(source),
        str(output),
        parameters=parameters,
        cwd=str(cwd),
        kernel_name="python3",
        progress_bar=False,
        log_output=False,
        report_mode=False,
    )


def _tidy_executed(path: Path, source_rel: str, output_rel: str) -> None:
    """Replace the absolute paths papermill records in the notebook metadata by project-relative ones."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    meta["input_path"] = source_rel
    meta["output_path"] = output_rel
    nbformat.write(nb, path)


def run_lab(
    profile: str | Profile = "auto",
    chapters: Sequence[str | int] | None = None,
    force: bool = False,
    out: str | os.PathLike | None = None,
    publish: bool = False,
    *,
    build: bool = True,
    strict: bool = True,
    device: str | None = None,
    model: str | None = None,
    root: str | os.PathLike | None = None,
    quiet: bool = False,
    jobs: int = 1,
) -> LabRun:
    """Execute the chapters with papermill for one profile and build the book.

    - ``profile``: ``auto``, ``ci``, ``gpu`` or ``gpu-small`` (see `labkit.book.get_profile`).
    - ``chapters``: numbers or name prefixes to run (default: all of ``notebooks/``).
    - ``force``: re-run chapters even when nothing changed since their last execution (their
      scenarios come from the store: nothing already measured is measured again).
    - ``out``: the book folder to write (default ``runs/<profile>-<host>/``); ``publish=True`` writes
      the published book (``book/chapters``, ``book/records``) instead.
    - ``build``: build the HTML with ``jupyter-book build`` afterwards; ``strict`` treats warnings as errors.
    - ``device`` / ``model``: override the profile's device / twin (passed to each chapter).
    - ``jobs``: chapters executed side by side (each kernel gets its share of the CPU cores); the
      records of each chapter are then counted for the run as a whole (``LabRun.added``).

    Everything is checked before any chapter runs (``ValueError`` names the problem). Each finished
    chapter is moved into place at once and recorded in the manifest, and each record is in the store
    as soon as it is measured, so an interrupted run (Ctrl-C) keeps everything it finished. A chapter
    that fails leaves its previous executed version in place, its failed notebook in ``_failed/`` and
    its error on the console; the other chapters still run.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number >= 1, not {jobs!r}")
    root = find_root(root)
    prof = get_profile(profile, device=device)
    if model:
        prof = dataclasses.replace(prof, twin=model)
    sources = list_chapters(root, chapters)
    book = root / "book"
    if publish:
        if out is not None and Path(out).resolve() != book.resolve():
            raise ValueError("publish=True writes into book/; do not pass out=")
        target = book
    else:
        target = Path(out).resolve() if out is not None else default_out(root, prof)
        if target == book.resolve():
            raise ValueError("writing into book/ replaces the published chapters: pass publish=True")
    try:
        Store(target / RECORDS_DIR).check_writable()
    except RecordsError as error:
        raise ValueError(f"cannot write the book into {target}: {error}") from None
    if not publish:
        prepare_book(root, target)
    (target / CHAPTERS_DIR).mkdir(parents=True, exist_ok=True)
    (target / RECORDS_DIR).mkdir(parents=True, exist_ok=True)

    run = LabRun(out=target, profile=prof)
    say = (lambda *a: None) if quiet else _say
    if publish and prof.device == "cpu":
        say(f"note: publishing a CPU run (profile {prof.name}); the chapters name the device they ran on")
    manifest = read_manifest(target)
    overrides = {"device": device, "model": model}

    from tqdm import tqdm

    bar = tqdm(
        total=len(sources), desc="chapters", unit="chapter", disable=quiet or not sources, file=sys.stderr
    )
    tmp = target / _TMP_DIR
    store = target / RECORDS_DIR
    try:
        with _kernel_environment(root, jobs):
            todo = []
            for source in sources:
                key = chapter_key(source, prof, overrides)
                entry = manifest["chapters"].get(source.stem, {})
                if not force and entry.get("key") == key and (target / CHAPTERS_DIR / source.name).is_file():
                    run.skipped.append(source.stem)
                    bar.update(1)
                    _write(
                        bar, quiet, f"{source.stem}: unchanged since {entry.get('finished', '?')}, skipped"
                    )
                else:
                    todo.append((source, key))

            def finished(
                source: Path, key: str, seconds: float | None, error: str, added: int | None
            ) -> None:
                stem = source.stem
                bar.update(1)
                counted = "" if added is None else f", {added} new records"
                if added is not None:
                    run.measured[stem] = added
                if seconds is None:
                    run.failed.append(stem)
                    _write(
                        bar,
                        quiet,
                        f"{stem}: FAILED{counted}; the notebook: {target / FAILED_DIR / source.name}\n{error}",
                    )
                    return
                manifest["chapters"][stem] = {
                    "key": key,
                    "profile": prof.name,
                    "device": prof.device,
                    "labkit": __version__,
                    "seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                _write_json_atomic(target / MANIFEST, manifest)
                run.executed.append(stem)
                _write(bar, quiet, f"{stem}: executed in {seconds:.1f} s{counted}")

            def execute(source: Path) -> tuple[float | None, str]:
                return _run_chapter(root, source, target, prof, device, model, publish, tmp)

            if jobs == 1:
                for source, key in todo:
                    bar.set_postfix_str(source.stem)
                    before = _count_records(store)
                    seconds, error = execute(source)
                    finished(source, key, seconds, error, _count_records(store) - before)
            else:  # chapters side by side; records are appended under a lock, so none is lost
                before = _count_records(store)
                with ThreadPoolExecutor(jobs) as pool:
                    futures = {pool.submit(execute, source): (source, key) for source, key in todo}
                    try:
                        for future in as_completed(futures):
                            finished(*futures[future], *future.result(), None)
                    except KeyboardInterrupt:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                run.added = _count_records(store) - before
            run.executed.sort()
    except KeyboardInterrupt:
        run.interrupted = True
        again = "the same command without --force" if force else "the same command"
        say(
            f"interrupted: kept {len(run.executed)} finished chapter(s) and every record measured in "
            f"{target}; run {again} to continue where it stopped"
        )
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)

    if chapters is None and not run.interrupted:
        run.removed = _prune(target, sources, manifest)
        for stem in run.removed:
            say(f"{stem}: its source is gone from notebooks/, removed from {target}")

    if build and not run.interrupted:
        run.build_ok, run.html = build_book(target, strict=strict, quiet=quiet)
        if run.build_ok:
            say(f"book built: {run.html}")
        else:
            say(f"book build FAILED (see the messages above); partial HTML: {run.html}")
    return run


def _prune(target: Path, sources: Sequence[Path], manifest: dict) -> list[str]:
    """Remove executed chapters whose source no longer exists (their records stay in the store)."""
    current = {p.stem for p in sources}
    removed = []
    for executed in sorted((target / CHAPTERS_DIR).glob("*.ipynb")):
        if executed.stem not in current:
            executed.unlink()
            manifest["chapters"].pop(executed.stem, None)
            removed.append(executed.stem)
    if removed:
        _write_json_atomic(target / MANIFEST, manifest)
    return removed


def _say(*args: Any) -> None:
    print(*args, flush=True)


def _write(bar: Any, quiet: bool, message: str) -> None:
    if not quiet:
        bar.write(message)


def _count_records(store: Path) -> int:
    """How many records the store holds (to say how many a chapter added)."""
    return sum(1 for f in store.glob("*.jsonl") for line in f.open() if line.strip())


def _run_chapter(
    root: Path,
    source: Path,
    target: Path,
    prof: Profile,
    device: str | None,
    model: str | None,
    publish: bool,
    tmp: Path,
) -> tuple[float | None, str]:
    """Execute one chapter into ``target``; return its wall time (``None`` if it failed) and, for a
    failure, the error to show.

    The executed notebook is written to a temporary file and moved into place only when the chapter
    finished. The records it measured stay in the store either way: they are true measurements, and
    running the chapter again will not measure them twice.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    stem = source.stem
    partial = tmp / source.name
    published = target / PUBLISHED_DIR
    parameters = {
        "profile": prof.name,
        "device": device,
        "model": model,
        "store": f"../{RECORDS_DIR}",
        "published": None if publish or not published.is_dir() else f"../{PUBLISHED_DIR}",
    }
    start = time.perf_counter()
    try:
        _execute(source, partial, parameters, cwd=target / CHAPTERS_DIR)
    except Exception as exc:  # a failed chapter is reported; the others still run
        failed = target / FAILED_DIR
        failed.mkdir(exist_ok=True)
        if partial.exists():
            os.replace(partial, failed / source.name)
        message = _failure_message(exc)
        (failed / f"{stem}.txt").write_text(message + "\n")
        return None, message
    seconds = time.perf_counter() - start
    _tidy_executed(partial, f"notebooks/{source.name}", f"{CHAPTERS_DIR}/{source.name}")
    os.replace(partial, target / CHAPTERS_DIR / source.name)
    (target / FAILED_DIR / source.name).unlink(missing_ok=True)
    (target / FAILED_DIR / f"{stem}.txt").unlink(missing_ok=True)
    return seconds, ""


def _failure_message(exc: BaseException) -> str:
    """The failing cell's code and the error, from papermill's exception (or the exception itself)."""
    source = getattr(exc, "source", None)
    name, value = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    lines = [f"{name}: {value}"]
    if source:
        code = source.strip().splitlines()
        lines = ["in the cell:", *("    " + line for line in code[-8:]), *lines]
    return "\n".join(lines)


def _jupyter_book_command() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


def build_book(folder: str | os.PathLike, *, strict: bool = True, quiet: bool = False) -> tuple[bool, Path]:
    """Build a book folder's HTML with ``jupyter-book build`` (Jupyter Book 1, offline).

    With ``strict`` every Sphinx warning is an error (``-W --keep-going``: all pages are still
    written). Returns ``(ok, path of index.html)``.
    """
    folder = Path(folder).resolve()
    root = find_root(folder)
    cmd = [*_jupyter_book_command(), "build", str(folder), "--all"]
    if strict:
        cmd += ["-W", "--keep-going"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 and not quiet:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
    return proc.returncode == 0, folder / "_build" / "html" / "index.html"


# --------------------------------------------------------------------------------------------------
# Command line: `labkit lab`
# --------------------------------------------------------------------------------------------------


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``labkit lab`` options to an argparse parser."""
    parser.add_argument(
        "--profile",
        default="auto",
        choices=["auto", *PROFILES],
        help="sizes and device: auto (pick from the hardware), ci (CPU, tiny), gpu, gpu-small",
    )
    parser.add_argument(
        "--chapters", nargs="+", metavar="N", help="chapter numbers or name prefixes (default: all)"
    )
    parser.add_argument("--force", action="store_true", help="re-run chapters even if unchanged")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write into book/chapters and book/records (the published book)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="book folder for this run (default: runs/<profile>-<host>/)"
    )
    parser.add_argument("--device", help="torch device to run on, e.g. cuda:1 (default: the profile's)")
    parser.add_argument(
        "--model", metavar="SOURCE", help="twin to measure instead of the profile's, e.g. twin:sd21"
    )
    parser.add_argument("--no-build", action="store_true", help="do not build the HTML")
    parser.add_argument("--no-strict", action="store_true", help="do not treat book build warnings as errors")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="chapters executed side by side (default 1; CPU cores are shared)",
    )


def lab_command(args: argparse.Namespace) -> int:
    """Run ``labkit lab`` from parsed arguments; returns the exit status."""
    try:
        run = run_lab(
            profile=args.profile,
            chapters=args.chapters,
            force=args.force,
            out=args.out,
            publish=args.publish,
            build=not args.no_build,
            strict=not getattr(args, "no_strict", False),
            device=getattr(args, "device", None),
            model=getattr(args, "model", None),
            jobs=getattr(args, "jobs", 1),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"labkit lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a chapter (while building): nothing measured is lost
        print("labkit lab: interrupted", file=sys.stderr)
        return 130
    print(
        f"profile {run.profile.name} on {run.profile.device}: {len(run.executed)} executed, "
        f"{len(run.skipped)} unchanged, {len(run.failed)} failed; "
        f"{sum(run.measured.values()) if run.added is None else run.added} new records -> {run.out}"
    )
    if run.html is not None and run.html.exists():
        print(f"open {run.html.as_uri()}")
    if run.interrupted:
        return 130
    return 0 if run.ok else 1
