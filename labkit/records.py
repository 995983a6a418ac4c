"""The records store: measured records as JSON lines, one file per device and run kind, append-only.

A record is a plain dict (JSON-able): what was measured, how, where, and the numbers. Records are only
ever appended, never rewritten, so that two writers (a chapter run beside a ``labkit bench``) lose
nothing:

- `append_records` takes an exclusive OS lock on the file, repairs a missing final newline, and writes
  all new lines with one ``write`` in append mode; the file keeps its mode, and a symlink is written
  through, not replaced;
- `check_writable` says, before any expensive work, whether a path can take records;
- `read_records` reads a file and names the file and line of anything that is not a record.

`Store` is a folder of such files: ``<device>.<kind>.jsonl`` (``nvidia-h200.generate.jsonl``,
``intel-r-xeon-r-cpu-2-cores.quality.jsonl``). `labkit.scenarios.measure` looks a scenario up by its
key and code fingerprint before measuring it, and appends each record as soon as it exists.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

_PROJECT = Path(__file__).resolve().parent.parent


def shown(path: str | os.PathLike) -> str:
    """A path as a record or a message shows it: relative to the folder holding the labkit package when
    it lies inside it (``labkit/shapes/variants/qat``), so that records carry no path of one machine."""
    try:
        return str(Path(path).resolve().relative_to(_PROJECT))
    except ValueError:
        return str(path)


class RecordsError(ValueError):
    """A records file that cannot be read or written; the message says which file and what to do."""


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (``"NVIDIA H200"`` -> ``"nvidia-h200"``)."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure records can be appended to ``path`` (creating its folder); raise `RecordsError` if not.

    Call it before any expensive work, so that nothing measured is lost for want of a place to write.
    """
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RecordsError(
            f"cannot create the folder {target.parent} for records: {error.strerror}"
        ) from None
    if target.is_dir():
        raise RecordsError(f"{path} is a folder: give a file name for the records, such as results.jsonl")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise RecordsError(f"{path} is not writable: choose another file or fix its permissions")
    elif not os.access(target.parent, os.W_OK):
        raise RecordsError(
            f"the folder {target.parent} is not writable: choose another place for {path.name}"
        )
    return path


def _encode(records: Iterable[dict]) -> bytes:
    lines = []
    for record in records:
        if not isinstance(record, dict):
            raise TypeError(f"a record is a dict, not {type(record).__name__}")
        lines.append(json.dumps(record, default=str, allow_nan=True) + "\n")
    return "".join(lines).encode()


def append_records(path: str | os.PathLike, records: dict | Iterable[dict]) -> None:
    """Append records to a JSON-lines file, safely beside other writers (see the module docstring)."""
    records = [records] if isinstance(records, dict) else list(records)
    if not records:
        return
    data = _encode(records)
    path = check_writable(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a file written by hand without its last newline: end that line first
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise RecordsError(f"cannot write to {path}: {error.strerror}") from None
        raise
    finally:
        os.close(fd)  # closing releases the lock


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file; `RecordsError` names the file and line of a line that is not one."""
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"no records file at {path}")
    records = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordsError(f"{path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise RecordsError(
                    f"{path}, line {number}: a record is a JSON object, not {line.strip()[:40]}"
                )
            records.append(record)
    return records


def fingerprint(files: Iterable[str | os.PathLike], version: str) -> str:
    """A short hash of ``version`` and the contents of ``files``: which code measured a record."""
    digest = hashlib.sha256(version.encode())
    for file in sorted(Path(f) for f in files):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


class Store:
    """A folder of records files, one per device and run kind (``<device>.<kind>.jsonl``).

    ``kind`` is the kind of measurement (``generate``, ``quality``, ...); records that do not say
    theirs go to ``<device>.records.jsonl``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"Store({str(self.folder)!r})"

    def path(self, device: str, kind: str | None = None) -> Path:
        """The file that holds records of ``kind`` measured on ``device``."""
        return self.folder / f"{slug(device)}.{slug(kind or 'records')}.jsonl"

    def check_writable(self) -> None:
        """Raise `RecordsError` if records cannot be written into this store's folder."""
        check_writable(self.folder / ".write-check.jsonl")

    def append(self, record: dict) -> Path:
        """Append one record to the file of its device and kind; returns that file."""
        path = self.path(record.get("device", "unknown"), record.get("kind"))
        append_records(path, record)
        return path

    def files(self) -> list[Path]:
        """The records files of the store, sorted."""
        return sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []

    def records(self, *, device: str | None = None, kind: str | None = None) -> list[dict]:
        """Every record of the store, optionally only those of one device and kind (file order kept)."""
        out = []
        for path in self.files():
            if path.name == ".write-check.jsonl":
                continue
            for record in read_records(path):
                if device is not None and record.get("device") != device:
                    continue
                if kind is not None and record.get("kind") != kind:
                    continue
                out.append(record)
        return out

    def lookup(self, key: str, fingerprint: str, *, device: str | None) -> dict | None:
        """The last record of setup ``key`` measured by code ``fingerprint`` (on ``device``, unless None)."""
        found = None
        for record in self.records(device=device):
            if record.get("key") == key and record.get("fingerprint") == fingerprint:
                found = record
        return found
