"""Helpers that tests and benchmarks share: the multi-process gloo harness (``distributed.py``),
the reaper of every process a test session started (``reaper.py``), tiny indexed datasets
(``data.py``) and attention cases (``attention_cases.py``). Shipped in the package so that
benchmarks never import from ``tests/``."""
