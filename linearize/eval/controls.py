"""Controls that show what each branch of a hybrid attention contributes.

`window-only` switches the linear branch off (sliding-window softmax alone); `linear-only` drops the window
(the trained feature maps attend to every token). Both apply to a loaded model temporarily and only to
converted layers that have a window.
"""

from __future__ import annotations

import contextlib

from ..attention import HybridLinearAttention
from ..errors import LinearizeError

CONTROLS = ("window-only", "linear-only")


def has_both_branches(model) -> bool:
    return any(isinstance(m, HybridLinearAttention) and m.window > 0 for m in model.modules())


@contextlib.contextmanager
def attention_variant(model, variant: str):
    """Run `model` as the `variant` control inside the block; restored on exit."""
    if variant not in CONTROLS:
        raise LinearizeError(f"control '{variant}' is unknown; choose from {', '.join(CONTROLS)}")
    modules = [m for m in model.modules() if isinstance(m, HybridLinearAttention) and m.window > 0]
    saved = [(m.window, m.use_linear) for m in modules]
    for m in modules:
        if variant == "window-only":
            m.use_linear = False
        else:
            m.window = 0
    try:
        yield model
    finally:
        for m, (window, use_linear) in zip(modules, saved, strict=True):
            m.window, m.use_linear = window, use_linear
