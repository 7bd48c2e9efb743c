"""Start-up validation of a config: every impossible setting is named with its fix, at once.

The defaults live in `configs/default.py`; this module only checks a resolved config against
the hardware it is about to run on, so a mistake costs seconds instead of a failed pod job.
"""

import ml_collections

from lbsgd import models
from lbsgd.optim import MOMENTUM_FORMS, WARMUPS

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


def _layout_problems(c: ml_collections.ConfigDict, num_devices: int) -> list[str]:
    problems = []
    if c.global_batch_size <= 0 or c.bn_group_size <= 0:
        return [f"global_batch_size {c.global_batch_size} and bn_group_size {c.bn_group_size} "
                "must be positive"]
    unit = c.bn_group_size * num_devices
    if c.global_batch_size % unit:
        # Each device must hold whole BN groups (a worker never spans two devices) and the
        # same number of them (data parallelism splits the batch evenly).
        lower = max(unit, c.global_batch_size // unit * unit)
        problems.append(
            f"global_batch_size {c.global_batch_size} is not divisible by bn_group_size "
            f"{c.bn_group_size} x {num_devices} devices (= {unit}): use a multiple of {unit}, "
            f"e.g. {lower} or {lower + unit}")
    if c.eval_batch_size <= 0 or c.eval_batch_size % num_devices:
        problems.append(f"eval_batch_size {c.eval_batch_size} must be a positive multiple of "
                        f"the {num_devices} devices")
    return problems


def _recipe_problems(c: ml_collections.ConfigDict) -> list[str]:
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(c.model in models.MODEL_NAMES,
          f"model {c.model!r} is unknown: choose one of {', '.join(models.MODEL_NAMES)}")
    check(c.dtype in DTYPES, f"dtype {c.dtype!r} is unknown: choose one of {DTYPES}")
    check(c.warmup in WARMUPS, f"warmup {c.warmup!r} is unknown: choose one of {WARMUPS}")
    check(c.momentum_form in MOMENTUM_FORMS,
          f"momentum_form {c.momentum_form!r} is unknown: choose one of {MOMENTUM_FORMS}")
    check(c.base_lr > 0, f"base_lr {c.base_lr} must be > 0 (the paper's is 0.1 per 256 images)")
    check(0 <= c.momentum < 1, f"momentum {c.momentum} must be in [0, 1)")
    check(c.weight_decay >= 0, f"weight_decay {c.weight_decay} must be >= 0")
    check(0 < c.bn_momentum < 1, f"bn_momentum {c.bn_momentum} must be in (0, 1)")
    check(c.num_epochs > 0, f"num_epochs {c.num_epochs} must be > 0")
    check(0 <= c.warmup_epochs <= c.num_epochs,
          f"warmup_epochs {c.warmup_epochs} must be in [0, num_epochs={c.num_epochs}]")
    decays = list(c.lr_decay_epochs)
    check(decays == sorted(decays) and all(0 < e for e in decays),
          f"lr_decay_epochs {tuple(decays)} must be positive and increasing, e.g. (30, 60, 80)")
    check(0 < c.lr_decay_factor <= 1, f"lr_decay_factor {c.lr_decay_factor} must be in (0, 1]")
    check(c.num_classes > 1, f"num_classes {c.num_classes} must be > 1")
    check(c.image_size > 0, f"image_size {c.image_size} must be > 0")
    for field in ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
                  "keep_checkpoints"):
        check(c[field] >= 1, f"{field} {c[field]} must be >= 1")
    check(c.max_steps == -1 or c.max_steps >= 1,
          f"max_steps {c.max_steps} must be -1 (run num_epochs) or >= 1")
    return problems


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Raise ConfigError listing every problem of `config` on `num_devices` devices."""
    problems = _recipe_problems(config) + _layout_problems(config, num_devices)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
