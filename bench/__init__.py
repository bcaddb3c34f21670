"""Benchmarks of the model step, the loader, sharding, the data path and the trainer end to end; run each from the repo root as `python -m bench.<name>` (results in BENCHMARKS.md)."""
