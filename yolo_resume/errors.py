"""User-facing errors.

Anything the user can fix (a bad config, a missing dataset, a corrupt checkpoint) raises a
`UserError`; the CLI prints its one-line message and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; `str(err)` names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or a --set override is invalid."""


class DataError(UserError):
    """A dataset path, annotation file or label is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, hostile or incompatible."""


class CheckpointSaveError(UserError):
    """Checkpoints could not be written (disk full, I/O error) often enough that training stopped."""

    exit_code = 74  # sysexits EX_IOERR
