"""The worker of chapter 14's recipe audit: runs the guide's snippets, one fresh process each.

This file is run by path, without the labkit package (it imports nothing from it), so that a snippet
sees only torch, diffusers and the names the audit defines for it. One worker imports torch and
diffusers once and then serves jobs, one JSON line each on its stdin, answering one JSON line each;
the audit takes seconds, not a minute of imports.

Each job runs in a fresh process, statement by statement (`run_statements`). The fast way is a child
forked from the worker, which inherits the imports. A process that has used CUDA cannot fork a child
that uses it again ("Cannot re-initialize CUDA in forked subprocess"), and importing diffusers or
torchao can touch CUDA on a GPU machine. So the worker asks torch to check for CUDA through NVML
(``PYTORCH_NVML_BASED_CUDA_CHECK``, which initialises nothing), forks only while the imports have left
CUDA untouched, and otherwise, or as soon as a forked child reports that it could not initialise CUDA,
runs each job in a freshly started (spawned) process instead, which imports everything itself (one
is started ahead, so that its imports overlap the job before). On a machine without CUDA nothing can
touch it, and every job is forked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

# what a forked child says when the worker's CUDA state cannot be inherited
_CUDA_IN_FORK = re.compile(
    r"Cannot re-initialize CUDA in forked subprocess|CUDA error: initialization error|"
    r"CUDA driver initialization failed|cudaErrorInitializationError"
)


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


def _cap_calls(max_steps: int | None, max_size: int | None) -> None:
    """Make diffusers pipeline calls cheap: at most ``max_steps`` steps and ``max_size`` pixels."""
    import functools

    import diffusers
    from diffusers import DiffusionPipeline

    classes = {DiffusionPipeline, *DiffusionPipeline.__subclasses__()}
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


def _problem(kind: str, line: int, code: str, error: BaseException, audit: bool = False) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return {
        "kind": kind,
        "line": line,
        "code": code,
        "error": f"{type(error).__name__}: {message}"[:400],
        "audit_error": audit,
    }


def run_statements(job: Job) -> dict:
    """In a fresh process: the preamble, then each top-level statement; problems, stdout and warnings."""
    import contextlib
    import io
    import logging
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


def _failed(error: str, seconds: float = 0) -> dict:
    return {"problems": [{"kind": "error", "line": None, "code": "", "error": error}], "stdout": "",
            "seconds": seconds}  # fmt: skip


def _broken(error: BaseException) -> dict:
    """The result of a job whose audit itself broke: reported, never a hang."""
    return {"problems": [_problem("error", 0, "<audit>", error, audit=True)], "stdout": "", "seconds": 0}


def _read_line(fd: int, deadline: float, buffer: bytearray) -> str | None:
    """One line from ``fd`` before ``deadline`` (``time.monotonic``): None at the deadline; at the end of
    the stream, what came before it ("" when nothing did)."""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                rest = bytes(buffer).decode(errors="replace")
                buffer.clear()
                return rest
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def _quiet_stdin() -> None:
    """Give a child an empty stdin: the worker's stdin carries the jobs, which a snippet must not read."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def fork_and_run(job: Job) -> dict:
    """Run ``job`` in a child forked from this process, with a timeout; its result comes through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            _quiet_stdin()
            out = run_statements(job) | {"process": "forked"}
        except BaseException as error:
            out = _broken(error)
        with os.fdopen(write, "w") as pipe:
            pipe.write(json.dumps(out, default=str) + "\n")
        os._exit(0)
    os.close(write)
    try:
        line = _read_line(read, time.monotonic() + job.timeout, bytearray())
    finally:
        os.close(read)
    if line is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return _failed(f"TimeoutError: no result within {job.timeout:g} s", job.timeout)
    os.waitpid(pid, 0)
    return _result(line)


def _result(line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError:  # nothing, or half a line: the process died before it could answer
        return _failed("the snippet's process died")


def _loader(call: str) -> str:
    """Python code that loads this file by path (without the labkit package) and calls ``call``."""
    return (
        "import importlib.util as u; s = u.spec_from_file_location('labkit_audit_worker', "
        f"{os.path.abspath(__file__)!r}); m = u.module_from_spec(s); "
        f"import sys; sys.modules[s.name] = m; s.loader.exec_module(m); m.{call}()"
    )


STARTUP_S = 300.0
"""How long a spawned process may take to import torch and diffusers before its job's timeout starts."""


class Spawner:
    """Runs jobs in freshly started processes, each importing everything itself. One process is always
    started ahead, so that its imports overlap the job before it: only the first job waits for them."""

    def __init__(self) -> None:
        self.spare: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _loader("_one")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def run(self, job: Job) -> dict:
        """Run ``job`` in the spare process (a new one if none); its timeout starts once its imports are done."""
        child = self.spare or self._start()
        self.spare = self._start()
        buffer = bytearray()
        try:
            child.stdin.write((json.dumps(asdict(job)) + "\n").encode())
            child.stdin.close()
            fd = child.stdout.fileno()
            if _read_line(fd, time.monotonic() + STARTUP_S, buffer) != "ready":
                return _failed(f"TimeoutError: the snippet's process did not start within {STARTUP_S:g} s")
            line = _read_line(fd, time.monotonic() + job.timeout, buffer)
            if line is None:
                return _failed(f"TimeoutError: no result within {job.timeout:g} s", job.timeout)
            return _result(line)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()

    def close(self) -> None:
        if self.spare is not None:
            self.spare.kill()
            self.spare.wait()
            self.spare = None


def _import_everything() -> None:
    """Import what the snippets use, once (every forked child inherits it), without import-time notices."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time notices are not the snippets'
        logging.disable(logging.WARNING)
        import diffusers  # noqa: F401
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


def _protocol() -> int:
    """The worker's answers go to a private copy of stdout; anything else that writes to file
    descriptor 1 (a library, a crashing child) lands on stderr instead of in the protocol."""
    out = os.dup(1)
    os.dup2(2, 1)
    return out


def _one() -> None:
    """A spawned process: import everything, say ``ready``, then read one job on stdin and answer it."""
    out = _protocol()
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    _import_everything()
    os.write(out, b"ready\n")
    job = Job(**json.loads(sys.stdin.readline()))
    _quiet_stdin()
    try:
        result = run_statements(job) | {"process": "spawned"}
    except BaseException as error:
        result = _broken(error)
    os.write(out, (json.dumps(result, default=str) + "\n").encode())


def serve() -> None:
    """The worker: import once, then run jobs (one JSON line each on stdin) until stdin closes, answering
    each with one JSON line: forked children while that is safe for CUDA, else spawned processes (a
    result's ``process`` says which)."""
    out = _protocol()
    # torch.cuda.is_available() through NVML initialises no CUDA, so the imports below can leave it untouched
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    _import_everything()
    import torch

    fork = not torch.cuda.is_initialized()
    spawner = Spawner()
    try:
        for line in iter(sys.stdin.readline, ""):
            if not line.strip():
                continue
            job = Job(**json.loads(line))
            try:
                result = fork_and_run(job) if fork else spawner.run(job)
                if fork and any(_CUDA_IN_FORK.search(p.get("error") or "") for p in result["problems"]):
                    fork = False  # the worker's CUDA state broke the child: fresh processes from now on
                    result = spawner.run(job)
            except Exception as error:
                result = _broken(error)
            os.write(out, (json.dumps(result, default=str) + "\n").encode())
    finally:
        spawner.close()


if __name__ == "__main__":
    serve()
