"""The one exception type for mistakes a user can fix: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's config, data or plan (not a bug in lf-dist)."""
