"""lbsgd: the large-minibatch SGD recipe of Goyal et al. 2017 in JAX/Flax (docs/design.md)."""


def hide_gpus_from_tensorflow():
    """Import TensorFlow with no GPU visible to it, and return it (None if not installed).

    TensorFlow comes in with TFDS and clu's TensorBoard writer, for files only; left alone, its
    runtime would take nearly all of every GPU's memory at its first op, memory that JAX needs.
    Which devices TF sees can only be chosen before that first op, so lbsgd/metrics.py (the
    module through which every training or benchmark process imports TF), lbsgd.cli.run and
    the dataset preparation command call this first. Called after TF's runtime has started on
    a machine with GPUs, TF refuses: that is an error, not something to carry on from.
    """
    try:
        import tensorflow as tf
    except ModuleNotFoundError as error:
        if error.name != "tensorflow":
            raise  # installed but broken: say so, not train without TensorBoard
        return None  # not installed (the lent GPU machines): nothing to hide the GPUs from
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:
        raise RuntimeError(
            "TensorFlow ran an op before lbsgd could hide the GPUs from it; import lbsgd (e.g. "
            "lbsgd.train) before using TensorFlow or TFDS in the same process") from error
    return tf
