"""Tests of labkit.training (a package, so that test_shapes.py here and tests of other folders may share a name)."""
