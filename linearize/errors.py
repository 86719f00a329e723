"""The one exception type users see: a short message that says what to fix.

The CLI prints it as a single line and exits non-zero; library callers can catch it.
"""


class LinearizeError(Exception):
    """A problem with the user's input or environment, worded as what to do about it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
