"""Command line: python -m lbsgd.evaluate --workdir=DIR [--step=N|latest|best] [--config.F=V ...].

Evaluates one checkpoint of a run, finished or still running: the latest by default, step N of
checkpoints/, or the best one (checkpoints-best/). It uses the config that trained the
checkpoint (stored in it) and `train.evaluate`, so every image of the eval split counts
exactly once, as in the run's own evaluations. Only what evaluation may change can be
overridden (`EVAL_FIELDS`): the dataset, if it has the same classes, where the data is, the
eval batch size and the other run-only fields. The model, its input size and its evaluation
transform stay the trained ones (`augment` is pinned to what the run resolved).

Prints one JSON object (step, dataset, eval_top1, eval_top5, eval_loss, count) and writes it
to DIR/evaluations/step_N-DATASET.json. It takes no lock and writes nothing else in the
workdir: a run in progress goes on undisturbed.

The command-line pieces (flags, one-line errors, quiet library logs) are shared with
`lbsgd.export`.
"""

import json
import os
import re
import sys
import threading
from collections.abc import Callable

# TensorFlow's C++ start-up INFO lines are not ours to show; set before anything imports TF
# (lbsgd.train does, through lbsgd.metrics).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lbsgd import checkpoints, cli, train  # noqa: E402
from lbsgd import config as config_lib  # noqa: E402
from lbsgd.datasets import augmentation  # noqa: E402
from lbsgd.errors import CheckpointError, ConfigError, DataError, WorkdirError  # noqa: E402

# What reading a checkpoint may change: where and how the data is read, and (for evaluation)
# which dataset. Everything else shapes the model or what it was trained to see.
DATA_FIELDS = config_lib.RUN_ONLY_FIELDS | {"skip_corrupt_images"}
EVAL_FIELDS = DATA_FIELDS | {"dataset"}
STEP_NAMES = ("latest", "best")


def open_checkpoint(workdir: str, step: str) -> tuple[checkpoints.Checkpointer, int]:
    """(a read-only Checkpointer, the step) for `step`: "latest", "best" or a number."""
    if not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is not a directory: give the --workdir of a "
                           "run of python -m lbsgd.main")
    if step not in STEP_NAMES and not step.isdigit():
        raise CheckpointError(f"--step={step}: give a step number, latest or best")
    latest = _steps(workdir, checkpoints.LATEST_DIRECTORY)
    best = _steps(workdir, checkpoints.BEST_DIRECTORY)
    if not latest and not best:
        raise CheckpointError(f"{workdir} has no checkpoint yet (a run saves one every "
                              "checkpoint_every_steps and at every epoch's end): wait for the "
                              "first save, or train with python -m lbsgd.main")
    available = (f"available: --step={', '.join(map(str, latest)) or '(none)'}"
                 f"{f' or --step=best (step {best[-1]})' if best else ''}")
    if step == "best" or (step.isdigit() and int(step) in best and int(step) not in latest):
        if not best:
            raise CheckpointError(f"{workdir} has no best checkpoint (a run saves "
                                  f"{checkpoints.BEST_DIRECTORY}/ at its first evaluation): "
                                  f"{available}")
        name, chosen = checkpoints.BEST_DIRECTORY, best[-1]
    elif step == "latest":
        if not latest:
            raise CheckpointError(f"{workdir} has no checkpoint in "
                                  f"{checkpoints.LATEST_DIRECTORY}/: {available}")
        name, chosen = checkpoints.LATEST_DIRECTORY, latest[-1]
    elif int(step) in latest:
        name, chosen = checkpoints.LATEST_DIRECTORY, int(step)
    else:
        raise CheckpointError(f"{workdir} has no checkpoint at step {step} (only the last "
                              f"keep_checkpoints are kept): {available}")
    return checkpoints.Checkpointer(workdir, keep=None, name=name, read_only=True), chosen


def _steps(workdir: str, name: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, name)):
        return []
    reader = checkpoints.Checkpointer(workdir, keep=None, name=name, read_only=True)
    try:
        return reader.steps()
    finally:
        reader.close()


def run_config(saved: dict, overrides: dict, *, allowed: frozenset,
               step: int) -> ml_collections.ConfigDict:
    """The config that trained a checkpoint (`saved`, as JSON), with `overrides` of `allowed`
    fields only. Fields added since the checkpoint keep their defaults."""
    refused = sorted(set(overrides) - allowed)
    if refused:
        raise ConfigError(
            f"--config.{refused[0]}: the checkpoint at step {step} is read with the config that "
            f"trained it; only {', '.join(sorted(allowed))} may change")
    config = config_lib.default_config()
    for field, value in saved.items():
        if field in config:  # JSON gave tuples back as lists
            config[field] = tuple(value) if isinstance(config[field], tuple) else value
    # The evaluation transform is part of the trained model's input: another dataset with
    # an empty `augment` would otherwise get its own default (e.g. a folder's center crop).
    config.augment = augmentation(config)
    for field, value in overrides.items():
        config[field] = value
    return config


def _setup(config: ml_collections.ConfigDict, saved: dict, step: int) -> train.Experiment:
    try:
        return train.setup(config)
    except DataError as error:
        # load_dataset's own fix (set num_classes) would change the model: say what fits.
        if config.dataset == saved.get("dataset") or not str(error).startswith("num_classes"):
            raise
        reason = str(error).rsplit(": set --config.num_classes", 1)[0]
        raise DataError(f"{reason}, but the checkpoint at step {step} classifies "
                        f"{config.num_classes} classes of {saved.get('dataset')}: evaluate on "
                        f"a dataset with the same {config.num_classes} classes") from None


def restore(workdir: str, step: str, overrides: dict, *, allowed: frozenset):
    """(experiment, state, step, checkpoint folder name) of a checkpoint of `workdir`, set up
    with the config that trained it and `overrides`; no resume check of that config."""
    reader, chosen = open_checkpoint(workdir, step)
    try:
        saved = reader.saved_config(chosen)
        config = run_config(saved, overrides, allowed=allowed, step=chosen)
        ex = _setup(config, saved, chosen)
        # Another dataset of the same classes may still hold other images (channels).
        why = (f"(the model was built for the images of {saved.get('dataset')}, "
               f"{config.dataset} has {ex.dataset.image_shape}: evaluate on images of the "
               "trained size and channels)" if config.dataset != saved.get("dataset")
               else "(written by another lbsgd version?): read it with that version")
        state = reader.restore_step(chosen, jax.eval_shape(ex.init_state), why)
    finally:
        reader.close()
    logging.info("restored %s/%d", os.path.basename(reader.directory), chosen)
    return ex, state, chosen, os.path.basename(reader.directory)


def _file_name(step: int, dataset: str) -> str:
    return f"step_{step}-{re.sub(r'[^A-Za-z0-9._-]+', '_', dataset)}.json"


def evaluate_checkpoint(workdir: str, step: str = "latest",
                        overrides: dict | None = None) -> dict:
    """Evaluate a checkpoint of `workdir` over the whole eval split; write and return the
    result (one JSON object)."""
    ex, state, chosen, folder = restore(workdir, step, overrides or {}, allowed=EVAL_FIELDS)
    result = {"step": chosen, "checkpoint": f"{folder}/{chosen}", "dataset": ex.config.dataset,
              **train.evaluate(ex, state), "count": len(ex.dataset.eval)}
    if jax.process_index() == 0:
        path = os.path.join(workdir, "evaluations", _file_name(chosen, ex.config.dataset))
        write_json(path, result)
        logging.info("eval of step %d on %s (%d images) | top1 %.4f | top5 %.4f | loss %.4f: "
                     "written to %s", chosen, ex.config.dataset, result["count"],
                     result["eval_top1"], result["eval_top5"], result["eval_loss"], path)
    return result


def write_json(path: str, value: dict) -> None:
    """Write `path` whole or not at all (a temporary file, then os.replace). The temporary
    file's name is its own: evaluations take no lock, so two may write the same file at once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


# The command line, shared with lbsgd.export.


def define_flags(argv: list[str]) -> None:
    """--workdir, --step and --config.FIELD=VALUE over the default config (the checkpoint's
    own config replaces it; only the fields given count as overrides)."""
    flags.DEFINE_string("workdir", None, "The run directory (the --workdir of lbsgd.main).")
    flags.DEFINE_string("step", "latest", "latest | best | a step of WORKDIR/checkpoints.")
    flags.mark_flag_as_required("workdir")
    try:  # an unknown field is found as the overrides are defined
        config_flags.DEFINE_config_dict("config", config_lib.default_config(), sys_argv=argv)
    except (AttributeError, KeyError) as error:
        raise SystemExit(f"lbsgd: {cli.config_problem(error, argv)}") from None


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        raise SystemExit(f"lbsgd: {error}") from None


def overrides() -> dict:
    """{field: value} of the --config.FIELD=VALUE flags given."""
    return dict(config_flags.get_override_values(flags.FLAGS["config"]))


def run_command(command: Callable[[], dict]) -> None:
    """Run `command` as lbsgd.main runs training (lbsgd/cli.py); print its result as one JSON
    line."""
    result = cli.run(command)
    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run_command(lambda: evaluate_checkpoint(flags.FLAGS.workdir, flags.FLAGS.step,
                                            overrides()))


if __name__ == "__main__":
    define_flags(sys.argv)
    app.run(main, flags_parser=parse_flags)
