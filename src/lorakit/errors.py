"""The one exception type meant for users.

Anything a user can cause — a target that matches nothing, an adapter whose shapes do not fit,
a corrupt file — raises :class:`LorakitError` with a message that says what was wrong, where,
and what to do. The CLI prints the message without a traceback (``--debug`` shows it).
"""


class LorakitError(Exception):
    """A user-facing error: the message names the file, field or module and the fix."""
