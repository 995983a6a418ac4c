"""The recipe audit: run every Python snippet of the guide as written, against the installed libraries.

Explained in chapter 14 (recipe audit). `extract_snippets` finds the fenced ``python`` blocks of the
guide (``book/guide.md``, a verbatim copy of the guide the lab tests). `audit` runs each one in a
fresh process and classifies it: ``works``, ``works, deprecation warning``, ``needs a GPU`` (it
fails only for want of one) or ``fails`` (with the exception and its message), and gives the modern
equivalent from a short curated table (`MODERN`), keyed by the error.

"As written" with the fewest changes that let a snippet run offline, each one listed in the result:

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
Processes: one worker (this file, loaded without the labkit package) imports torch and diffusers once, then forks a
fresh child per snippet (a timeout each), so the audit takes seconds, not a minute of imports.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

OUTCOMES = ("works", "works, deprecation warning", "needs a GPU", "fails")
"""The classes of `audit`, from best to worst; a snippet gets the worst of its statements'."""


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


# ---------------------------------------------------------------------------------------------------
# The substitutions that make a snippet runnable offline
# ---------------------------------------------------------------------------------------------------


def _shapes_dir() -> str:
    from labkit.shapes import MODEL_DIR

    return str(Path(MODEL_DIR).resolve())


def _tuned_vae_dir() -> str:
    return str((Path(_shapes_dir()).parent / "variants" / "vae").resolve())


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


def about_the_snippet(message: str, code: str) -> bool:
    """Whether a deprecation warning names something the snippet itself wrote.

    The names in backticks before the word "deprecated" (or, without any, the message's dotted or
    snake_case words) are looked for in the code: ``torch_dtype`` is the snippet's,
    ``torch.jit.script_method`` (whose message suggests ``torch.compile``) a library's.
    """
    head = re.split(r"(?i)deprecat", message, maxsplit=1)[0]  # the deprecated thing, not its successor
    names = re.findall(r"`([^`]+)`", head) or re.findall(r"`([^`]+)`", message)
    if not names:
        names = re.findall(r"\b[A-Za-z_][\w.]*[._][\w.]*\b", message)
    return any(n.strip("()").split(".")[-1] in code for n in names if n.strip("()"))


def _needs_gpu(text: str) -> bool:
    import torch

    if torch.cuda.is_available():
        return False
    return bool(re.search(r"requires accelerator|CUDA|no NVIDIA driver|cuda", text))


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
# Running the snippets
# ---------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What the worker runs for one snippet."""

    index: int
    preamble: str
    code: str
    max_steps: int | None = None
    max_size: int | None = None
    compile: bool = True
    timeout: float = 120.0
    consts: dict = field(default_factory=dict)


def _cap_calls(max_steps: int | None, max_size: int | None) -> None:
    """Make diffusers pipeline calls cheap: at most ``max_steps`` steps and ``max_size`` pixels."""
    import functools

    from diffusers import DiffusionPipeline

    classes = {DiffusionPipeline, *DiffusionPipeline.__subclasses__()}
    import diffusers

    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        classes.add(getattr(diffusers, name))
    for cls in classes:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue

        @functools.wraps(call)
        def capped(self, *args, __call=call, **kwargs):
            if max_steps is not None:
                kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps", 50), max_steps)
            if max_size is not None:
                for key in ("height", "width"):
                    if kwargs.get(key) is not None:
                        kwargs[key] = min(kwargs[key], max_size)
            return __call(self, *args, **kwargs)

        cls.__call__ = capped


def _run_statements(job: Job) -> dict:
    """In the child: the preamble, then each top-level statement; problems, stdout and warnings."""
    import contextlib
    import io
    import logging
    import time
    import warnings

    import torch

    torch.set_num_threads(1)
    if not job.compile:
        torch._dynamo.config.disable = True  # compiled modules run eagerly (the compile call still runs)
    _cap_calls(job.max_steps, job.max_size)
    namespace = {"__name__": "__audit__", **job.consts}
    problems: list[dict] = []
    stdout = io.StringIO()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("", "diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        if job.preamble:
            try:
                exec(compile(job.preamble, "<preamble>", "exec"), namespace)
            except Exception as error:
                problems.append(_problem("error", 0, "<preamble>", error, audit=True))
        failed_names: set[str] = set()
        tree = ast.parse(job.code)
        for stmt in tree.body:
            text = ast.get_source_segment(job.code, stmt) or ""
            try:
                exec(compile(ast.Module([stmt], []), "<snippet>", "exec"), namespace)
            except Exception as error:
                name = getattr(error, "name", None)
                targets = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
                if isinstance(error, NameError) and name in failed_names:
                    problems.append(
                        {"kind": "skipped", "line": stmt.lineno, "code": text,
                         "error": f"needs {name}, which a failed line defines"}
                    )  # fmt: skip
                else:
                    problems.append(_problem("error", stmt.lineno, text, error))
                failed_names |= targets
    for logger in loggers:
        logger.removeHandler(handler)
    texts = [(w.category.__name__, str(w.message)) for w in caught]
    texts += [("log", r.getMessage()) for r in records]
    seen = set()
    for category, message in texts:
        if "deprecat" not in message.lower() and category not in ("DeprecationWarning", "FutureWarning"):
            continue
        # a library's own use of something deprecated is not the snippet's problem
        kind = "deprecation" if about_the_snippet(message, job.code) else "internal"
        if (kind, message) not in seen:
            seen.add((kind, message))
            problems.append({"kind": kind, "line": None, "code": "", "error": f"{category}: {message}"})
    for p in problems:
        if p["kind"] == "error" and _needs_gpu(p["error"]):
            p["kind"] = "gpu"
    return {"problems": problems, "stdout": stdout.getvalue()[-2000:], "seconds": time.perf_counter() - start}


def _problem(kind: str, line: int, code: str, error: BaseException, audit: bool = False) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {
        "kind": kind,
        "line": line,
        "code": code,
        "error": f"{type(error).__name__}: {message}"[:400],
        "audit_error": audit,
    }


def _fork_and_run(job: Job) -> dict:
    """Run ``job`` in a forked child with a timeout; the child's result comes back through a pipe."""
    import select
    import signal
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            out = _run_statements(job)
        except BaseException as error:  # the audit itself broke: report it, never hang
            out = {
                "problems": [_problem("error", 0, "<audit>", error, audit=True)],
                "stdout": "",
                "seconds": 0,
            }
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps(out, default=str))
        os._exit(0)
    os.close(write)
    chunks, deadline = [], time.monotonic() + job.timeout
    with os.fdopen(read) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {
                    "problems": [{"kind": "error", "line": None, "code": "",
                                  "error": f"TimeoutError: no result within {job.timeout:g} s"}],
                    "stdout": "", "seconds": job.timeout,
                }  # fmt: skip
            ready, _, _ = select.select([pipe], [], [], min(left, 1.0))
            if ready:
                chunk = pipe.read()
                chunks.append(chunk)
                break
    os.waitpid(pid, 0)
    text = "".join(chunks)
    if not text:
        return {"problems": [{"kind": "error", "line": None, "code": "", "error": "the snippet's process died"}],
                "stdout": "", "seconds": 0}  # fmt: skip
    return json.loads(text)


def _worker() -> None:
    """``python -m labkit.audit``: read jobs (JSON) on stdin, write results (JSON) on stdout."""
    import logging
    import warnings

    jobs = [Job(**j) for j in json.loads(sys.stdin.read())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time notices are not the snippets'
        logging.disable(logging.WARNING)
        import diffusers  # noqa: F401  (imported once; every child inherits it)
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401  (its lazy imports warn; not the snippets' doing)
        import torchmetrics.image  # noqa: F401
        import transformers  # noqa: F401
        from diffusers import (  # noqa: F401  (diffusers imports these lazily: seconds each)
            AutoencoderKL,
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )

        logging.disable(logging.NOTSET)
    results = [_fork_and_run(job) for job in jobs]
    sys.stdout.write("\n" + json.dumps(results) + "\n")


def audit(
    guide: str | Path | None = None,
    *,
    max_steps: int | None = None,
    max_size: int | None = None,
    compile: bool = True,
    timeout: float = 120.0,
    device: str | None = None,
) -> list[dict]:
    """Run every Python snippet of the guide and classify it (chapter 14).

    ``guide``: a markdown file (default: the repository's ``book/guide.md``). ``max_steps`` and
    ``max_size`` cap the pipeline calls' steps and pixels, ``compile=False`` runs compiled modules
    eagerly (for a CPU); ``timeout`` is per snippet; ``device`` is where ``pipe`` is put (default:
    CUDA when there is one). One row per snippet: ``snippet``, ``section``, ``outcome``
    (`OUTCOMES`), ``problem`` (the first error, else the first warning), ``modern``, ``notes``,
    ``problems`` (all), ``changes`` (the substitutions applied), ``stdout`` and ``seconds``.
    """
    import torch

    path = Path(guide) if guide is not None else _default_guide()
    if not path.is_file():
        raise FileNotFoundError(f"no guide at {path}: pass the markdown file to audit")
    snippets = extract_snippets(path.read_text())
    if not snippets:
        raise ValueError(f"{path} holds no ```python blocks to audit")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    consts = {"SHAPES": _shapes_dir(), "DEVICE": device}
    jobs, changes = [], []
    for s in snippets:
        preamble, code, applied = prepare(s)
        if max_steps is not None or max_size is not None:
            applied.append(f"pipeline calls capped at {max_steps} steps, {max_size} px (cheap on a CPU)")
        if not compile:
            applied.append(
                "compiled modules run eagerly (torch._dynamo disabled; compiling is minutes on a CPU)"
            )
        jobs.append(Job(s.index, preamble, code, max_steps, max_size, compile, timeout, consts))
        changes.append(applied)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    loader = (
        "import importlib.util as u; s = u.spec_from_file_location('labkit_audit_worker', "
        f"{str(Path(__file__).resolve())!r}); m = u.module_from_spec(s); "
        "import sys; sys.modules[s.name] = m; s.loader.exec_module(m); m._worker()"
    )
    out = subprocess.run(
        [sys.executable, "-c", loader],
        input=json.dumps([asdict(j) for j in jobs]),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout * len(jobs) + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the audit worker failed ({out.returncode}): {out.stderr[-2000:]}")
    results = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for s, applied, result in zip(snippets, changes, results, strict=True):
        problems = result["problems"]
        first = next((p for p in problems if p["kind"] in ("error", "gpu")), None)
        first = first or next((p for p in problems if p["kind"] == "deprecation"), None)
        moderns = []
        for p in problems:
            m = modern_equivalent(p["error"])
            if m and m not in moderns:
                moderns.append(m)
        rows.append(
            {
                "kind": "audit",
                "snippet": s.index,
                "section": s.section,
                "first_line": _first_code_line(s.code),
                "outcome": classify(problems),
                "problem": (f"line {first['line']}: " if first and first.get("line") else "")
                + (first["error"] if first else ""),
                "modern": "; ".join(moderns),
                "notes": snippet_notes(s.code),
                "problems": problems,
                "changes": applied,
                "stdout": result["stdout"],
                "seconds": result["seconds"],
            }
        )
    return rows


def _first_code_line(code: str) -> str:
    """The first line of a snippet that is not a comment (or the first line, if all are)."""
    lines = [line.strip() for line in code.strip().splitlines()]
    return next((line for line in lines if line and not line.startswith("#")), lines[0] if lines else "")


def _default_guide() -> Path:
    from labkit.lab import find_root

    return find_root() / "book" / "guide.md"


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


def audit_verdict(rows: list[dict]) -> list[dict]:
    """Chapter 14's verdict rows: each snippet's claim "runs as written" against its outcome."""
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
    """What `audit` changes to run a snippet offline: the substitutions and the preamble's names."""
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


if __name__ == "__main__":
    _worker()
