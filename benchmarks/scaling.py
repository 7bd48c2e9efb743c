"""Predicted step time and scaling efficiency of data-parallel SGD on 8 ... 1024 devices.

Why: the paper's large minibatch makes synchronous SGD scale (Goyal et al. 2017: ~90% from 8 to
256 P100s over 50 Gbit Ethernet). Whether it does is the ratio of two times: compute per step,
constant at n = 32 images per device, and the gradient all-reduce, which grows with the
devices. This combines a compute time with the gradient bytes (benchmarks.comm: 102,228,128 for
ResNet-50) under an explicit model, a stand-in for NCCL's choice among rings, trees and
halving-doubling (benchmarks/README.md, section 3):

* ring all-reduce of B bytes over p devices, bandwidth w, latency a per step:
  T = 2 (p - 1) / p * B / w + 2 (p - 1) * a;
* beyond a node of g devices (N = p / g nodes, network bandwidth W per node): the node's ring,
  then g concurrent rings across nodes on 1/g shards sharing W:
  T = 2 (g - 1) / g * B / w + 2 (g - 1) * a + 2 (N - 1) / N * B / W + 2 (N - 1) * A;
* TPU ICI: the per-chip all-reduce bandwidth, latency 2 * sum(d_i - 1) * a on a d1 x d2 x d3 torus;
* compute C = forward + backward, backward 2/3 of it. No overlap: C + T; ideal overlap of
  backward and all-reduce: C / 3 + max(2 C / 3, T). Efficiency = C / step time; the paper's
  "from 8" = step time on 8 / step time on p.

Compute: the paper's P100 backward pass of 120 ms for 32 images plus a forward pass assumed to
take half of it; other settings only a time measured on that device (--step_time_s or
--train_step_json), else "not yet measured". Bandwidths and latencies are nominal (SETTINGS).

    python -m benchmarks.scaling                              # table + benchmarks/scaling.png
    python -m benchmarks.scaling --comm_json comm.jsonl --train_step_json h100.jsonl
    python -m benchmarks.scaling --grad_bytes 102228128 --step_time_s 0.1 --plot ''
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from flax import nnx

from benchmarks import common
from lbsgd import models

GB = 1e9

# The paper's time for an hour of training: 90 epochs of floor(1,281,167 / 8192) = 156 steps.
PAPER_STEPS = 90 * (1_281_167 // 8192)
PAPER_STEP_S = 3600 / PAPER_STEPS  # ~0.256 s: "about an hour", everything included
PAPER_EFFICIENCY_8_TO_256 = 0.90  # "~90% scaling efficiency when moving from 8 to 256 GPUs"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    description: str
    devices_per_node: int  # g; the TPU torus has no nodes in this sense (0)
    intra_bw: float  # bytes/s per device for the ring in a node (TPU: all-reduce bw per chip)
    intra_latency: float  # s per ring step (TPU: per torus hop)
    inter_bw: float = 0.0  # bytes/s of network per node, shared by its g devices
    inter_latency: float = 0.0
    sources: str = ""


SETTINGS = (
    Setting(
        "paper_p100_50gbe",
        "Goyal et al.: 8 P100 per server (NVLink 1.0), 50 Gbit/s Ethernet between servers",
        devices_per_node=8, intra_bw=40 * GB, intra_latency=5e-6,
        inter_bw=50e9 / 8, inter_latency=25e-6,
        sources="P100 NVLink 1.0: 4 links x 20 GB/s per direction; the ring is assumed to get "
                "2 of them (40 GB/s). One 50 Gbit/s NIC per server (paper, Sec. 4) = 6.25 GB/s. "
                "Latencies 5 us (NVLink), 25 us (TCP over Ethernet): assumptions."),
    Setting(
        "h100_nvlink_ib",
        "8 H100 per node (NVLink 4), InfiniBand NDR 400 Gbit/s per GPU between nodes",
        devices_per_node=8, intra_bw=450 * GB, intra_latency=5e-6,
        inter_bw=8 * 50 * GB, inter_latency=5e-6,
        sources="H100 SXM NVLink: 900 GB/s bidirectional = 450 GB/s per direction; one "
                "ConnectX-7 NDR 400 Gbit/s (50 GB/s) per GPU, 8 per node. Latencies 5 us: "
                "assumptions. Achieved NCCL bus bandwidth is typically below these."),
    Setting(
        "tpu_v4_ici",
        "TPU v4, ICI 3D torus",
        devices_per_node=0, intra_bw=1.1e15 / 4096, intra_latency=1e-6,
        sources="Cloud TPU v4 docs: all-reduce bandwidth 1.1 PB/s per 4096-chip pod "
                "= 269 GB/s per chip. 1 us per hop: assumption."),
)


def ring_allreduce_s(nbytes: float, p: int, bw: float, latency: float) -> float:
    """Ring all-reduce: reduce-scatter + all-gather, 2 (p - 1) steps of B / p bytes."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / bw + 2 * (p - 1) * latency


def torus_dims(p: int) -> tuple[int, ...]:
    """A near-cubic d1 x d2 x d3 factorization of p (powers of two split evenly)."""
    dims = [1, 1, 1]
    while math.prod(dims) < p:
        i = dims.index(min(dims))
        dims[i] *= 2
    if math.prod(dims) != p:
        raise ValueError(f"{p} devices: the TPU model needs a power of two")
    return tuple(sorted(dims))


def allreduce_s(setting: Setting, nbytes: float, p: int) -> float:
    if setting.devices_per_node == 0:  # TPU torus
        hops = sum(d - 1 for d in torus_dims(p))
        return (2 * (p - 1) / p * nbytes / setting.intra_bw if p > 1 else 0.0) + \
            2 * hops * setting.intra_latency
    g = setting.devices_per_node
    if p <= g:
        return ring_allreduce_s(nbytes, p, setting.intra_bw, setting.intra_latency)
    if p % g:
        raise ValueError(f"{p} devices is not a whole number of {g}-device nodes")
    intra = ring_allreduce_s(nbytes, g, setting.intra_bw, setting.intra_latency)
    # Every device's ring carries B / g over its share W / g of the node's network: same time
    # as the whole B over W.
    inter = ring_allreduce_s(nbytes, p // g, setting.inter_bw, setting.inter_latency)
    return intra + inter


def step_s(compute_s: float, comm_s: float, overlap: bool) -> float:
    if not overlap:
        return compute_s + comm_s
    return compute_s / 3 + max(2 * compute_s / 3, comm_s)


def predict(setting: Setting, nbytes: float, devices: list[int], compute_s: float | None,
            compute_source: str) -> list[dict]:
    rows = []
    ref = {}  # step times at the smallest device count, for "efficiency from p0"
    for p in devices:
        comm = allreduce_s(setting, nbytes, p)
        row = {"record": "prediction", "setting": setting.name, "devices": p,
               "grad_bytes": nbytes, "allreduce_s": comm,
               "min_compute_s_for_90pct_no_overlap": 9 * comm,
               "compute_s": compute_s, "compute_source": compute_source}
        for overlap, tag in ((False, "no_overlap"), (True, "overlap")):
            if compute_s is None:
                row[f"step_s_{tag}"] = row[f"efficiency_{tag}"] = None
                row[f"efficiency_from_{devices[0]}_{tag}"] = None
                continue
            t = step_s(compute_s, comm, overlap)
            ref.setdefault(tag, t)
            row[f"step_s_{tag}"] = t
            row[f"efficiency_{tag}"] = compute_s / t
            row[f"efficiency_from_{devices[0]}_{tag}"] = ref[tag] / t
        rows.append(row)
    return rows


def param_bytes_of(model: str) -> int:
    """float32 gradient bytes = the parameter bytes of `model` (shapes only, no memory)."""
    abstract = nnx.eval_shape(lambda: models.create_model(model, num_classes=1000))
    return common.param_size(nnx.state(abstract, nnx.Param))["param_bytes"]


def read_json_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.lstrip().startswith("{")]


def gradient_bytes(args: argparse.Namespace) -> tuple[float, str]:
    """Bytes all-reduced per step, and where that number comes from."""
    if args.grad_bytes is not None:
        return args.grad_bytes, "--grad_bytes"
    if args.comm_json:
        totals = [r for r in read_json_lines(args.comm_json)
                  if r.get("record") == "totals" and r.get("variant") == "lbsgd"]
        if not totals:
            sys.exit(f"{args.comm_json}: no totals line of variant lbsgd from benchmarks.comm")
        return (totals[0]["gradient_allreduce_bytes"],
                f"comm.py: {totals[0]['model']} {totals[0]['dtype']}")
    return param_bytes_of(args.model), f"4 x parameters of {args.model}"


def compute_time(args: argparse.Namespace) -> tuple[float | None, str]:
    """The measured compute time per step for the non-paper settings, and its source."""
    if args.train_step_json:
        row = read_json_lines(args.train_step_json)[0]
        return row["lbsgd"]["step_time_median_s"], (
            f"train_step.py: {row['model']} {row['image_size']}px "
            f"{row['per_device_batch']}/device on {row['device_kind']}")
    if args.step_time_s is not None:
        return args.step_time_s, "--step_time_s"
    return None, "not yet measured"


def paper_comparison(rows: list[dict]) -> list[dict]:
    """The paper's own figures against the model's, when 8 and 256 devices were predicted."""
    paper = {r["devices"]: r for r in rows if r["setting"].startswith("paper")}
    if 8 not in paper or 256 not in paper:
        return []
    row = {"record": "paper_comparison"}
    for tag in ("no_overlap", "overlap"):
        row[f"predicted_step_s_256_{tag}"] = paper[256][f"step_s_{tag}"]
        row[f"predicted_efficiency_8_to_256_{tag}"] = (paper[8][f"step_s_{tag}"]
                                                       / paper[256][f"step_s_{tag}"])
        row[f"predicted_hours_90_epochs_{tag}"] = PAPER_STEPS * paper[256][f"step_s_{tag}"] / 3600
    return [{**row, "paper_step_s_from_one_hour": PAPER_STEP_S,
             "paper_efficiency_8_to_256": PAPER_EFFICIENCY_8_TO_256}]


def markdown(rows: list[dict], first: int) -> str:
    """One row per (setting, devices); "-" where the setting has no measured compute time."""

    def ms(x):
        return "-" if x is None else f"{1e3 * x:.1f}"

    def both(r, fmt, prefix):  # "no overlap / overlap"
        a, b = r[prefix + "no_overlap"], r[prefix + "overlap"]
        return "-" if a is None else f"{fmt(a)} / {fmt(b)}"

    def pct(x):
        return f"{100 * x:.1f}%"

    lines = ["| setting | devices | all-reduce ms | compute ms | step ms, no overlap / overlap "
             f"| efficiency, no overlap / overlap | from {first} devices "
             "| compute ms needed for 90% without overlap |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        compute = "not yet measured" if r["compute_s"] is None else ms(r["compute_s"])
        lines.append(
            f"| {r['setting']} | {r['devices']} | {ms(r['allreduce_s'])} | {compute} "
            f"| {both(r, ms, 'step_s_')} | {both(r, pct, 'efficiency_')} "
            f"| {both(r, pct, f'efficiency_from_{first}_')} "
            f"| {ms(r['min_compute_s_for_90pct_no_overlap'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], devices: list[int], path: str, nbytes: float) -> None:
    """All-reduce time (left) and efficiency from the smallest device count (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setting in SETTINGS:
        rs = [r for r in rows if r["setting"] == setting.name]
        ps = [r["devices"] for r in rs]
        left.plot(ps, [1e3 * r["allreduce_s"] for r in rs], "o-", label=setting.name)
        for tag, style in (("no_overlap", "o-"), ("overlap", "s--")):
            if rs[0][f"efficiency_{tag}"] is not None:
                right.plot(ps, [100 * r[f"efficiency_from_{devices[0]}_{tag}"] for r in rs],
                           style, label=f"{setting.name}, {tag.replace('_', ' ')}")
    right.plot([256], [100 * PAPER_EFFICIENCY_8_TO_256], "k*", markersize=12,
               label="paper: ~90% from 8 to 256 GPUs")
    left.set(yscale="log", ylabel="all-reduce time (ms)",
             title=f"Gradient all-reduce, {nbytes / 1e6:.1f} MB (model)")
    right.set(ylabel=f"efficiency from {devices[0]} devices (%)",
              title="Predicted scaling efficiency", ylim=(50, 102))
    for ax, grid, legend in ((left, "both", "best"), (right, "major", "lower left")):
        ax.set(xscale="log", xlabel="devices")
        ax.set_xticks(devices, [str(p) for p in devices])
        ax.grid(True, which=grid, alpha=0.3)
        ax.legend(fontsize=8, loc=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--devices", nargs="+", type=int, default=[8, 32, 256, 1024])
    parser.add_argument("--grad_bytes", type=float, default=None,
                        help="bytes all-reduced per step (default: from --comm_json, else "
                             "4 x the parameter count of --model)")
    parser.add_argument("--comm_json", default=None,
                        help="output of benchmarks.comm: its lbsgd totals line gives the bytes")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--step_time_s", type=float, default=None,
                        help="measured compute time of one device's step, for the non-paper "
                             "settings")
    parser.add_argument("--train_step_json", default=None,
                        help="output of benchmarks.train_step: its first line's lbsgd median "
                             "step time is used as --step_time_s")
    parser.add_argument("--paper_backward_s", type=float, default=0.120,
                        help="ResNet-50 backward pass, 32 images, one P100 (paper, Sec. 4)")
    parser.add_argument("--paper_forward_s", type=float, default=0.060,
                        help="forward pass; assumed half the backward")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("scaling.png")),
                        help="PNG to write ('' for none)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    nbytes, bytes_source = gradient_bytes(args)
    compute_s, compute_source = compute_time(args)
    paper_s = args.paper_backward_s + args.paper_forward_s
    paper_source = (f"paper Sec. 4: P100 backward {args.paper_backward_s * 1e3:.0f} ms "
                    f"+ forward {args.paper_forward_s * 1e3:.0f} ms (assumed)")
    devices = sorted(args.devices)
    rows = []
    for setting in SETTINGS:
        paper = setting.name.startswith("paper")
        rows += predict(setting, nbytes, devices, paper_s if paper else compute_s,
                        paper_source if paper else compute_source)
    print(json.dumps({"record": "model", "grad_bytes": nbytes, "grad_bytes_source": bytes_source,
                      "settings": [dataclasses.asdict(s) for s in SETTINGS],
                      "paper_step_s_from_one_hour": PAPER_STEP_S, "paper_steps": PAPER_STEPS,
                      "paper_efficiency_8_to_256": PAPER_EFFICIENCY_8_TO_256}))
    for row in rows + paper_comparison(rows):
        print(json.dumps(row))
    print(f"\nGradient bytes per step: {nbytes:,.0f} ({bytes_source})\n")
    print(markdown(rows, devices[0]))
    if args.plot:
        plot(rows, devices, args.plot, nbytes)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
