"""Shared fixtures: a tiny twin pipeline, built once per test session and copied per test."""

import copy

import pytest

import labkit


@pytest.fixture(scope="session")
def _tiny_master():
    return labkit.load_pipeline("twin:tiny", device="cpu")


@pytest.fixture
def tiny(_tiny_master):
    """A fresh twin:tiny pipeline (a deep copy, so a test may change it freely)."""
    pipe = copy.deepcopy(_tiny_master)
    pipe.set_progress_bar_config(disable=True)
    return pipe
