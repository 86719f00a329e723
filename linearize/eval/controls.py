"""Controls that show what each branch of a hybrid attention contributes.

`window-only` switches the linear branch off (sliding-window softmax alone); `linear-only` drops the window
(the trained feature maps attend to every token). Each kind declares the controls it has and how they switch
its modules (`AttentionKind.controls`); a control applies to a loaded model temporarily and only to the converted
layers that have the branch.
"""

from __future__ import annotations

import contextlib

from ..attention import ATTENTION_KINDS, converted_modules, kind_of
from ..errors import LinearizeError

# The controls reports run; a kind may declare others, which `attention_variant` accepts too.
CONTROLS = ("window-only", "linear-only")


def _targets(model, variant: str) -> list:
    """The converted modules that `variant` switches, with its switch."""
    found = []
    for module in converted_modules(model).values():
        control = kind_of(module).controls.get(variant)
        if control is not None and control.applies(module):
            found.append((module, control))
    return found


def has_both_branches(model) -> bool:
    return all(_targets(model, variant) for variant in CONTROLS)


@contextlib.contextmanager
def attention_variant(model, variant: str):
    """Run `model` as the `variant` control inside the block; restored on exit."""
    known = dict.fromkeys([*CONTROLS, *(name for kind in ATTENTION_KINDS.values() for name in kind.controls)])
    if variant not in known:
        raise LinearizeError(f"control '{variant}' is unknown; choose from {', '.join(known)}")
    restores = [control.switch(module) for module, control in _targets(model, variant)]
    try:
        yield model
    finally:
        for restore in reversed(restores):
            restore()
