"""The error hookmix raises for a value it cannot use; it imports nothing, so the command line can catch it
without loading torch."""

__all__ = ["HookmixWarning", "RankFailed", "UsageError"]


class UsageError(ValueError):
    """A value given to hookmix that it cannot use: the message names the argument, the value and the fix.

    Every input check of the library and the command line raises it; it is a ``ValueError``, so code that
    catches ``ValueError`` keeps working. The ``hookmix`` command prints it as one line (exit code 2), and
    lets any other exception — a bug — keep its traceback.
    """


class HookmixWarning(UserWarning):
    """The base of every warning hookmix gives (the train-mode gate, cut points, two layers that are one mix
    point): ``warnings.filterwarnings("error", category=hookmix.HookmixWarning)`` turns them all into errors."""


class RankFailed(Exception):
    """Raised on the other ranks of a ``torchrun`` job when one rank failed at a point where the ranks meet
    (:func:`hookmix.headonly.distributed.gather_or_fail`): that rank reports its own error, the others say which
    rank failed instead of dying inside the next collective. ``usage``: the failure was a user's mistake (a
    :class:`UsageError` or a missing file), which the command line exits with code 2 (1 otherwise)."""

    def __init__(self, failed: int, rank: int, world: int, usage: bool) -> None:
        what = "a usage error" if usage else "an error"
        super().__init__(
            f"rank {failed} of {world} stopped with {what} (its message is above), so rank {rank} stopped too."
        )
        self.failed, self.usage = failed, usage
