"""Errors a person can act on.

A :class:`UserError` is a mistake in what was asked (unknown key, dataset or model, a
mismatch between checkpoints, an existing or locked output directory, a missing path). The
command-line tools print its message as one line and exit with status 2; ``--debug`` shows
the traceback. Library callers catch it like any other exception.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused request; the message is one line that says what to do."""


class ConfigMismatch(UserError):
    """A directory holds a run with another manifest than the one asked for."""


class LockedError(UserError):
    """Another live process writes to this directory."""


class CorruptCheckpoint(UserError):
    """A checkpoint file does not match the checksum recorded when it was written."""


class Diverged(UserError, FloatingPointError):
    """Training produced NaN/Inf; the message names the step and the first bad leaf."""
