"""User-facing errors: what the CLI prints as one line on stderr and exits 2 for.

Library code raises these (or ``FileNotFoundError`` / ``ValueError``) for problems in what the
user handed it: a config, a file, a record, a run directory. Bugs stay ordinary exceptions with
tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the file, record or key and what is wrong."""


class RunDirError(UserError):
    """A run directory that cannot be used: held by another process, or holding a run with other settings."""
