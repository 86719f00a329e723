"""Sliding-window softmax branch (with sink logits) of the gated kinds; `naive.py` is the ground truth.

Returns the window's numerator and normaliser separately so that a kind can mix it with a linear branch under one
shared normaliser (Lizard) or on its own (Liger). The PyTorch chunked path runs everywhere for now.
"""

from .chunk import WindowState, window_chunk_torch
from .naive import window_naive

window_attention = window_chunk_torch

__all__ = ["WindowState", "window_attention", "window_chunk_torch", "window_naive"]
