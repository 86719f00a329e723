"""`python -m linearize` runs the `linearize` command."""

import sys

from .cli import main

sys.exit(main())
