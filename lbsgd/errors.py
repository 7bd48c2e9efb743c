"""The errors a user can act on: each message names the field, file or step and the fix.

`python -m lbsgd.main` catches `LbsgdError` once and prints its message as one `lbsgd: ...`
line (no traceback) before exiting non-zero; anything else is a bug and keeps its traceback.
"""


class LbsgdError(Exception):
    """Base of every error whose message tells the user what to do."""

    exit_code = 1


class ConfigError(LbsgdError):
    """A config that cannot run; the message lists every problem found, each with its fix."""


class DataError(LbsgdError):
    """Data that cannot be trained on as it is: the message names the file or field and the fix."""


class CheckpointError(LbsgdError):
    """A resume that would silently change the experiment or lose work."""


class DivergenceError(LbsgdError):
    """A non-finite loss or gradient: the run stops before anything of it is saved."""


class WorkdirError(LbsgdError):
    """A workdir that cannot take this run: in use by another run, a file, not writable."""


class Interrupted(LbsgdError):
    """Ctrl-C: the step finished and was saved; exits 130 like any interrupted command."""

    exit_code = 130
