"""What every lbsgd command shares: quiet library logs, TensorFlow off the accelerators, flag
and config problems as one line, and an LbsgdError as one `lbsgd: ...` line with its exit code.
Used by lbsgd.main, lbsgd.evaluate and lbsgd.export."""

import logging as logging_std
import os
import re
import sys
from collections.abc import Callable

from absl import logging

from lbsgd import hide_gpus_from_tensorflow
from lbsgd.errors import LbsgdError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def config_problem(error: Exception, argv: list[str]) -> str:
    """One line saying why --config could not be loaded or overridden."""
    text = " ".join(str(error).replace("\\n", " ").split())
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    if unknown := re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text):
        return (f"--config.{unknown[2]}: no such config field; did you mean "
                f"--config.{unknown[1]}? (every field: lbsgd/config.py)")
    if isinstance(error, AttributeError | KeyError):
        name = re.search(r"\w+", text)[0]
        return f"--config.{name}: no such config field (every field: lbsgd/config.py)"
    if "No such file or directory" in text:
        return (f"--config={path}: no such file (a path from the current directory, "
                "e.g. --config=configs/demo.py in the repository root)")
    hint = (" (run from the directory that holds the imported package, e.g. the repository "
            "root)" if isinstance(error, ModuleNotFoundError) else "")
    return f"--config={path} cannot be loaded: {type(error).__name__}: {text}{hint}"


class OwnInfoOnly(logging_std.Filter):
    """Keep the console to lbsgd's progress lines: libraries' INFO (orbax logs every save,
    JAX its backend search, TFDS its preparation) only at WARNING and above, and without the
    traceback a library logs from its own thread (orbax's failed async save): the same error
    reaches lbsgd's thread too, where it becomes one line or, if it is a bug, a traceback."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE_DIR + os.sep):
            return True
        if str(record.msg).startswith("Variant folder "):
            # TFDS looking into a dataset folder it is about to prepare (and finding it
            # empty): datasets/preparation.py says what happens instead.
            return False
        record.exc_info, record.exc_text = None, None
        return record.levelno >= logging_std.WARNING


def run(command: Callable):
    """Run `command()` with libraries' INFO lines hidden and TensorFlow (TFDS, TensorBoard
    writers) kept off the accelerators JAX uses; an LbsgdError ends the process with its one
    line and exit code instead of a traceback."""
    logging.get_absl_handler().addFilter(OwnInfoOnly())
    hide_gpus_from_tensorflow()  # before the command imports anything that runs TF
    try:
        return command()
    except LbsgdError as e:
        print(f"lbsgd: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
