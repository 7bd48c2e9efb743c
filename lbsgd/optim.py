"""The optimizer of Goyal et al. 2017, Sec. 2, written as optax transformations.

Everything the paper changes about SGD when the minibatch grows from n to kn lives here:
the linear scaling rule (Sec. 2.1), warmup (Sec. 2.2), the step decay of Sec. 5.1, weight
decay added to the gradient (Remark 1) but not on BatchNorm's gamma/beta (Sec. 5.1), and the
two momentum forms, eq. (9) and eq. (10) with the momentum correction of Remark 2.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

WARMUPS = ("gradual", "constant", "none")
MOMENTUM_FORMS = ("eq9", "eq10")
NO_DECAY_KEYS = ("gamma", "beta")

Schedule = Callable[[Any], jax.Array]


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule (Sec. 2.1): lr = base_lr * kn / 256.

    The paper's reference is eta = 0.1 for kn = 256 (Sec. 5.1); multiplying the minibatch by k
    multiplies the learning rate by k.
    """
    return base_lr * global_batch_size / 256


def _warmup(kind: str, base: float, target: float, warmup_steps: int) -> Callable:
    """The warmup phase of Sec. 2.2 as a function of the int32 step t."""
    if kind == "gradual":
        # Ramp from base at t = 0 to exactly target at t = W - 1 (see learning_rate_schedule).
        denom = max(warmup_steps - 1, 1)

        def gradual(t):
            ramp = base + (target - base) * (t.astype(jnp.float32) / denom)
            return jnp.where(t < warmup_steps - 1, ramp, target)

        return gradual
    if kind == "constant":
        return lambda t: jnp.where(t < warmup_steps, base, target)
    if kind == "none":
        return lambda t: jnp.full((), target, jnp.float32)
    raise ValueError(f"config.warmup must be one of {WARMUPS}, got {kind!r}")


def learning_rate_schedule(config, steps_per_epoch: int) -> Schedule:
    """The learning rate for update t (0-indexed: t updates were already applied).

    With S = steps_per_epoch, target = kn/256 * base_lr (Sec. 2.1) and
    W = round(warmup_epochs * S):

    * "gradual" (Sec. 2.2): lr(t) = base_lr + (target - base_lr) * t / (W - 1) for t < W.
      The paper starts "from a learning rate of eta and increment[s] it by a constant amount
      at each iteration such that it reaches kn/256 * eta after 5 epochs". We read "after
      5 epochs" as: the last update of the warmup, t = W - 1, uses the target. So the ramp
      begins at base_lr, has W - 1 equal increments, and e.g. kn = 512 with one warmup epoch
      uses 0.2 for the update that ends epoch 1. Dividing by W instead would reach the target
      only at t = W, i.e. after the warmup. W <= 1 leaves no room for a ramp: target from 0.
    * "constant" (Sec. 2.2, the Table 1 ablation): base_lr for t < W, then the target.
    * "none": the target from t = 0.

    Warmup starts from min(base_lr, target): with kn < 256 the target is below base_lr, and a
    warmup must never run faster than the rate it leads to (it would ramp *down*); there,
    both warmups are the target throughout, i.e. no warmup, as the paper needs none.

    On top of that, the step decay of Sec. 5.1 multiplies by lr_decay_factor once for every
    epoch e in lr_decay_epochs with t >= round(e * S) (x0.1 at epochs 30, 60 and 80).

    The returned function is pure jnp, so it accepts Python ints and traced int32 scalars
    (inside jax.jit and optax) alike, and returns a float32 scalar.
    """
    target = float(scaled_learning_rate(config.base_lr, config.global_batch_size))
    base = min(float(config.base_lr), target)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    warmup = _warmup(config.warmup, base, target, warmup_steps)
    # Epoch e starts at update e * S; rounded like W, so fractional epochs stay well defined.
    boundaries = [round(e * steps_per_epoch) for e in config.lr_decay_epochs]
    factor = float(config.lr_decay_factor)
    # factor ** k computed once in float64, indexed by the number of decays passed.
    multipliers = [factor**k for k in range(len(boundaries) + 1)]

    def schedule(step) -> jax.Array:
        t = jnp.asarray(step).astype(jnp.int32)
        num_decays = jnp.sum(t >= jnp.asarray(boundaries, jnp.int32).reshape(-1))
        multiplier = jnp.asarray(multipliers, jnp.float32)[num_decays]
        return (warmup(t) * multiplier).astype(jnp.float32)

    return schedule


def _last_dict_key(path) -> Any:
    keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return keys[-1] if keys else None


def weight_decay_mask(params):
    """True where weight decay applies: every leaf except BatchNorm's gamma and beta.

    Sec. 5.1: "we do not apply weight decay on the learnable BN coefficients". A leaf counts as
    a BN coefficient when the last dict key of its path is "gamma" or "beta". On nested dicts
    that is the last path key; taking the last *dict* key also covers an nnx.State, whose
    leaves sit one attribute (".value") below the parameter's name.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _last_dict_key(path) not in NO_DECAY_KEYS, params
    )


class MomentumEq10State(NamedTuple):
    """State of `momentum_eq10`: update count, velocity v and the rate of the last update."""

    count: jax.Array
    velocity: Any
    prev_lr: jax.Array


def momentum_eq10(
    momentum: float, learning_rate_fn: Schedule, correction: bool = True
) -> optax.GradientTransformation:
    """Momentum SGD in the form of eq. (10): v <- m * c_t * v + lr_t * g, w <- w - v.

    Eq. (10) folds the learning rate into the velocity, v_t = lr_t * u_t, where u is the
    velocity of eq. (9) (u <- m u + g, w <- w - lr_t u). The two are the same only while the
    rate is constant: when lr changes, v still carries the old rate. Remark 2's "momentum
    correction" multiplies v by c_t = lr_t / lr_{t-1}, which gives
    m * (lr_t / lr_{t-1}) * lr_{t-1} u_{t-1} + lr_t g = lr_t (m u_{t-1} + g) = lr_t u_t,
    so with the correction this is algebraically identical to eq. (9). With
    `correction=False` (c_t = 1) it differs from eq. (9) whenever the rate changes, e.g.
    during warmup and after each decay. c_t = 1 on the first update, where there is no
    lr_{t-1} (stored as 0), and whenever lr_{t-1} is 0.

    lr_t = learning_rate_fn(count), count being the number of updates already applied.
    """

    def init_fn(params):
        return MomentumEq10State(
            count=jnp.zeros((), jnp.int32),
            velocity=jax.tree.map(jnp.zeros_like, params),
            prev_lr=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        del params
        lr = jnp.asarray(learning_rate_fn(state.count), jnp.float32)

        def step(g, v):
            # The ratio is taken in the buffer's dtype so float64 runs stay exact.
            lr_t, lr_prev = lr.astype(v.dtype), state.prev_lr.astype(v.dtype)
            if correction:
                safe_prev = jnp.where(lr_prev == 0, 1, lr_prev)
                c = jnp.where(lr_prev == 0, 1, lr_t / safe_prev)
            else:
                c = 1
            return momentum * c * v + lr_t * g

        velocity = jax.tree.map(step, updates, state.velocity)
        new_updates = jax.tree.map(lambda v, g: (-v).astype(g.dtype), velocity, updates)
        new_state = MomentumEq10State(
            count=optax.safe_int32_increment(state.count), velocity=velocity, prev_lr=lr
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config, learning_rate_fn: Schedule) -> optax.GradientTransformation:
    """SGD with momentum and weight decay as in Sec. 2 and 5.1.

    Weight decay is a term of the loss, so its gradient lambda * w is added to the data
    gradient before momentum, g + lambda * w (Remark 1: it is not folded into the loss scale
    or the learning rate), skipping BN's gamma/beta (Sec. 5.1). Then momentum as eq. (9)
    (u <- m u + g, w <- w - lr_t u) or as eq. (10). `learning_rate_fn` is the run's one
    schedule (`learning_rate_schedule`), indexed by optax's update count, which starts at 0:
    update t uses learning_rate_fn(t), the rate the metrics report for that step.
    """
    decay = optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask)
    if config.momentum_form == "eq9":
        return optax.chain(
            decay,
            optax.trace(decay=config.momentum, nesterov=False),
            optax.scale_by_learning_rate(learning_rate_fn),
        )
    if config.momentum_form == "eq10":
        return optax.chain(
            decay, momentum_eq10(config.momentum, learning_rate_fn, config.momentum_correction)
        )
    raise ValueError(
        f"config.momentum_form must be one of {MOMENTUM_FORMS}, got {config.momentum_form!r}"
    )
