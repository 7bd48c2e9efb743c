"""Global batches under the paper's data contract (Remark 4), ready for the jitted step.

Each epoch is ONE random permutation of the whole training set, divided among all workers:
global step t of epoch e consumes perm_e[t * kn : (t + 1) * kn]. Every process reads only the
rows of that slice that land on its own devices (parallel.process_rows), and consecutive runs
of n rows form the BN groups; the rows are assembled into one global `jax.Array` sharded over
the mesh here, so the train loop only ever sees global batches. Nothing here depends on the
number of processes or devices, and the position is just the step: a resumed run continues
with the same images, and the same crops and flips (datasets/sources.py).

Batches are built PREFETCH_BATCHES ahead on a background thread, so decoding the next ones
overlaps the train step on this one.
"""

import collections
import concurrent.futures
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from lbsgd import parallel
from lbsgd.datasets import Dataset
from lbsgd.errors import DataError

PREFETCH_BATCHES = 2  # batches built ahead of the one the train step is using


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Updates per epoch, floor(N / kn).

    Each epoch is one permutation of the training set split into minibatches of kn (Remark 4);
    the last, partial minibatch is dropped so every update sees exactly kn images, which the
    linear scaling rule (Sec. 2.1) assumes.
    """
    steps = num_examples // global_batch_size
    if steps == 0:
        raise DataError(f"global_batch_size {global_batch_size} is larger than the "
                        f"{num_examples} training images: an epoch would have no full "
                        f"minibatch; use a global_batch_size of at most {num_examples}")
    return steps


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Remark 4: one permutation of the whole training set per epoch, from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(step: int, *, num_examples: int, global_batch_size: int,
                  seed: int) -> np.ndarray:
    """The dataset indices of the kn images that global step `step` (0-indexed) consumes."""
    epoch, step_in_epoch = divmod(step, steps_per_epoch(num_examples, global_batch_size))
    start = step_in_epoch * global_batch_size
    return epoch_permutation(num_examples, seed, epoch)[start:start + global_batch_size]


def _check_labels(dataset: Dataset, batch: dict[str, np.ndarray], indices: np.ndarray,
                  split: str) -> dict[str, np.ndarray]:
    bad = (batch["label"] < 0) | (batch["label"] >= dataset.num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{dataset.name} {split} image {int(indices[row])} has label "
            f"{int(batch['label'][row])}, outside the {dataset.num_classes} classes "
            f"[0, {dataset.num_classes}): fix the dataset's labels, then prepare it again")
    return batch


def read_train_rows(dataset: Dataset, step: int, *, global_batch_size: int, seed: int,
                    rows: slice) -> dict[str, np.ndarray]:
    """`rows` of global training batch `step`, as host arrays."""
    source = dataset.train
    indices = train_indices(step, num_examples=len(source),
                            global_batch_size=global_batch_size, seed=seed)[rows]
    epoch = step // steps_per_epoch(len(source), global_batch_size)
    return _check_labels(dataset, source.read(indices, seed=seed, epoch=epoch), indices, "train")


def read_eval_rows(dataset: Dataset, start: int, *, batch_size: int,
                   rows: slice) -> dict[str, np.ndarray]:
    """`rows` of the evaluation batch of images [start, start + batch_size), as host arrays;
    past the last image, rows repeat image 0 with `mask` False."""
    indices = np.arange(start, start + batch_size)
    mask = indices < len(dataset.eval)
    indices = np.where(mask, indices, 0)[rows]
    batch = _check_labels(dataset, dataset.eval.read(indices), indices, "eval")
    return {**batch, "mask": mask[rows]}


def _prefetched(make_batch: Callable[[int], dict], keys: Iterable[int]) -> Iterator[dict]:
    """make_batch(key) for each key, built PREFETCH_BATCHES ahead on a background thread."""
    keys = iter(keys)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lbsgd-batch") as builder:
        pending = collections.deque()
        try:
            while True:
                for key in itertools.islice(keys, PREFETCH_BATCHES + 1 - len(pending)):
                    pending.append(builder.submit(make_batch, key))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def train_batches(dataset: Dataset, mesh: Mesh, *, global_batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Every global training batch from `start_step` on, sharded over `mesh`."""
    rows = parallel.process_rows(global_batch_size, mesh)

    def batch(step: int) -> dict[str, jax.Array]:
        return parallel.global_batch(read_train_rows(
            dataset, step, global_batch_size=global_batch_size, seed=seed, rows=rows), mesh)

    return _prefetched(batch, itertools.count(start_step))


def eval_batches(dataset: Dataset, mesh: Mesh, *,
                 batch_size: int) -> Iterator[dict[str, jax.Array]]:
    """Every evaluation image exactly once: the last batch is padded and masked, not dropped."""
    rows = parallel.process_rows(batch_size, mesh)

    def batch(start: int) -> dict[str, jax.Array]:
        return parallel.global_batch(
            read_eval_rows(dataset, start, batch_size=batch_size, rows=rows), mesh)

    return _prefetched(batch, range(0, len(dataset.eval), batch_size))
