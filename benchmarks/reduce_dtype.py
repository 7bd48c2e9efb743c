"""What a bfloat16 gradient all-reduce does to the update: the first steps of one run with
`grad_reduce_dtype=float32` and with `bfloat16`, same data, and the relative L2 difference of
each step's parameter update, as one JSON object.

Why: bf16 halves the bytes of the one collective (README, "Precision"), at the price of
rounding each device's summed gradient to 8 significant bits. Whether that matters is a
comparison with the noise SGD already has: a minibatch gradient's own sampling error is
sqrt(B_simple / kn) of its norm (lbsgd/noise_scale.py), tens of percent at the batch sizes we
run. On a CPU the rounding is all there is (XLA:CPU sums bf16 all-reduces in float32); on GPUs
the partial sums are bf16 too, which this does not capture.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.reduce_dtype
        # Fashion-MNIST's ResNet-8 (the Debian files or a prepared copy), kn = 256, 3 steps
"""

import json

import jax
import numpy as np

from benchmarks import common
from configs import fashion_mnist
from lbsgd import train


def updates(config, steps: int) -> list[np.ndarray]:
    """Each of the first `steps` updates of a run of `config`, all parameters flattened."""
    ex = train.setup(config)
    batches, state, result = ex.train_batches(0), ex.init_state(), []
    for _ in range(steps):
        before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])
        state, _ = ex.train_step(state, next(batches))
        after = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])
        result.append(after - before)
    return result


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--global_batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    by_dtype = {}
    for dtype in ("float32", "bfloat16"):
        config = fashion_mnist.get_config()
        config.global_batch_size, config.grad_reduce_dtype = args.global_batch_size, dtype
        by_dtype[dtype] = updates(config, args.steps)
    errors = [float(np.linalg.norm(b - f) / np.linalg.norm(f))
              for f, b in zip(by_dtype["float32"], by_dtype["bfloat16"], strict=True)]
    print(json.dumps({"benchmark": "reduce_dtype", "config": "configs/fashion_mnist.py",
                      "global_batch_size": args.global_batch_size,
                      "update_relative_l2_difference": errors,
                      **common.environment(jax.devices())}), flush=True)


if __name__ == "__main__":
    main()
