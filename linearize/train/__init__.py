"""Training: attention transfer (stage 1), LoRA fine-tuning (stage 2), and the pipeline that runs both.

Importing this package makes `linearize.train` name it rather than the `linearize.train()` function (Python sets
a package's attribute to each subpackage it imports), so the package is callable and calls that function.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """`linearize.api.train`: convert, train by a recipe, export and report (see `help(linearize.api.train)`)."""
        from ..api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
