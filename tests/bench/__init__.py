"""Measurement tools, run from the repository root as `python -m tests.bench.<name>`; each prints
a table and writes JSON under runs/."""
