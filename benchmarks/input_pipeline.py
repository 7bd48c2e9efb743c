"""Host input throughput: images/s of the train and eval input at 224 px, on real JPEGs.

Why: whether the host decodes as fast as a step consumes. This writes JPEGs of ImageNet's size
(crops of real photos), reads them as a `folder:` dataset through TFDS as a run does, and
times lbsgd's host readers (`read_train_rows`: random-size crop + flip; `read_eval_rows`:
resize 256, center 224) with one decoding thread and with every core. Prints one JSON object.

    python -m benchmarks.input_pipeline [--images 1024] [--batch_size 128] [--batches 8]
"""

import functools
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL

from benchmarks import common
from lbsgd import input_pipeline
from lbsgd.config import default_config
from lbsgd.datasets import load_dataset

CLASSES = 8
SIZES = ((500, 375),) * 3 + ((375, 500),)  # (width, height): 3 in 4 landscape


def rates(name: str, batches, batch_size: int, count: int) -> dict:
    """Images per wall-clock second (what this machine gave now) and per CPU second of this
    process (what one core gives when the machine is shared) of `count` batches."""
    next(batches)  # the first batch starts the decoding threads; not timed
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    images = count * batch_size
    return {f"{name}_images_per_sec": round(images / (time.perf_counter() - wall), 1),
            f"{name}_images_per_cpu_sec": round(images / (time.process_time() - cpu), 1)}


def measure(root: Path, data_dir: Path, *, threads: int, batch_size: int, batches: int) -> dict:
    config = default_config()
    config.update(dataset=f"folder:{root}", data_dir=str(data_dir), num_classes=CLASSES,
                  image_size=224, input_threads=threads)
    dataset, rows = load_dataset(config), slice(0, batch_size)
    train = map(functools.partial(input_pipeline.read_train_rows, dataset,
                                  global_batch_size=batch_size, seed=0, rows=rows),
                itertools.count())
    evaluate = map(functools.partial(input_pipeline.read_eval_rows, dataset,
                                     batch_size=batch_size, rows=rows),
                   range(0, len(dataset.eval), batch_size))
    return {"threads": threads, **rates("train", train, batch_size, batches),
            **rates("eval", evaluate, batch_size,
                    min(batches, len(dataset.eval) // batch_size - 1))}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", type=int, default=1024, help="JPEG files per split")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    args = parser.parse_args()
    cores, per_class = len(os.sched_getaffinity(0)), args.images // CLASSES
    with tempfile.TemporaryDirectory(prefix="lbsgd-input-bench-") as tmp:
        root, data_dir = Path(tmp) / "photos", Path(tmp) / "tfds"
        common.write_photo_folder(root, classes=CLASSES, sizes=SIZES,
                                  per_class={"train": per_class, "val": per_class})
        # The first measurement prepares the TFDS dataset; the second reuses it.
        results = [measure(root, data_dir, threads=t, batch_size=args.batch_size,
                           batches=args.batches) for t in sorted({1, cores})]
        mean_bytes = np.mean([f.stat().st_size for f in root.glob("train/*/*.jpg")])
    print(json.dumps({
        "benchmark": "input_pipeline", "image_size": 224, "jpeg": "500x375 or 375x500, q90",
        "jpeg_kib_mean": round(mean_bytes / 1024, 1), "images_per_split": per_class * CLASSES,
        "batch_size": args.batch_size, "timed_batches": args.batches, "cores": cores,
        "pillow": PIL.__version__, "python": platform.python_version(), "results": results,
        **common.environment(jax.devices()),
    }, indent=2))


if __name__ == "__main__":
    main()
