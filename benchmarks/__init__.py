"""Benchmarks of lbsgd's train step; run each as `python -m benchmarks.NAME` (README.md)."""
