"""Chapter 14, recipe audit: every Python snippet of the guide run as written, against the installed libraries.

`extract_snippets` finds the fenced ``python`` blocks of the guide (``book/guide.md``, a verbatim copy
of the guide the lab tests; `default_guide`). `audit_scenarios` makes each snippet a measurement of the
kind ``audit``: it runs in a fresh process and is classified ``works``, ``works, deprecation
warning``, ``needs a GPU`` (it fails only for want of one) or ``fails`` (with the exception and its
message), with the modern equivalent from a short curated table (`MODERN`), keyed by the error. The
installed libraries' versions (and the worker's code) are part of each scenario, so the audit runs
again when they change.

"As written" with the fewest changes that let a snippet run offline, each one listed in its record:

- `SUBSTITUTIONS`: hub ids become local folders (the shipped ``shapes`` pipeline, the same diffusers
  classes as Stable Diffusion; its fine-tuned VAE for the guide's tuned VAE). A name that is not a
  real hub id is left alone, and fails.
- `PREAMBLE`: names a snippet uses without defining them (``torch``, the diffusers classes the
  guide imports elsewhere, ``model_id``, ``pipe``, ``prompt``) are defined first, and only those.
  Names no library provides (``load_quantized_model``) are never defined.
- Cheap calls (``max_steps``, ``max_size``): a pipeline call runs with at most that many steps and
  pixels, and with ``compile=False`` compiled modules run eagerly (compiling takes minutes on a
  CPU); the ``torch.compile`` call itself still runs.

Each top-level statement runs in turn; after a failure the rest still run, so one snippet can show
several problems (a statement that needs a name a failed one would have defined is skipped).
Processes: one worker, ``ch14_audit_worker.py`` beside this file, run by path without the labkit
package, imports torch and diffusers once and runs each snippet in a fresh process (see its docstring
for how it stays safe for CUDA); it serves every snippet of a run.

Tables and verdict: `snippet_table`, `setup_table`, `audit_table`, `outcome_counts`, `verdict_rows`.
"""

from __future__ import annotations

import ast
import atexit
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from labkit.book import Profile
from labkit.scenarios import Scenario, measurer
from labkit.shapes import MODEL_DIR, VARIANTS_DIR

OUTCOMES = ("works", "works, deprecation warning", "needs a GPU", "fails")
"""The classes of the audit, from best to worst; a snippet gets the worst of its statements'."""

WORKER = Path(__file__).with_name("ch14_audit_worker.py")
"""The worker file, run by path (it imports nothing from labkit)."""

LIBRARIES = (
    "torch", "diffusers", "transformers", "accelerate", "torchmetrics", "torch-fidelity", "xformers", "torchao",
    "numpy",
)  # fmt: skip
"""The libraries whose versions decide what a snippet does: part of every audit scenario."""


@dataclass
class Snippet:
    """One fenced ``python`` block of the guide: its number, the heading above it and its code."""

    index: int
    section: str
    code: str
    line: int
    """Line of the opening fence in the guide (1-based)."""


_FENCE = re.compile(r"^```(\w*)\s*$")


def extract_snippets(markdown: str, language: str = "python") -> list[Snippet]:
    """The fenced code blocks of ``language`` in a markdown text, in order, with their section."""
    snippets: list[Snippet] = []
    section, inside, lang, start, body = "", False, "", 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if not inside and fence:
            inside, lang, start, body = True, fence.group(1).lower(), number, []
        elif inside and line.strip() == "```":
            inside = False
            if lang == language:
                snippets.append(Snippet(len(snippets) + 1, section, "\n".join(body) + "\n", start))
        elif inside:
            body.append(line)
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    if inside:
        raise ValueError(f"unclosed code fence opened on line {start}: close it with ```")
    return snippets


def default_guide() -> Path:
    """``book/guide.md`` of the labkit project: looked for from the current folder up, then next to the
    package."""
    here = Path.cwd().resolve()
    for folder in [here, *here.parents, Path(__file__).resolve().parents[2]]:
        if (folder / "book" / "guide.md").is_file():
            return folder / "book" / "guide.md"
    raise FileNotFoundError(
        "no book/guide.md found: run from a clone of the labkit repository, or pass guide="
    )


# ---------------------------------------------------------------------------------------------------
# The substitutions that make a snippet runnable offline
# ---------------------------------------------------------------------------------------------------


def _shapes_dir() -> str:
    return str(Path(MODEL_DIR).resolve())


def _tuned_vae_dir() -> str:
    return str((Path(VARIANTS_DIR) / "vae").resolve())


@dataclass(frozen=True)
class Substitution:
    """A text replacement in a snippet: ``old`` -> ``new()`` (a function: paths are found at run time)."""

    old: str
    new: object
    why: str


SUBSTITUTIONS = (
    Substitution(
        '"stabilityai/stable-diffusion-2-1"',
        lambda: repr(_shapes_dir()),
        "hub id -> the shipped shapes pipeline folder (offline; same diffusers classes)",
    ),
    Substitution(
        '"runwayml/stable-diffusion-v1-5"',
        lambda: repr(_shapes_dir()),
        "hub id -> the shipped shapes pipeline folder (offline; same diffusers classes)",
    ),
    Substitution(
        '"stabilityai/sd-vae-ft-mse"',
        lambda: repr(_tuned_vae_dir()),
        "hub id of the tuned VAE -> shapes' own fine-tuned VAE folder (offline)",
    ),
)
"""Hub ids replaced by local folders; a name that is not a real hub id is not replaced."""

PREAMBLE = {
    "torch": ("import torch", "imported (the guide imports it in its complete stack)"),
    **{
        name: (f"from diffusers import {name}", "imported from diffusers (as in the guide's complete stack)")
        for name in (
            "StableDiffusionPipeline",
            "DDIMScheduler",
            "DPMSolverMultistepScheduler",
            "AutoencoderKL",
        )
    },
    "model_id": ("model_id = SHAPES", "the guide leaves it undefined: the shapes pipeline folder"),
    "pipe": (
        "from diffusers import StableDiffusionPipeline as _Pipe\n"
        "pipe = _Pipe.from_pretrained(SHAPES).to(DEVICE)\n"
        "pipe.set_progress_bar_config(disable=True)",
        "the pipeline the snippet assumes: shapes, on the GPU when there is one",
    ),
    "prompt": ('prompt = "a red circle at the top left"', "a prompt the shapes model knows"),
}
"""Names the guide's snippets use without defining them: ``name -> (code, why)``."""


def _loaded_names(tree: ast.Module) -> set[str]:
    """Names a snippet reads before (or without) binding them itself."""
    bound: set[str] = set()
    needed: set[str] = set()
    for stmt in tree.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                needed.add(node.id)
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
    return needed


def prepare(snippet: Snippet) -> tuple[str, str, list[str]]:
    """``(preamble, code, changes)``: the snippet with its substitutions, and what was changed."""
    code, changes = snippet.code, []
    for s in SUBSTITUTIONS:
        if s.old in code:
            code = code.replace(s.old, s.new())
            changes.append(f"{s.old}: {s.why}")
    try:
        needed = _loaded_names(ast.parse(code))
    except SyntaxError:
        needed = set()
    lines = []
    for name, (line, why) in PREAMBLE.items():
        if name in needed:
            lines.append(line)
            changes.append(f"{name}: {why}")
    return "\n".join(lines), code, changes


# ---------------------------------------------------------------------------------------------------
# What an error means today: the curated table
# ---------------------------------------------------------------------------------------------------

MODERN: tuple[tuple[str, str], ...] = (
    (
        r"cosine is not implemented",
        'beta_schedule="squaredcos_cap_v2" (the cosine schedule\'s name in diffusers), and a model '
        "trained with it (chapter 8)",
    ),
    (
        r"no attribute 'enable_vae_tiling'",
        "pipe.vae.enable_tiling() (the pipeline-level method was removed; chapter 4)",
    ),
    (
        r"name 'load_quantized_model' is not defined",
        "no library has this function: torchao's quantize_(pipe.unet, "
        "Int8DynamicActivationInt8WeightConfig()) (post-training), or QATConfig from "
        "torchao.quantization.qat during training (chapter 7)",
    ),
    (
        r"xformers",
        "PyTorch SDPA: diffusers' default attention, nothing to call; xFormers only where its wheel "
        "matches the installed torch (chapter 5)",
    ),
    (
        r"[Tt]orch-fidelity|FrechetInceptionDistance",
        "labkit.quality.fid (torchmetrics FID with features of our own), or install torch-fidelity "
        "and download Inception weights; FID needs hundreds of images per set (chapter 12)",
    ),
    (
        r"ellipsis",
        "`...` is a placeholder, not an argument: DPMSolverMultistepScheduler.from_config("
        "pipe.scheduler.config) keeps the model's betas (chapter 1)",
    ),
    (
        r"`torch_dtype` is deprecated",
        "dtype=torch.float16 (the new name of the argument; chapter 3)",
    ),
    (
        r"Half\) and bias type \(float\)",
        "components passed to from_pretrained keep their own dtype: load the VAE with "
        "dtype=torch.float16 as well (chapter 2)",
    ),
    (
        r"requires accelerator",
        "the same call on a machine with a CUDA GPU; labkit's model_cpu_offload (chapter 4)",
    ),
    (
        r"distilled-sd-v1",
        "not a checkpoint id (hub ids are owner/name): a real distilled SD 1.5 is BK-SDM "
        '("nota-ai/bk-sdm-small"); labkit trains its own student (chapter 9)',
    ),
)
"""``(regex, modern equivalent)``: the first regex found in an error (``Type: message``) or a
deprecation warning gives its modern equivalent."""

NOTES: tuple[tuple[str, str], ...] = (
    (r"=\s*\d+-\d+\s*(#|$)", "`10-20` is the number -10, not a range: give one step count"),
    (
        r"torch\.cuda\.memory_allocated\(\)",
        "memory_allocated()/memory_reserved() read the memory held *now*, after the call: use "
        "torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (chapter 12)",
    ),
    (
        r"time\.time\(\)",
        "time.time() around one call: no CUDA synchronisation and the warm-up counted (chapter 12)",
    ),
)
"""``(regex over the snippet, note)``: things a snippet gets wrong without raising."""

CONFIG_ONLY_NOTE = (
    "only assigns settings to variables: nothing reads them (the labkit presets apply them; chapter 10)"
)


def modern_equivalent(text: str) -> str:
    """The modern equivalent for an error or warning text from `MODERN` ('' when none is known)."""
    for pattern, modern in MODERN:
        if re.search(pattern, text):
            return modern
    return ""


def snippet_notes(code: str) -> list[str]:
    """Curated notes on what a snippet gets wrong without raising (`NOTES`), and config-only blocks."""
    notes = [note for pattern, note in NOTES if re.search(pattern, code, re.M)]
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return notes
    if tree.body and all(isinstance(s, ast.Assign) for s in tree.body):
        values = [s.value for s in tree.body]
        if not any(isinstance(n, ast.Call) for v in values for n in ast.walk(v)) or len(values) > 3:
            notes.append(CONFIG_ONLY_NOTE)
    return notes


def classify(problems: list[dict]) -> str:
    """The outcome of a snippet from its problems (`OUTCOMES`): the worst one counts."""
    kinds = {p["kind"] for p in problems}
    if "error" in kinds:
        return "fails"
    if "gpu" in kinds:
        return "needs a GPU"
    if "deprecation" in kinds:
        return "works, deprecation warning"
    return "works"


# ---------------------------------------------------------------------------------------------------
# Running the snippets: the worker, and the measurement
# ---------------------------------------------------------------------------------------------------


class _Worker:
    """The audit worker (`WORKER`), started on the first snippet and kept for the next ones: the imports
    are paid once per run. Its answers come back one line each; a worker that hangs or dies is
    stopped, and the next snippet starts a new one."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.errors = None
        self.buffer = bytearray()

    def start(self) -> None:
        loader = (
            "import importlib.util as u; s = u.spec_from_file_location('labkit_audit_worker', "
            f"{str(WORKER.resolve())!r}); m = u.module_from_spec(s); "
            "import sys; sys.modules[s.name] = m; s.loader.exec_module(m); m.serve()"
        )
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # the worker's CUDA check initialises nothing
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", loader], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.errors, env=env,
        )  # fmt: skip
        self.buffer = bytearray()

    def run(self, job: dict) -> dict:
        """Send one job; its result, or ``RuntimeError`` with the worker's last words if it broke."""
        import select

        first = self.process is None or self.process.poll() is not None
        if first:
            self.start()
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()
        # the worker's own deadline is the job's timeout (plus a fresh process's imports where it cannot
        # fork); this one only guards against a worker that hangs
        deadline = time.monotonic() + 2 * job["timeout"] + (600 if first else 300)
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise RuntimeError(f"the audit worker did not answer in time: {self.last_words()}")
            if not select.select([fd], [], [], min(left, 1.0))[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker ended
                self.stop()
                raise RuntimeError(f"the audit worker stopped: {self.last_words()}")
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return json.loads(line)

    def last_words(self) -> str:
        if self.errors is None:
            return ""
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.stdin.close()  # the worker ends at the end of its input
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:  # busy with a job that hangs
                    self.process.kill()
                    self.process.wait()
            self.process = None


_WORKER = _Worker()
atexit.register(_WORKER.stop)


def _first_code_line(code: str) -> str:
    """The first line of a snippet that is not a comment (or the first line, if all are)."""
    lines = [line.strip() for line in code.strip().splitlines()]
    return next((line for line in lines if line and not line.startswith("#")), lines[0] if lines else "")


@measurer("audit", pipeline=False)
def _audit(scenario: Scenario, pipe, device) -> dict:
    """One snippet of the guide (``options``: ``snippet``, ``section``, ``code``, ``max_steps``,
    ``max_size``, ``compile``, ``timeout``) run as written in a fresh process, ``pipe`` on ``device``;
    its outcome, problems and the modern equivalents, as `audit_scenarios` describes."""
    o = scenario.options
    snippet = Snippet(o["snippet"], o["section"], o["code"], 0)
    preamble, code, applied = prepare(snippet)
    if o["max_steps"] is not None or o["max_size"] is not None:
        applied.append(
            f"pipeline calls capped at {o['max_steps']} steps, {o['max_size']} px (cheap on a CPU)"
        )
    if not o["compile"]:
        applied.append("compiled modules run eagerly (torch._dynamo disabled; compiling is minutes on a CPU)")
    job = {
        "index": snippet.index,
        "preamble": preamble,
        "code": code,
        "max_steps": o["max_steps"],
        "max_size": o["max_size"],
        "compile": o["compile"],
        "timeout": o["timeout"],
        "consts": {"SHAPES": _shapes_dir(), "DEVICE": device.type},
    }
    result = _WORKER.run(job)
    problems = result["problems"]
    first = next((p for p in problems if p["kind"] in ("error", "gpu")), None)
    first = first or next((p for p in problems if p["kind"] == "deprecation"), None)
    moderns = []
    for p in problems:
        m = modern_equivalent(p["error"])
        if m and m not in moderns:
            moderns.append(m)
    return {
        "status": "ok",
        "snippet": snippet.index,
        "section": snippet.section,
        "first_line": _first_code_line(snippet.code),
        "outcome": classify(problems),
        "problem": (f"line {first['line']}: " if first and first.get("line") else "")
        + (first["error"] if first else ""),
        "modern": "; ".join(moderns),
        "notes": snippet_notes(snippet.code),
        "problems": problems,
        "changes": applied,
        "stdout": result["stdout"],
        "seconds": result["seconds"],
        "process": result.get("process"),
    }


def worker_digest() -> str:
    """A short hash of the worker file: it decides an outcome as much as this module does, so a change to
    it makes new scenarios (this module is in the records' fingerprint already)."""
    return hashlib.sha256(WORKER.read_bytes()).hexdigest()[:16]


def library_versions() -> dict[str, str | None]:
    """The installed version of each of `LIBRARIES` (None where one is not installed)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def audit_scenarios(P: Profile, guide: str | Path | None = None, **settings) -> list[Scenario]:
    """One ``audit`` scenario per Python snippet of ``guide`` (default: `default_guide`).

    ``settings`` override the profile's: ``max_steps`` (``P.fast_steps``) and ``max_size`` (``P.size``)
    cap the pipeline calls' steps and pixels (None: no cap), ``compile`` (``P.compile``) False runs
    compiled modules eagerly, ``timeout`` (120 s) is per snippet. ``pipe`` goes on the device the
    scenarios are measured on. Each record: ``snippet``, ``section``, ``first_line``, ``outcome``
    (`OUTCOMES`), ``problem`` (the first error, else the first warning), ``modern``, ``notes``,
    ``problems`` (all), ``changes`` (what was changed to run it), ``stdout``, ``seconds`` and
    ``process`` (``forked`` from the worker, or ``spawned`` where forking was not safe for CUDA).
    """
    defaults = {"max_steps": P.fast_steps, "max_size": P.size, "compile": P.compile, "timeout": 120.0}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(f"unknown audit settings {sorted(unknown)}; use {', '.join(defaults)}")
    settings = defaults | settings
    path = Path(guide) if guide is not None else default_guide()
    if not path.is_file():
        raise FileNotFoundError(f"no guide at {path}: pass the markdown file to audit")
    snippets = extract_snippets(path.read_text())
    if not snippets:
        raise ValueError(f"{path} holds no ```python blocks to audit")
    versions, worker = library_versions(), worker_digest()
    return [
        Scenario(
            kind="audit",
            source="shapes",
            repeats=1,
            warmup=0,
            options={
                "snippet": s.index,
                "section": s.section,
                "code": s.code,
                **settings,
                "versions": versions,
                "worker": worker,
            },
            label=f"#{s.index} {s.section}",
        )
        for s in snippets
    ]


# ---------------------------------------------------------------------------------------------------
# Tables and the verdict
# ---------------------------------------------------------------------------------------------------


def audit_table(rows: list[dict], width: int = 160):
    """The audit as a table: snippet, section, outcome, what went wrong, the modern equivalent."""
    import pandas as pd

    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    return pd.DataFrame(
        [
            {
                "#": r["snippet"],
                "section": r["section"],
                "outcome": r["outcome"],
                "what happened": cut(r["problem"]),
                "modern equivalent": r["modern"],
                "notes": "; ".join(r["notes"]),
            }
            for r in rows
        ]
    )


VERDICTS = {
    "works": "holds",
    "works, deprecation warning": "holds, with a deprecation warning",
    "needs a GPU": "not measurable on this device",
    "fails": "does not hold",
}


def verdict_rows(rows: list[dict]) -> list[dict]:
    """The rows of the chapter's verdict: each snippet's claim "runs as written" against its outcome."""
    return [
        {
            "claim": f"#{r['snippet']} {r['section']}",
            "claimed": "runs as written",
            "measured": r["outcome"],
            "verdict": VERDICTS[r["outcome"]],
        }
        for r in rows
    ]


def setup_table() -> object:
    """What the audit changes to run a snippet offline: the substitutions and the preamble's names."""
    import pandas as pd

    rows = [{"change": s.old, "kind": "substitution", "why": s.why} for s in SUBSTITUTIONS]
    rows += [{"change": name, "kind": "defined if used", "why": why} for name, (_, why) in PREAMBLE.items()]
    return pd.DataFrame(rows)


def snippet_table(snippets: list[Snippet]):
    """The guide's snippets: number, section, line in the guide, first line of code."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "#": s.index,
                "section": s.section,
                "guide line": s.line,
                "lines": len(s.code.strip().splitlines()),
                "first line": _first_code_line(s.code),
            }
            for s in snippets
        ]
    )


def outcome_counts(rows: list[dict]) -> dict[str, int]:
    """How many snippets got each outcome (`OUTCOMES`)."""
    return {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
