"""What a train step sends between devices: every collective of the compiled 8-device program.

Why: the paper's data parallelism sends one thing per step, the gradient all-reduce (Sec. 4),
and its BatchNorm nothing, each worker normalizing its own n images (Sec. 2.3). This lists
each collective of lbsgd's step and of train_step.py's baselines (`baseline`: per-device BN,
`baseline_global_bn`: synchronized BN) with its bytes, and totals them into gradient, metric
scalars and BatchNorm, with what else the program runs (kernels, cuDNN calls, transposes,
temporary memory: lbsgd/hlo.py's summary). Results: benchmarks/README.md, section 2.

The program is the GPU one, compiled for 8 H100s without a GPU (`--program h100`, the default
where JAX's CUDA plugin is installed: lbsgd/deviceless.py), the TPU one, compiled for 8 v5e
chips without a TPU (`--program v5e`, where libtpu is installed), or the CPU one (`--program
cpu`, the default otherwise; 8 devices simulated unless XLA_FLAGS names a count). Each JSON object
says which ("program"). Bytes of collectives depend on neither image size nor batch.

    python -m benchmarks.comm                         # ResNet-50, float32, all three steps
    python -m benchmarks.comm --dtype bfloat16 --variants lbsgd --no_list
"""
# ruff: noqa: E402 - XLA_FLAGS and JAX_PLATFORMS must be set before JAX is imported.

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# Only compiles: no GPU is used even where there is one. With the CPU platform alone, the CUDA
# plugin registers without checking CUDA's libraries, which a deviceless compile never loads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import collections
import json
import math
import time

import jax

from benchmarks import common
from benchmarks.train_step import make_baseline
from lbsgd import deviceless, hlo, train

VARIANTS = ("lbsgd", "baseline", "baseline_global_bn")
HLO_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def attribute(collectives: list[dict], params, reduce_dtype: str | None = None) -> dict:
    """Split the bytes: the gradient is the all-reduced tensors that match the parameter shapes
    (in `reduce_dtype`, default the parameters' own: config.grad_reduce_dtype) one for one, the
    metrics the rank-0 tensors, and the rest is charged to BatchNorm, the only other state or
    computation that spans devices here (README, section 2, has the caveat)."""

    def key(dtype: str, shape) -> tuple:  # up to size-1 axes and axis order: XLA may reduce
        return dtype, tuple(sorted(d for d in shape if d != 1))  # [C] as [1, 1, C], transpose

    wanted = collections.Counter(key(HLO_DTYPE[reduce_dtype or x.dtype.name], x.shape)
                                 for x in jax.tree.leaves(params))
    gradient = scalars = other = 0
    for c in collectives:
        for t in c.get("parts", c["tensors"]):  # a GPU reduces small tensors concatenated
            if not t["shape"]:
                scalars += t["bytes"]
            elif c["op"] == "all-reduce" and wanted[key(t["dtype"], t["shape"])] > 0:
                wanted[key(t["dtype"], t["shape"])] -= 1
                gradient += t["bytes"]
            else:
                other += t["bytes"]
    return {"gradient_allreduce_bytes": gradient, "scalar_bytes": scalars,
            "batchnorm_bytes": other, "unmatched_params": sum(wanted.values())}


def gpu_experiment(args) -> tuple[train.Experiment, dict]:
    """common.experiment's run on --devices GPUs (TPU chips) of the --program target, and an
    abstract batch: nothing is allocated, everything is compiled for the GPU (TPU)."""
    ex = train.setup(common.step_config(args, args.devices),
                     deviceless.target_mesh(args.program, args.devices))
    return ex, deviceless.abstract_batch(ex)


def main() -> None:
    parser = common.parser(__doc__)
    common.add_step_arguments(parser, model="resnet50", image_size=64, devices=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--program", choices=["cpu", *deviceless.TARGETS],
                        default="h100" if deviceless.plugin_installed() else "cpu",
                        help="compile for this GPU (TPU) without one, or for this host's "
                        "devices")
    parser.add_argument("--no_list", action="store_true",
                        help="print only the totals, not every collective")
    args = parser.parse_args()
    gpu = args.program in deviceless.TARGETS
    ex, batch = gpu_experiment(args) if gpu else common.experiment(args)
    devices = list(ex.mesh.devices.flat)
    program = (f"deviceless {deviceless.TARGETS[args.program][2]}" if gpu
               else devices[0].platform)
    for variant in args.variants:
        init, step = ((ex.init_state, ex.train_step) if variant == "lbsgd" else
                      make_baseline(ex, global_bn=variant == "baseline_global_bn"))
        state = jax.eval_shape(init)  # shapes and shardings: all that compiling needs
        start = time.perf_counter()
        compiled = (deviceless.compile_for_target(step, state, batch, target=args.program) if gpu
                    else step.lower(state, batch).compile())
        compile_s = time.perf_counter() - start
        collectives = hlo.parse_collectives(compiled.as_text())
        if not args.no_list:
            for c in collectives:
                print(json.dumps({"record": "collective", "program": program,
                                  "variant": variant, **c}), flush=True)
        split, params = attribute(collectives, state.params), common.param_size(state.params)
        summary = deviceless.summarize(compiled, state.params, args.per_device_batch)
        print(json.dumps({
            "record": "totals", "program": program, "variant": variant,
            **{key: getattr(args, key) for key in common.STEP_FIELDS}, **params,
            "param_dtypes": sorted({x.dtype.name for x in jax.tree.leaves(state.params)}),
            "batch_stats_bytes_per_device": sum(  # what one device holds of them
                math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                for x in jax.tree.leaves(state.batch_stats)),
            "collective_instructions": len(collectives),
            "collective_ops": dict(collections.Counter(c["op"] for c in collectives)),
            "collective_bytes": sum(c["bytes"] for c in collectives),
            "collective_dtypes": sorted({t["dtype"] for c in collectives
                                         for t in c.get("parts", c["tensors"]) if t["shape"]}),
            **split,
            "gradient_equals_param_bytes": split["gradient_allreduce_bytes"]
            == params["param_bytes"],
            "compile_s": round(compile_s, 1),
            **{key: value for key, value in summary.items() if key != "collectives"},
            **common.environment(devices)}), flush=True)


if __name__ == "__main__":
    main()
