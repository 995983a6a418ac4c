"""The lab: hardware profiles, the chapter runner and the book build.

A *chapter* is a notebook ``notebooks/NN_topic.ipynb`` with a papermill ``parameters`` cell.
:func:`run_lab` executes the chapters with papermill for one :class:`Profile`, writes each executed
notebook and its result records into a book folder, and builds the HTML with Jupyter Book::

    labkit lab                      # auto profile, into runs/<profile>-<host>/, then build the HTML
    labkit lab --profile ci         # tiny sizes on the CPU (what CI runs)
    labkit lab --profile gpu --publish   # the maintainers' GPU run: writes book/chapters and book/results

A learner's run goes into its own folder (``runs/<profile>-<host>/``) with a copy of the book sources,
so it never overwrites the published chapters in ``book/``; only ``publish=True`` writes there.
Chapters whose source, profile and labkit version have not changed since their last execution in
that folder are skipped (a hash per chapter is kept in ``lab-manifest.json``); ``force=True`` re-runs.
Explained in the book's introduction ("Run the lab yourself") and in CONTRIBUTING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "lab-manifest.json"
"""File name of the manifest in a book folder: one entry per executed chapter."""

CHAPTERS_DIR = "chapters"
RESULTS_DIR = "results"
PUBLISHED_DIR = "published"
FAILED_DIR = "_failed"
_TMP_DIR = ".lab-tmp"
# Never copied from book/ into a learner's folder: these belong to the published run.
_NOT_COPIED = {CHAPTERS_DIR, RESULTS_DIR, PUBLISHED_DIR, FAILED_DIR, _TMP_DIR, "_build", MANIFEST}


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Sizes and settings a chapter runs with on one kind of machine.

    Chapters read every size from the profile, never from literals, so the same chapter runs in
    seconds on a CPU (``ci``) and at real scale on a data-centre GPU (``gpu``).
    """

    name: str
    """Profile name: ``ci``, ``gpu`` or ``gpu-small``."""
    device: str
    """Torch device the chapters run on: ``cpu`` or ``cuda`` (``cuda:1``...)."""
    twin: str
    """Source for speed, memory and FLOPs: real architecture, random weights (images are noise)."""
    model: str = "shapes"
    """Source for quality numbers: our own trained tiny model."""
    dtype: str = "float32"
    """Precision of the baseline (diffusers loads at full precision)."""
    half_dtype: str = "float16"
    """Reduced precision the chapters try (``float16`` on CUDA, ``bfloat16`` on the CPU)."""
    size: int = 512
    """Image side in pixels for the twin."""
    steps: int = 50
    """Denoising steps of the baseline sampler (PNDM 50 in the guide)."""
    fast_steps: int = 20
    """Denoising steps of the fast samplers (DPM-Solver++ 20 in the guide)."""
    repeats: int = 3
    """Timed repeats per measurement (median and spread are reported)."""
    warmup: int = 1
    """Untimed warm-up calls before the repeats."""
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Batch sizes for throughput sweeps."""
    large_size: int = 1024
    """Image side for the memory chapter's large-image runs."""
    memory_cap_gb: float | None = 4.0
    """Simulated small GPU for the memory chapter (``None`` where memory cannot be capped)."""
    compile: bool = True
    """Whether chapters run ``torch.compile`` (minutes on a CPU, so off in ``ci``)."""
    quality_images: int = 256
    """Images per configuration for quality metrics on ``shapes``."""
    sampler_steps: tuple[int, ...] = (5, 10, 15, 20, 30, 50, 100)
    """Step counts of the samplers chapter's quality sweep on ``shapes`` (quality against steps)."""
    ddpm_steps: int = 1000
    """Steps of the slow reference sampler, DDPM (all of the model's 1000 training steps on a GPU)."""
    summary_twins: tuple[str, ...] = ()
    """Larger twins the performance summary (chapter 11) also measures, beside ``twin``."""
    description: str = ""
    """One line for people: what this profile is for."""

    def as_dict(self) -> dict[str, Any]:
        """The profile as a JSON-able dict."""
        d = dataclasses.asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["summary_twins"] = list(self.summary_twins)
        d["sampler_steps"] = list(self.sampler_steps)
        return d


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        device="cpu",
        twin="twin:tiny",
        half_dtype="bfloat16",
        size=64,
        steps=4,
        fast_steps=2,
        repeats=2,
        warmup=1,
        batch_sizes=(1, 2),
        large_size=128,
        memory_cap_gb=None,
        compile=False,
        quality_images=8,
        sampler_steps=(2, 4),
        ddpm_steps=8,
        summary_twins=(),
        description="CPU, tiny twin, tiny sizes: every chapter in seconds (what CI runs)",
    ),
    "gpu": Profile(
        name="gpu",
        device="cuda",
        twin="twin:sd15",
        size=512,
        steps=50,
        fast_steps=20,
        repeats=3,
        warmup=1,
        batch_sizes=(1, 4, 16),
        large_size=1024,
        memory_cap_gb=4.0,
        compile=True,
        quality_images=256,
        sampler_steps=(5, 10, 15, 20, 30, 50, 100),
        ddpm_steps=1000,
        summary_twins=("twin:sdxl",),
        description="data-centre GPU (>= 20 GB): SD1.5 twin at 512 px, real step counts (the book's run)",
    ),
    "gpu-small": Profile(
        name="gpu-small",
        device="cuda",
        twin="twin:sd15",
        size=512,
        steps=50,
        fast_steps=20,
        repeats=3,
        warmup=1,
        batch_sizes=(1, 2, 4),
        large_size=768,
        memory_cap_gb=4.0,
        compile=True,
        quality_images=128,
        sampler_steps=(5, 10, 15, 20, 30, 50, 100),
        ddpm_steps=1000,
        summary_twins=(),
        description="smaller GPU (< 20 GB): SD1.5 twin at 512 px, smaller batches and large images",
    ),
}
"""The named profiles; ``auto`` picks one of them from the hardware present."""

GPU_MIN_GB = 20.0
"""A CUDA device with at least this much memory gets the ``gpu`` profile, a smaller one ``gpu-small``."""


def _cuda_memory_gb(device: str = "cuda") -> float | None:
    """Total memory of a CUDA device in GB, or ``None`` when CUDA is not available."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9


def get_profile(name: str = "auto", *, device: str | None = None) -> Profile:
    """Return the profile ``name`` (``auto``, ``ci``, ``gpu`` or ``gpu-small``).

    ``auto`` picks ``gpu`` on a CUDA device with at least :data:`GPU_MIN_GB` GB, ``gpu-small`` on a
    smaller CUDA device, and ``ci`` otherwise. ``device`` overrides the profile's device
    (e.g. ``"cuda:1"``); with ``auto`` it is also the device whose memory is looked at.
    """
    if isinstance(name, Profile):
        return dataclasses.replace(name, device=device) if device else name
    if name == "auto":
        wants_cpu = device is not None and device.startswith("cpu")
        memory = None if wants_cpu else _cuda_memory_gb(device or "cuda")
        if memory is None:
            name = "ci"
        elif memory >= GPU_MIN_GB:
            name = "gpu"
        else:
            name = "gpu-small"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of auto, {', '.join(PROFILES)}")
    profile = PROFILES[name]
    return dataclasses.replace(profile, device=device) if device else profile


# --------------------------------------------------------------------------------------------------
# Helpers that chapters call
# --------------------------------------------------------------------------------------------------


def _labkit_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("labkit")
    except PackageNotFoundError:
        import labkit

        return getattr(labkit, "__version__", "0+unknown")


def device_name(device: str) -> str:
    """A readable name for a torch device: the GPU model, or the CPU model and its core count."""
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def start_chapter(
    profile: str | Profile = "auto", *, device: str | None = None, model: str | None = None
) -> Profile:
    """Resolve a chapter's profile from its papermill parameters and print what it runs on.

    Every chapter calls this first. The printed line names the device, so each executed page
    records where its numbers come from (the notebook checks rely on it). ``model`` overrides the
    profile's twin (e.g. ``"twin:sd21"``).
    """
    p = get_profile(profile, device=device)
    if model:
        p = dataclasses.replace(p, twin=model)
    import warnings

    import torch

    # diffusers imports tqdm.auto, which warns in a notebook without ipywidgets; chapters show no bars
    warnings.filterwarnings("ignore", message="IProgress not found")
    print(
        f"labkit {_labkit_version()} · profile {p.name} · device: {p.device} ({device_name(p.device)}) · "
        f"torch {torch.__version__}"
    )
    return p


def profile_table(profile: Profile) -> Any:
    """The profile as a two-column pandas table (setting, value) for display in a chapter."""
    import pandas as pd

    rows = [(k, v) for k, v in profile.as_dict().items() if k != "description"]
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


def load_published(path: str | os.PathLike | None) -> list[dict]:
    """Result records of the published run (``book/results/NN_topic.jsonl``), or ``[]`` if absent."""
    if not path or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def save_records(path: str | os.PathLike | None, records: Sequence[dict]) -> None:
    """Append result records to this run's results file; a no-op when ``path`` is ``None``.

    Chapters call this instead of writing files themselves, so a notebook opened by hand
    (``results = None``) does not leave files behind.
    """
    if not path:
        return
    from labkit.measure import append_results

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    append_results(path, list(records))


def beside_published(
    ours: Sequence[dict],
    published: Sequence[dict],
    columns: Sequence[str] = ("label", "device", "s_per_image", "peak_allocated_gb"),
    *,
    ours_name: str = "this run",
    published_name: str = "published",
) -> Any:
    """One table with this run's records and the published ones, a ``run`` column telling them apart.

    Rows keep their order; columns a record lacks are left empty.
    """
    import pandas as pd

    rows = [{"run": ours_name, **{c: r.get(c) for c in columns}} for r in ours]
    rows += [{"run": published_name, **{c: r.get(c) for c in columns}} for r in published]
    return pd.DataFrame(rows, columns=["run", *columns])


SETUP_KEYS = ("source", "size", "steps", "batch", "dtype")
"""What two records must share to be compared (their devices may differ)."""


def same_setup(a: dict, b: dict, keys: Sequence[str] = SETUP_KEYS) -> bool:
    """Whether two result records measured the same configuration (model, size, steps, batch, dtype)."""
    return all(a.get(k) == b.get(k) for k in keys)


def judge(measured: float | None, low: float, high: float | None = None, *, tolerance: float = 0.1) -> str:
    """Compare a measured number with a claimed value or range ``[low, high]``.

    Returns ``"holds"`` when the measurement lies in the range (widened by ``tolerance``, relative),
    ``"below the claim"`` or ``"above the claim"`` otherwise, and ``"not measured"`` for ``None``.
    """
    if measured is None or measured != measured:  # None or NaN
        return "not measured"
    high = low if high is None else high
    if measured < low * (1 - tolerance):
        return "below the claim"
    if measured > high * (1 + tolerance):
        return "above the claim"
    return "holds"


@dataclass
class Verdict:
    """The verdict box of a chapter: claimed vs measured on this device, one table.

    Each row is a dict with the keys ``claim``, ``claimed``, ``measured`` and ``verdict``.
    Displays as a boxed table in the book and as plain text elsewhere.
    """

    rows: list[dict]
    device: str = ""
    title: str = "Verdict"

    COLUMNS = ("claim", "claimed", "measured", "verdict")

    def table(self) -> Any:
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(
            [{c: r.get(c, "") for c in self.COLUMNS} for r in self.rows], columns=self.COLUMNS
        )

    def _repr_html_(self) -> str:
        where = f" (measured on {html.escape(self.device)})" if self.device else ""
        return (
            '<div class="admonition important labkit-verdict">'
            f'<p class="admonition-title">{html.escape(self.title)}{where}</p>'
            f"{self.table().to_html(index=False, escape=True)}</div>"
        )

    def __repr__(self) -> str:
        where = f" (measured on {self.device})" if self.device else ""
        return f"{self.title}{where}\n{self.table().to_string(index=False)}"


def verdict(rows: Iterable[dict], *, device: str = "", title: str = "Verdict") -> Verdict:
    """Build a chapter's verdict box from rows of ``claim``, ``claimed``, ``measured``, ``verdict``."""
    return Verdict(rows=list(rows), device=device, title=title)


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


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
    h.update(_labkit_version().encode())
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

    The published results are copied into ``out/published/`` so chapters can show them beside
    the run's own numbers.
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
    for f in sorted((book / RESULTS_DIR).glob("*.jsonl")):
        shutil.copy2(f, published / f.name)


@contextlib.contextmanager
def _kernel_environment(root: Path) -> Iterator[None]:
    """Environment for chapter kernels: labkit importable, no progress bars, offline hub."""
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [saved.get("PYTHONPATH")])])
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
) -> LabRun:
    """Execute the chapters with papermill for one profile and build the book.

    - ``profile``: ``auto``, ``ci``, ``gpu`` or ``gpu-small`` (see :func:`get_profile`).
    - ``chapters``: numbers or name prefixes to run (default: all of ``notebooks/``).
    - ``force``: re-run chapters even when nothing changed since their last execution.
    - ``out``: the book folder to write (default ``runs/<profile>-<host>/``); ``publish=True`` writes
      the published book (``book/chapters``, ``book/results``) instead.
    - ``build``: build the HTML with ``jupyter-book build`` afterwards; ``strict`` treats warnings as errors.
    - ``device`` / ``model``: override the profile's device / twin (passed to each chapter).

    Each finished chapter is moved into place at once and recorded in the manifest, so an
    interrupted run (Ctrl-C) keeps every chapter that finished; running again continues where it
    stopped. A chapter that fails leaves its previous executed version in place and its failed
    notebook in ``_failed/``; the other chapters still run.
    """
    root = find_root(root)
    prof = get_profile(profile, device=device)
    if model:
        prof = dataclasses.replace(prof, twin=model)
    book = root / "book"
    if publish:
        if out is not None and Path(out).resolve() != book.resolve():
            raise ValueError("publish=True writes into book/; do not pass out=")
        target = book
    else:
        target = Path(out).resolve() if out is not None else default_out(root, prof)
        if target == book.resolve():
            raise ValueError("writing into book/ replaces the published chapters: pass publish=True")
        prepare_book(root, target)
    (target / CHAPTERS_DIR).mkdir(parents=True, exist_ok=True)
    (target / RESULTS_DIR).mkdir(parents=True, exist_ok=True)

    run = LabRun(out=target, profile=prof)
    say = (lambda *a: None) if quiet else _say
    if publish and prof.device == "cpu":
        say(
            f"note: publishing a CPU run (profile {prof.name}); the published book is meant to show a GPU run"
        )
    sources = list_chapters(root, chapters)
    manifest = read_manifest(target)
    overrides = {"device": device, "model": model}

    from tqdm import tqdm

    bar = tqdm(sources, desc="chapters", unit="chapter", disable=quiet or not sources, file=sys.stderr)
    tmp = target / _TMP_DIR
    try:
        with _kernel_environment(root):
            for source in bar:
                stem = source.stem
                bar.set_postfix_str(stem)
                key = chapter_key(source, prof, overrides)
                executed = target / CHAPTERS_DIR / source.name
                entry = manifest["chapters"].get(stem, {})
                if not force and entry.get("key") == key and executed.is_file():
                    run.skipped.append(stem)
                    _write(
                        bar,
                        quiet,
                        f"{stem}: unchanged since {entry.get('finished', '?')}, skipped (force to re-run)",
                    )
                    continue
                seconds = _run_chapter(root, source, target, prof, device, model, publish, tmp)
                if seconds is None:
                    run.failed.append(stem)
                    _write(bar, quiet, f"{stem}: FAILED, see {target / FAILED_DIR / source.name}")
                    continue
                manifest["chapters"][stem] = {
                    "key": key,
                    "profile": prof.name,
                    "device": prof.device,
                    "labkit": _labkit_version(),
                    "seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                _write_json_atomic(target / MANIFEST, manifest)
                run.executed.append(stem)
                _write(bar, quiet, f"{stem}: executed in {seconds:.1f} s")
    except KeyboardInterrupt:
        run.interrupted = True
        say(
            f"interrupted: kept {len(run.executed)} finished chapter(s) in {target}; "
            "run the same command again to continue"
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
    """Remove executed chapters (and their results) whose source no longer exists."""
    current = {p.stem for p in sources}
    removed = []
    for executed in sorted((target / CHAPTERS_DIR).glob("*.ipynb")):
        if executed.stem not in current:
            executed.unlink()
            (target / RESULTS_DIR / f"{executed.stem}.jsonl").unlink(missing_ok=True)
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


def _run_chapter(
    root: Path,
    source: Path,
    target: Path,
    prof: Profile,
    device: str | None,
    model: str | None,
    publish: bool,
    tmp: Path,
) -> float | None:
    """Execute one chapter into ``target``; return its wall time, or ``None`` if it failed.

    The executed notebook is written to a temporary file and moved into place only when the
    chapter finished; the chapter's previous results are set aside and restored if it did not.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    stem = source.stem
    results = target / RESULTS_DIR / f"{stem}.jsonl"
    previous = tmp / f"{stem}.jsonl.previous"
    partial = tmp / source.name
    if results.exists():
        os.replace(results, previous)
    published = target / PUBLISHED_DIR / f"{stem}.jsonl"
    parameters = {
        "profile": prof.name,
        "device": device,
        "model": model,
        "results": f"../{RESULTS_DIR}/{stem}.jsonl",
        "published": None if publish or not published.is_file() else f"../{PUBLISHED_DIR}/{stem}.jsonl",
    }
    start = time.perf_counter()
    finished = False
    try:
        _execute(source, partial, parameters, cwd=target / CHAPTERS_DIR)
        finished = True
    except Exception as exc:  # a failed chapter is reported; the others still run
        failed = target / FAILED_DIR
        failed.mkdir(exist_ok=True)
        if partial.exists():
            os.replace(partial, failed / source.name)
        (failed / f"{stem}.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        return None
    finally:
        if not finished:
            results.unlink(missing_ok=True)
            if previous.exists():
                os.replace(previous, results)
    seconds = time.perf_counter() - start
    _tidy_executed(partial, f"notebooks/{source.name}", f"{CHAPTERS_DIR}/{source.name}")
    os.replace(partial, target / CHAPTERS_DIR / source.name)
    previous.unlink(missing_ok=True)
    (target / FAILED_DIR / source.name).unlink(missing_ok=True)
    (target / FAILED_DIR / f"{stem}.txt").unlink(missing_ok=True)
    return seconds


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
        help="write into book/chapters and book/results (maintainers' GPU run)",
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
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"labkit lab: {exc}", file=sys.stderr)
        return 2
    print(
        f"profile {run.profile.name} on {run.profile.device}: {len(run.executed)} executed, "
        f"{len(run.skipped)} unchanged, {len(run.failed)} failed -> {run.out}"
    )
    if run.html is not None and run.html.exists():
        print(f"open {run.html.as_uri()}")
    if run.interrupted:
        return 130
    return 0 if run.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labkit.lab``: the same as ``labkit lab``."""
    parser = argparse.ArgumentParser(prog="labkit lab", description=run_lab.__doc__.splitlines()[0])
    add_lab_arguments(parser)
    return lab_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
