"""Digit benchmarks: run_digits.py (DA table) and run_transfer.py (labels-per-class transfer table)."""
