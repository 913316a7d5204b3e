"""Benchmarks, the demo and the test-data generator; not part of the installed package."""
