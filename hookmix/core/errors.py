"""The error hookmix raises for a value it cannot use; it imports nothing, so the command line can catch it
without loading torch."""

__all__ = ["HookmixWarning", "UsageError"]


class UsageError(ValueError):
    """A value given to hookmix that it cannot use: the message names the argument, the value and the fix.

    Every input check of the library and the command line raises it; it is a ``ValueError``, so code that
    catches ``ValueError`` keeps working. The ``hookmix`` command prints it as one line (exit code 2), and
    lets any other exception — a bug — keep its traceback.
    """


class HookmixWarning(UserWarning):
    """The base of every warning hookmix gives (the train-mode gate, cut points, two layers that are one mix
    point): ``warnings.filterwarnings("error", category=hookmix.HookmixWarning)`` turns them all into errors."""
