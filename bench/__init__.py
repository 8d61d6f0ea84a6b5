"""Benchmarks: ``python -m bench.<name>``; each writes JSON under bench/results/."""
