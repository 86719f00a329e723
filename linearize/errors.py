"""The one exception type users see: a short message that says what to fix.

The CLI prints it as a single line and exits non-zero; library callers can catch it.
"""


class LinearizeError(Exception):
    """A problem with the user's input or environment, worded as what to do about it."""
