"""Tests of labkit.shapes (a package, so that its test files may share a name with tests of other folders)."""
