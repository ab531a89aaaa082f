"""Benchmarks: each reports its figures next to ceilings measured in the same run."""
