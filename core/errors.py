"""Typed errors: the library raises them, each command's entry point turns them into one line.

A `UserError` is a predictable problem with the input or the options: its message names the file
or flag and the fix. `run_command(main)` prints that message without a traceback and exits with
the error's code; anything else is a bug and keeps its traceback.
"""
import sys


class UserError(Exception):
    """A problem the user can fix; str(e) is the whole message."""
    exit_code = 1


class DatasetError(UserError):
    """The dataset on disk, or a converter's option."""


class LoaderError(UserError, ValueError):
    """A loader's name, options or the converted files it needs."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or from another run."""


class ConfigError(UserError, ValueError):
    """A flag, a recipe file or a combination of settings."""


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; the last good checkpoint is kept."""
    exit_code = 3


class ExitStatus(int):
    """What a command's main returns to end with this exit status and no message of its own
    (train.py: interrupted at a checkpoint, resumable)."""


def run_command(main, argv=None):
    """Run a command's main(); a UserError becomes its message on stderr and the exit code, an
    ExitStatus that main returns the exit status."""
    try:
        result = main(argv)
    except UserError as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    if isinstance(result, ExitStatus):
        sys.exit(int(result))
    return result
