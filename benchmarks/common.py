"""What the benchmarks share: the environment every row records, the timing loop, parameter
sizes, the arguments that choose a step, and the folder of real JPEG photos (also the tests').

Every benchmark runs from the repository root as `python -m benchmarks.NAME`.
"""

import argparse
import datetime
import itertools
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import flax
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from lbsgd import models, parallel


def command_name() -> str:
    """How this benchmark was started: `python -m benchmarks.NAME`."""
    return f"python -m benchmarks.{Path(sys.argv[0]).stem}"


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's docstring."""
    return argparse.ArgumentParser(prog=command_name(), description=doc.split("\n\n")[0])


def load_average() -> float:
    """The host's 1-minute load average: on a shared machine, how much else was running."""
    return round(os.getloadavg()[0], 2)


def environment(devices: Sequence[jax.Device], load_before: float) -> dict:
    """The fields of every row: when, on what, with which versions, flags and command, and the
    load average before and after the measurement (CPU times move 2x with a neighbour's load)."""
    return {
        "date": datetime.date.today().isoformat(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "command": " ".join([command_name(), shlex.join(sys.argv[1:])]).strip(),
        "load_average": [load_before, load_average()],
    }


def timed(fn: Callable, *args) -> tuple[object, float]:
    """(fn(*args), wall seconds until its arrays are ready): JAX dispatches asynchronously, so
    without the wait only the launch would be timed."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def time_each(fn: Callable[[], object], count: int) -> list[float]:
    """Seconds of each of `count` calls of `fn()`, timed one by one."""
    return [timed(fn)[1] for _ in range(count)]


def param_size(params) -> dict:
    """Parameter count and bytes of a tree of arrays (or of their shapes)."""
    leaves = jax.tree.leaves(params)
    return {"param_count": sum(x.size for x in leaves),
            "param_bytes": sum(x.size * x.dtype.itemsize for x in leaves)}


# The arguments that take several values with `add_step_arguments(many=True)`.
MULTI = ("model", "image_size", "per_device_batch", "dtype")


def add_step_arguments(parser: argparse.ArgumentParser, *, model: str, image_size: int,
                       many: bool, devices: int | None) -> None:
    """The arguments that choose the train step; with `many`, each of MULTI takes several values
    (the benchmark measures each combination: `combinations`)."""

    def add(name: str, default, **kwargs) -> None:
        nargs, default = ("+", [default]) if many else (None, default)
        parser.add_argument(name, nargs=nargs, default=default, **kwargs)

    add("--model", model, choices=models.MODEL_NAMES, metavar="MODEL",
        help=f"one of {', '.join(models.MODEL_NAMES)}")
    add("--image_size", image_size, type=int)
    add("--per_device_batch", 32, type=int)
    add("--dtype", "float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bn_group_size", type=int, default=32,
                        help="lbsgd's n; must divide the per-device batch")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=devices,
                        help=f"use the first N devices (default: {devices or 'all'})")


def step_fields(args: argparse.Namespace) -> dict:
    """What a row records of `add_step_arguments` (--devices is the row's device_count)."""
    return {key: getattr(args, key) for key in (*MULTI, "bn_group_size", "num_classes")}


def combinations(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
    """`args` once for each combination of the values of the MULTI arguments."""
    for values in itertools.product(*(getattr(args, key) for key in MULTI)):
        yield argparse.Namespace(**{**vars(args), **dict(zip(MULTI, values, strict=True))})


def mesh_of(count: int | None) -> Mesh:
    """lbsgd's mesh over the first `count` devices (all if None)."""
    devices = jax.devices()
    if count is not None and not 1 <= count <= len(devices):
        sys.exit(f"--devices {count}: this host has {len(devices)} devices (on CPU, simulate "
                 "more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return parallel.make_mesh(devices[:count])


def write_photo_folder(root, *, classes: int, per_class: dict[str, int],
                       sizes: Sequence[tuple[int, int]], seed: int = 0) -> Path:
    """root/SPLIT/class_C/III.jpg, per_class[SPLIT] JPEG files (quality 90) in each class.

    Each image is a random crop (at least a third of each side) of one of scikit-learn's two
    sample photos (640x427), resized to a (width, height) drawn from `sizes`: real image
    content, so that decoding and augmentation do real work.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images  # a test dependency: only imported here

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                photo = photos[(c + i) % len(photos)]
                height, width = photo.shape[:2]
                h, w = rng.integers(height // 3, height + 1), rng.integers(width // 3, width + 1)
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                crop = Image.fromarray(photo[top:top + h, left:left + w])
                crop.resize(sizes[rng.integers(len(sizes))]).save(folder / f"{i:03d}.jpg",
                                                                   quality=90)
    return Path(root)
