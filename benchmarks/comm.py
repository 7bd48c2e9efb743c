"""What a train step sends between devices: every collective of the compiled 8-device program.

Why: the paper's data parallelism communicates one thing per step, the gradient all-reduce
(Goyal et al. 2017, Sec. 4), and its BatchNorm nothing, as each worker normalizes its own
n = 32 images (Sec. 2.3). This compiles lbsgd's step for 8 devices, reads the optimized HLO
(`lbsgd.hlo.parse_collectives`), lists each collective with dtype, shape and bytes, and totals
them: gradient all-reduce against parameter bytes, and BatchNorm's bytes (expected 0). The same
for train_step.py's baselines: `baseline` (per-device BN in `shard_map`, whose replicated
running statistics must be `pmean`-ed every step) and `baseline_global_bn` (plain `jax.jit` on
the sharded batch: synchronized BN). benchmarks/README.md, section 2, has the results.

Attribution: the gradient is the all-reduced tensors that match the parameter shapes one for
one, the metrics are the rank-0 tensors, and the rest is charged to BatchNorm, the only other
state or computation that spans devices here. (XLA reduces identical gradients once, e.g. the
betas of a block's last BN and its shortcut BN; a running statistic of that shape then takes
their place in the matching, so the baseline's BN bytes come out smaller by those betas.)

Only CPU is needed: unless XLA_FLAGS names a device count, 8 devices are simulated. Bytes do not
depend on image size or batch, so the default compiles at 64 px. JSON lines: one per collective
(`"record": "collective"`), one total per step (`"record": "totals"`).

    python -m benchmarks.comm                         # ResNet-50, float32, all three steps
    python -m benchmarks.comm --dtype bfloat16        # gradients are still float32
    python -m benchmarks.comm --model cifar_resnet8 --image_size 16 --per_device_batch 8 \\
        --bn_group_size 8 --num_classes 10            # seconds
"""
# ruff: noqa: E402 - XLA_FLAGS must be set before JAX is imported.

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import collections
import json
import math

import jax

from benchmarks import common
from benchmarks import train_step as ts
from lbsgd import train
from lbsgd.hlo import parse_collectives

VARIANTS = ("lbsgd", "baseline", "baseline_global_bn")
HLO_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def _key(dtype: str, shape) -> tuple:
    """Shape identity up to size-1 axes and axis order: XLA may reduce a [C] gradient as
    [1, 1, 1, C], or an FC kernel's [in, out] gradient transposed."""
    return dtype, tuple(sorted(int(d) for d in shape if d != 1))


def attribute(collectives: list[dict], params) -> dict:
    """Split the collective bytes into gradient, metric scalars and BatchNorm (the rest)."""
    wanted = collections.Counter(_key(HLO_DTYPE[x.dtype.name], x.shape)
                                 for x in jax.tree.leaves(params))
    gradient = scalars = other = 0
    for c in collectives:
        for t in c["tensors"]:
            key = _key(t["dtype"], t["shape"])
            if not t["shape"]:
                scalars += t["bytes"]
            elif c["op"] == "all-reduce" and wanted[key] > 0:
                wanted[key] -= 1
                gradient += t["bytes"]
            else:
                other += t["bytes"]
    return {"gradient_allreduce_bytes": gradient, "scalar_bytes": scalars,
            "batchnorm_bytes": other, "unmatched_params": sum(wanted.values())}


def compile_variant(variant: str, ex: train.Experiment, batch: dict):
    """(compiled step, its state): lbsgd's as a run builds it; a baseline's only as shapes and
    shardings, which is all that compiling needs."""
    if variant == "lbsgd":
        state, step = ex.init_state(), ex.train_step
    else:
        init, step = ts.make_baseline(ex.config, ex.dataset, ex.mesh,
                                      global_bn=variant == "baseline_global_bn")
        state = jax.eval_shape(init)
    return step.lower(state, batch).compile(), state


def totals(variant: str, args, state, collectives: list[dict]) -> dict:
    """One step's collectives summed, and split into gradient, metrics and BatchNorm."""
    split = attribute(collectives, state.params)
    params = common.param_size(state.params)
    return {
        "record": "totals", "variant": variant, **common.step_fields(args), **params,
        "param_dtypes": sorted({x.dtype.name for x in jax.tree.leaves(state.params)}),
        "batch_stats_bytes_per_device": sum(  # what one device holds of them
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(state.batch_stats)),
        "collective_instructions": len(collectives),
        "collective_ops": dict(collections.Counter(c["op"] for c in collectives)),
        "collective_bytes": sum(c["bytes"] for c in collectives),
        "collective_dtypes": sorted({t["dtype"] for c in collectives for t in c["tensors"]
                                     if t["shape"]}),
        **split,
        "gradient_equals_param_bytes": split["gradient_allreduce_bytes"] == params["param_bytes"],
    }


def main(argv=None) -> None:
    parser = common.argument_parser(__doc__)
    common.add_step_arguments(parser, model="resnet50", image_size=64, many=False, devices=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no_list", action="store_true",
                        help="print only the totals, not every collective")
    args = parser.parse_args(argv)
    load_before = common.load_average()
    mesh = common.mesh_of(args.devices)
    ex = train.setup(ts.lbsgd_config(args, mesh), mesh)
    batch = next(ex.train_batches())
    for variant in args.variants:
        compiled, state = compile_variant(variant, ex, batch)
        collectives = parse_collectives(compiled.as_text())
        if not args.no_list:
            for c in collectives:
                print(json.dumps({"record": "collective", "variant": variant, **c}), flush=True)
        row = {**totals(variant, args, state, collectives),
               **common.environment(list(mesh.devices.flat), load_before)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
