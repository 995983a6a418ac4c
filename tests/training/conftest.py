"""Fixtures of the trainer tests: a tiny trained shapes model, and a way to interrupt a job mid-run."""

from __future__ import annotations

import pytest

from labkit.cli import main


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The run folder of ``labkit train shapes --preset tiny --steps 2``: its ``model/`` is a shapes
    pipeline of a few thousand parameters per part (a teacher, a base for the VAE and vpred jobs)."""
    out = tmp_path_factory.mktemp("tiny-shapes")
    assert (
        main(["train", "shapes", "--preset", "tiny", "--out", str(out), "--no-progress", "--steps", "2"]) == 0
    )
    return out


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt(module, name, after)``: the call number ``after + 1`` of ``module.name`` raises
    KeyboardInterrupt (as Ctrl-C or SIGTERM would, in the middle of a step)."""

    def arm(module, name: str, after: int) -> None:
        original = getattr(module, name)
        calls = []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == after + 1:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    return arm
