"""ResNet architecture, initialization (Goyal et al. Sec. 5.1) and forward passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lbsgd.models import MODEL_NAMES, GroupedBatchNorm, create_model, grouped_norm, pooling
from lbsgd.models.resnet import BasicBlock, Bottleneck


def _num_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _modules(model, cls):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, cls)]


@pytest.fixture(scope="session")
def resnet50():
    # bn_group_size=2 so the same instance can run tiny batches.
    return create_model("resnet50", num_classes=1000, norm=grouped_norm(group_size=2))


# Published counts for 1000 classes (torchvision / fb.resnet.torch; BN gamma/beta included).
@pytest.mark.parametrize(
    "name,count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_parameter_counts(name, count):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000))
    assert _num_params(model) == count


def test_model_names():
    assert set(MODEL_NAMES) == {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56",
    }  # fmt: skip


@pytest.mark.parametrize("name,blocks", [("cifar_resnet8", 3), ("cifar_resnet56", 27)])
def test_cifar_depth(name, blocks):
    # 6n + 2 layers: stem conv, 2 convs per basic block, FC (projection convs not counted).
    model = nnx.eval_shape(lambda: create_model(name, num_classes=10))
    assert len(_modules(model, BasicBlock)) == blocks
    convs = [m for m in _modules(model, nnx.Conv) if m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 6 * (blocks // 3) + 2
    assert model.fc.kernel.shape == (64, 10)


def test_bottleneck_stride_on_3x3(resnet50):
    # fb.resnet.torch (Sec. 5.1, ref. [12]): the stride sits on the 3x3 conv, and on the
    # projection shortcut; the 1x1 convs are never strided.
    first_of_stage = [resnet50.blocks[i] for i in (3, 7, 13)]
    for block in first_of_stage:
        assert block.conv1.strides == 1 and block.conv3.strides == 1
        assert block.conv2.strides == 2 and block.conv2.kernel_size == (3, 3)
        assert block.shortcut.conv.strides == 2
    stem = resnet50.stem_conv
    assert stem.strides == 2 and stem.padding == ((3, 3), (3, 3))


def test_param_names_gamma_beta_only_in_bn(resnet50):
    # The optimizer skips weight decay on exactly the leaves named gamma/beta.
    bn_ids = {id(bn.gamma) for bn in _modules(resnet50, GroupedBatchNorm)}
    bn_ids |= {id(bn.beta) for bn in _modules(resnet50, GroupedBatchNorm)}
    for path, var in nnx.iter_graph(resnet50):
        if isinstance(var, nnx.Param) and path[-1] in ("gamma", "beta"):
            assert id(var) in bn_ids, path
    assert len(bn_ids) == 2 * len(_modules(resnet50, GroupedBatchNorm))


def test_conv_init_is_msra_fan_out_normal(resnet50):
    big = [c for c in _modules(resnet50, nnx.Conv) if c.kernel.size >= 500_000]
    assert len(big) >= 5
    for conv in big:
        w = np.asarray(conv.kernel[...])
        kh, kw, _, cout = w.shape
        std = np.sqrt(2.0 / (kh * kw * cout))
        assert abs(w.std() / std - 1.0) < 0.1
        assert abs(w.mean()) < 0.05 * std
        # A plain normal has ~4.55% of its mass beyond 2 std; a truncated one has none.
        assert 0.04 < np.mean(np.abs(w) > 2 * std) < 0.051
    stem = np.asarray(resnet50.stem_conv.kernel[...])
    assert stem.shape == (7, 7, 3, 64)
    assert abs(stem.std() / np.sqrt(2.0 / (7 * 7 * 64)) - 1.0) < 0.1


def test_last_bn_gamma_zero_in_every_block(resnet50):
    blocks = _modules(resnet50, Bottleneck)
    assert len(blocks) == 16
    last_bns = {id(b.bn3) for b in blocks}
    zero = 0
    for bn in _modules(resnet50, GroupedBatchNorm):
        gamma = np.asarray(bn.gamma[...])
        np.testing.assert_array_equal(np.asarray(bn.beta[...]), 0.0)
        if id(bn) in last_bns:
            np.testing.assert_array_equal(gamma, 0.0)
            zero += 1
        else:
            np.testing.assert_array_equal(gamma, 1.0)
    assert zero == 16
    # Projection-shortcut BNs start at 1 (there are 4: one per stage).
    proj = [b.shortcut.bn for b in blocks if b.shortcut.project]
    assert len(proj) == 4
    assert all(np.all(np.asarray(bn.gamma[...]) == 1.0) for bn in proj)


def test_identity_block_starts_as_identity(resnet50):
    # With the last gamma at 0 and beta at 0, an identity-shortcut block maps x >= 0 to x.
    block = resnet50.blocks[1]
    assert not block.shortcut.project
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 4, 4, 256)))
    np.testing.assert_allclose(np.asarray(block(x, train=True)), np.asarray(x), atol=1e-6)


def test_fc_init(resnet50):
    w = np.asarray(resnet50.fc.kernel[...])
    assert w.shape == (2048, 1000)
    assert abs(w.std() - 0.01) < 0.0005
    np.testing.assert_array_equal(np.asarray(resnet50.fc.bias[...]), 0.0)


def _forward(model, x, train):
    return nnx.jit(lambda m, x: m(x, train=train))(model, x)


def test_resnet50_forward_small():
    model = create_model("resnet50", num_classes=10, norm=grouped_norm(group_size=2, num_groups=2))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    logits = _forward(model, x, train=True)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    # Training updated every worker's row of the running statistics; eval uses them.
    stem_mean = np.asarray(model.stem_bn.mean[...])
    assert stem_mean.shape == (2, 64)
    assert not np.allclose(stem_mean[0], 0.0) and not np.allclose(stem_mean[1], 0.0)
    assert not np.allclose(stem_mean[0], stem_mean[1])
    logits_eval = _forward(model, x[:3], train=False)  # eval takes any batch size
    assert logits_eval.shape == (3, 10) and np.all(np.isfinite(np.asarray(logits_eval)))


def test_cifar_resnet20_mnist_shape():
    model = create_model(
        "cifar_resnet20", num_classes=10, in_channels=1,
        norm=grouped_norm(group_size=4, num_groups=2)
    )
    x = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
    for train in (True, False):
        logits = _forward(model, x, train)
        assert logits.shape == (8, 10) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("batch", [6, 4])
def test_wrong_training_batch_raises(batch):
    # Training needs exactly bn_group_size * bn_num_groups = 8 examples.
    model = create_model("cifar_resnet8", num_classes=10,
                         norm=grouped_norm(group_size=4, num_groups=2))
    with pytest.raises(ValueError, match=rf"^training batch of {batch} examples.*bn_group_size 4"):
        model(jnp.zeros((batch, 8, 8, 3)), train=True)


def test_bn_num_groups_reaches_every_bn():
    model = nnx.eval_shape(
        lambda: create_model("resnet18", num_classes=10,
                             norm=grouped_norm(group_size=8, num_groups=3))
    )
    bns = _modules(model, GroupedBatchNorm)
    assert len(bns) == 1 + 2 * 8 + 3  # stem, two per basic block, three projection shortcuts
    for bn in bns:
        assert bn.group_size == 8 and bn.num_groups == 3
        assert bn.mean.shape == bn.var.shape == (3, bn.num_features)
        assert bn.gamma.shape == (bn.num_features,)


def test_model_with_workers_is_independent_single_worker_models():
    # Per-worker BN (Sec. 5.1): in training, a model with G workers computes for each group
    # exactly what a one-worker model computes on that group alone, and row g of every
    # BN's running statistics is that one-worker model's statistics.
    kwargs = dict(num_classes=10, seed=5)
    multi = create_model("cifar_resnet8", norm=grouped_norm(group_size=2, num_groups=3), **kwargs)
    _randomize_bn_affine(multi, 1)
    x = jax.random.normal(jax.random.key(6), (6, 8, 8, 3))
    logits = np.asarray(_forward(multi, x, train=True))
    multi_bns = _modules(multi, GroupedBatchNorm)
    for g in range(3):
        single = create_model("cifar_resnet8", norm=grouped_norm(group_size=2), **kwargs)
        _randomize_bn_affine(single, 1)
        ref = np.asarray(_forward(single, x[2 * g : 2 * g + 2], train=True))
        np.testing.assert_allclose(logits[2 * g : 2 * g + 2], ref, rtol=1e-4, atol=1e-5)
        single_bns = _modules(single, GroupedBatchNorm)
        assert len(single_bns) == len(multi_bns)
        for bm, bs in zip(multi_bns, single_bns, strict=True):
            for stat in ("mean", "var"):
                got = np.asarray(getattr(bm, stat)[...])[g]
                want = np.asarray(getattr(bs, stat)[...])[0]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _randomize_bn_affine(model, seed):
    """Non-zero gammas/betas so every residual branch contributes to the logits."""
    rng = np.random.default_rng(seed)
    for bn in _modules(model, GroupedBatchNorm):
        bn.gamma[...] = jnp.asarray(rng.uniform(0.5, 1.5, bn.gamma.shape), jnp.float32)
        bn.beta[...] = jnp.asarray(rng.normal(0, 0.1, bn.beta.shape), jnp.float32)
    model.fc.kernel[...] = model.fc.kernel[...] * 100.0  # logits of order 1


def test_bfloat16_model_matches_float32():
    def build(dtype):
        return create_model("cifar_resnet20", num_classes=10, seed=3, dtype=dtype,
                            norm=grouped_norm(group_size=4, num_groups=2, dtype=dtype))

    f32, bf16 = build(jnp.float32), build("bfloat16")
    _randomize_bn_affine(f32, 0)
    _randomize_bn_affine(bf16, 0)
    params_f32 = nnx.state(f32, nnx.Param)
    params_bf16 = nnx.state(bf16, nnx.Param)
    for a, b in zip(jax.tree.leaves(params_f32), jax.tree.leaves(params_bf16), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    x = jax.random.normal(jax.random.key(4), (8, 16, 16, 3))
    # Activations really are bf16: the convolutions run on bf16 operands. (Eval mode, so
    # tracing does not write running statistics.)
    jaxpr = jax.make_jaxpr(lambda x: bf16(x, train=False))(x)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)

    ref = np.asarray(_forward(f32, x, train=True))
    out = _forward(bf16, x, train=True)
    assert out.dtype == jnp.float32
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, atol=0.05 * np.abs(ref).max() + 1e-3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*resnet50.*cifar_resnet20"):
        create_model("resnet51", num_classes=10)


def _select_and_scatter_pool(x, stride):
    """The stem's pool as XLA differentiates it: reduce-window max, select-and-scatter."""
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,stride", [((2, 9, 9, 3), 2), ((2, 15, 12, 5), 2),
                                          ((2, 10, 7, 3), 3)])
def test_max_pool_gradient_is_select_and_scatters_bit_for_bit(shape, stride, dtype):
    rng = np.random.default_rng(0)
    # Few distinct values after a ReLU: most windows hold tied maxima, many all zeros.
    tied = np.maximum(rng.integers(-3, 4, shape), 0) * 0.5
    for x in (jnp.asarray(tied, dtype), jnp.asarray(rng.standard_normal(shape), dtype)):
        y = _select_and_scatter_pool(x, stride)
        g = jnp.asarray(rng.standard_normal(y.shape), dtype)
        grads = [jax.jit(lambda x, g, f=f: jax.vjp(lambda x: f(x, stride), x)[1](g)[0])(x, g)
                 for f in (pooling.max_pool, _select_and_scatter_pool)]
        assert jnp.array_equal(pooling.max_pool(x, stride), y)
        assert grads[0].dtype == dtype
        np.testing.assert_array_equal(np.asarray(grads[0], np.float32),
                                      np.asarray(grads[1], np.float32))
    # The ties decide: a max that splits them (jnp.maximum's gradient) differs on them.
    x = jnp.asarray(tied, dtype)
    g = jnp.ones(_select_and_scatter_pool(x, stride).shape, dtype)
    split = jax.grad(lambda x: jnp.vdot(g, _max_of_views(x, stride)))(x)
    assert not jnp.array_equal(split, jax.grad(
        lambda x: jnp.vdot(g, pooling.max_pool(x, stride)))(x))


def _max_of_views(x, stride):
    """The same pool as a maximum of the 9 strided views, through jnp.maximum."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
    views = [padded[:, dh:dh + stride * (ho - 1) + 1:stride, dw:dw + stride * (wo - 1) + 1:stride]
             for dh, dw in pooling.OFFSETS]
    return functools.reduce(jnp.maximum, views)
