"""Trainers of the shapes model and its variants: ``labkit train WHAT``.

`TRAINERS` maps each job to its `Trainer`: the options it adds to ``labkit train WHAT`` and the
function that runs it. (Filled in as the trainers move here.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Trainer:
    """One ``labkit train`` job: its one-line help, its arguments and the function that runs it."""

    help: str
    add_arguments: Callable
    run: Callable


TRAINERS: dict[str, Trainer] = {}
