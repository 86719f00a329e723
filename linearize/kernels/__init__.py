"""Attention ops, one folder each: a pure-PyTorch ground truth (`naive.py`) and the faster paths."""
