"""The exceptions the CLI turns into one line on stderr and an exit code, never a traceback."""

# Exit codes of `lf-dist train` besides 0 (done) and 2 (a user's mistake); documented in the README.
EXIT_FAILED = 1  # stopped on purpose: non-finite losses, a checkpoint or model that could not be written
EXIT_PREEMPTED = 75  # stopped by SIGTERM / SIGINT after writing a preemption checkpoint (EX_TEMPFAIL: rerun)


class UserError(Exception):
    """A problem with the user's config, data or plan (not a bug in lf-dist): exit 2."""

    exit_code = 2
    label = "error"


class RunStopped(UserError):
    """The run stopped on purpose, in a state one can continue from: preempted (75), or a failure that is
    the machine's or the data's, not lf-dist's (1)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, label: str = "error"):
        super().__init__(message)
        self.exit_code, self.label = exit_code, label


def error_kinds(err: BaseException) -> set[str]:
    """The class names of an exception and of everything it was raised from (to tell a library's network error
    from its not-found error without importing the library's classes)."""
    kinds, seen = set(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        kinds.add(type(err).__name__)
        err = err.__cause__ or err.__context__
    return kinds
