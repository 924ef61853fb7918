"""User-facing errors and the process exit codes.

Anything the user can fix (a bad config, a missing dataset, a corrupt checkpoint) raises a
`UserError`; the CLI prints its one-line message and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a `train` process exits with; the supervisor (supervisor.classify_exit) restarts on some of them."""

    OK = 0
    FAILED = 1  # an unexpected crash (a traceback)
    USAGE = 2  # bad config, data or checkpoint: a restart would fail the same way
    DIVERGED = 65  # sysexits EX_DATAERR: the loss kept turning non-finite at the same step
    SAVE_FAILED = 74  # sysexits EX_IOERR: checkpoints kept failing; space may be freed meanwhile
    # sysexits EX_TEMPFAIL, "temporary failure, retry": stopped by SIGTERM / SIGUSR1 / Ctrl-C after saving.
    # Schedulers restart on non-zero; `yolo-resume train --resume` continues exactly.
    INTERRUPTED = 75
    LOST_RANK = 76  # sysexits EX_PROTOCOL: the job lost a rank; a restart can help
    ABORTED = 130  # a second Ctrl-C (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """An error caused by input the user controls; `str(err)` names the problem and the fix."""

    exit_code = ExitCode.USAGE


class ConfigError(UserError):
    """The config file or a --set override is invalid."""


class DataError(UserError):
    """A dataset path, annotation file or label is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, hostile or incompatible."""


class CheckpointSaveError(UserError):
    """Checkpoints could not be written (disk full, I/O error) often enough that training stopped."""

    exit_code = ExitCode.SAVE_FAILED


class DivergedError(UserError):
    """The loss stayed non-finite after `train.nan_retries` rollbacks: the data or the schedule is at fault."""

    exit_code = ExitCode.DIVERGED
