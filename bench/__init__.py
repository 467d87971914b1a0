"""Benchmarks: each prints a table of figures. Run with ``make bench``; never part of the tests."""
