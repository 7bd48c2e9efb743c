"""The data contract of Remark 4: one global permutation per epoch, each image once per epoch."""

import numpy as np

from lbsgd import input_pipeline
from tests.helpers import tiny_config


def _indices(step, n=1000, kn=96, seed=0):
    return input_pipeline.train_indices(step, num_examples=n, global_batch_size=kn, seed=seed)


def test_each_epoch_is_one_permutation_divided_into_batches():
    n, kn = 1000, 96
    steps = n // kn  # 10: the last 40 images of each permutation are dropped
    for epoch in range(3):
        seen = np.concatenate([_indices(epoch * steps + t) for t in range(steps)])
        assert len(seen) == steps * kn == len(np.unique(seen))
        expected = np.random.default_rng([0, epoch]).permutation(n)[:steps * kn]
        np.testing.assert_array_equal(seen, expected)
    assert not np.array_equal(_indices(0), _indices(steps))  # a new permutation every epoch
    assert not np.array_equal(_indices(0, seed=0), _indices(0, seed=1))


def test_process_slices_reassemble_the_global_batch():
    """Whatever the number of processes, their contiguous slices are the same global batch."""
    batch = _indices(7)
    for processes in (1, 2, 4, 8):
        per = len(batch) // processes
        parts = [batch[slice(p * per, (p + 1) * per)] for p in range(processes)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)


def _in_memory(images, labels):
    split = input_pipeline.ArraySource(images, labels)
    return input_pipeline.Dataset("test", train=split, eval=split, num_classes=1000,
                                  mean=(0.0,), std=(1.0,), image_shape=images.shape[1:])


def test_resuming_at_a_step_gives_the_same_batches():
    dataset = _in_memory(np.zeros((1000, 1, 1, 1), np.uint8), np.arange(1000, dtype=np.int32))
    kwargs = dict(global_batch_size=96, seed=3, rows=slice(0, 96))
    straight = input_pipeline.train_batches(dataset, **kwargs)
    batches = [next(straight) for _ in range(15)]
    resumed = input_pipeline.train_batches(dataset, start_step=12, **kwargs)
    for expected in batches[12:]:
        np.testing.assert_array_equal(next(resumed)["label"], expected["label"])


def test_eval_covers_every_image_exactly_once():
    n, batch_size = 1000, 96  # 10 full batches and a last one padded from 40 to 96
    dataset = _in_memory(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n, dtype=np.int32))
    labels, masks = [], []
    for half in (slice(0, 48), slice(48, 96)):  # two processes' rows
        batches = list(input_pipeline.eval_batches(dataset, batch_size=batch_size, rows=half))
        assert all(len(b["label"]) == 48 for b in batches)
        labels.append(np.concatenate([b["label"] for b in batches]))
        masks.append(np.concatenate([b["mask"] for b in batches]))
    real = np.concatenate([lab[m] for lab, m in zip(labels, masks, strict=True)])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))


def test_demo_dataset_is_the_real_mnist_subset():
    dataset = input_pipeline.load_dataset(tiny_config())
    assert dataset.image_shape == (28, 28, 1)
    assert (len(dataset.train), len(dataset.eval)) == (4000, 1000)
    for split in (dataset.train, dataset.eval):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        counts = np.bincount(split.labels, minlength=10)
        assert (counts == counts[0]).all()  # balanced: 400 / 100 per digit
    assert 25 < dataset.mean[0] < 45 and 70 < dataset.std[0] < 90  # MNIST's ~33 and ~79
