"""Golden values: one and five steps of a small ResNet on fixed data and seed.

The equivalence tests compare two formulations run by the same JAX, so a change of numerics
that moves both alike (an XLA or Flax upgrade, a refactor that reorders a reduction, a changed
initializer) passes them. These values were recorded with JAX 0.10.2 / Flax 0.12.8 on x86-64
CPU; a failure means the numbers of a run changed: find out why before updating them.
"""

import jax
import numpy as np
import optax
import pytest

from lbsgd import parallel, train
from tests.helpers import tiny_config

# (loss reported by the step, global L2 norm of the parameters after it), per step.
GOLDEN = {
    "float32": {1: (2.3081657886505127, 25.899248123168945),
                5: (2.3055317401885986, 25.8988037109375)},
}


def _trajectory(dtype: str) -> dict[int, tuple[float, float]]:
    """cifar_resnet8 on the real MNIST digits of the demo: kn = 64, 8 workers of n = 8, the
    paper's optimizer (eq. (9), weight decay, lr 0.1 x 64 / 256)."""
    config = tiny_config(warmup="none", dtype=dtype, seed=7)
    ex = train.setup(config, parallel.make_mesh())
    state, batches, values = ex.init_state(), ex.train_batches(), {}
    for step in range(1, 6):
        state, metrics = ex.train_step(state, next(batches))
        values[step] = (float(metrics["loss"]), float(optax.tree.norm(state.params)))
    return values


@pytest.mark.parametrize("dtype", sorted(GOLDEN))
def test_one_and_five_steps_give_the_recorded_loss_and_parameter_norm(dtype):
    assert jax.device_count() == 8  # the values are those of the 8-device program
    values = _trajectory(dtype)
    for step, (loss, norm) in GOLDEN[dtype].items():
        np.testing.assert_allclose(values[step], (loss, norm), rtol=1e-6, err_msg=f"step {step}")
    assert values[5] != values[1]  # the five steps really moved the weights
