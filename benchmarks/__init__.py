"""Benchmark scripts (not part of the installed tlframe package)."""
