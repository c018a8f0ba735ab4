"""Benchmarks of the Bayesian sparse transformer; see benchmarks/README.md. Run as `python -m benchmarks.NAME`."""
