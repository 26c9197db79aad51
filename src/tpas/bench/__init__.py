"""Benchmarks (not tests): `python -m tpas.bench NAME [flags]`; figures go to docs/performance.md.

Each NAME is a module tpas.bench.NAME with a click command `main`.
"""
