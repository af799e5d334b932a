"""Benchmarks (`genserve bench`, `bench-jobs`, `bench-scores`): apart from the serving path."""
