"""The benchmark scripts run and print the JSON they promise (tiny settings; no speed asserted).

Each script runs as a subprocess, as a user would start it. They inherit conftest's 8 simulated
CPU devices. The one property checked beyond the output's shape is lbsgd's communication
contract, read from comm.py: the gradient all-reduce carries exactly the parameter bytes and
BatchNorm carries none.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks import common, scaling
from benchmarks.train_step import _device_peak, make_baseline

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "cifar_resnet8", "--image_size", "16", "--per_device_batch", "8",
        "--bn_group_size", "8", "--num_classes", "10"]


def _run(name: str, *args: str) -> list[dict]:
    """Run `python -m benchmarks.<name>` and return the JSON objects it printed on stdout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _trace_event_names(trace_file: Path) -> set[str]:
    """Event names of the Chrome-format trace jax.profiler writes beside the xplane file: read
    without benchmarks/profiling.py, which reads the xplane."""
    (json_file,) = trace_file.parent.glob("*.trace.json.gz")
    return {e.get("name") for e in json.loads(gzip.decompress(json_file.read_bytes()))[
        "traceEvents"]}


def _lowered(row: dict) -> dict:
    """Each variant's step lowered here, in this process, for the row's settings."""
    args = argparse.Namespace(**{key: row[key] for key in common.STEP_FIELDS},
                              devices=row["device_count"])
    ex, batch = common.experiment(args)
    init, step = make_baseline(ex)
    return {name: step.lower(jax.eval_shape(init), batch)
            for name, init, step in (("lbsgd", ex.init_state, ex.train_step),
                                     ("baseline", init, step))}


@pytest.mark.slow
def test_train_step_prints_one_json_object_with_lbsgd_and_baseline(tmp_path):
    rows = _run("train_step", *TINY, "--devices", "2", "--steps", "2", "--repeats", "1",
                "--warmup_steps", "1", "--peak_tflops", "2.5", "--profile",
                str(tmp_path / "profile"), "--profile_steps", "2",
                "--compilation_cache", str(tmp_path / "cache"))
    assert len(rows) == 1
    row = rows[0]
    for key in ("model", "image_size", "per_device_batch", "global_batch", "bn_group_size",
                "dtype", "device_kind", "device_count", "jax_version", "param_bytes",
                "flop_count", "ratio_images_per_sec", "paired_ratio_median", "command"):
        assert key in row, key
    assert row["device_count"] == 2 and row["global_batch"] == 16
    assert row["peak_tflops"] == 2.5 and row["peak_tflops_source"] == "--peak_tflops"
    steps = _lowered(row)
    for variant in ("lbsgd", "baseline"):
        timing = row[variant]
        assert timing["timed_steps"] == 2 and timing["compile_cache"] == "miss"  # a new cache
        assert timing["step_time_min_s"] <= timing["step_time_median_s"]
        assert timing["images_per_sec"] == pytest.approx(16 / timing["step_time_median_s"])
        # XLA's FLOPs and memory of the same step lowered and compiled in this process; on a
        # CPU the compiled program's own count (convolutions included) agrees to 2%.
        lowered, compiled = steps[variant], steps[variant].compile()
        flops = lowered.cost_analysis()["flops"]
        assert timing["xla_flops_per_step_per_device"] == flops > 0
        assert flops == pytest.approx(compiled.cost_analysis()["flops"], rel=0.02)
        assert timing["mfu"] == pytest.approx(flops / timing["step_time_median_s"] / 2.5e12)
        memory = compiled.memory_analysis()
        assert timing["peak_memory_source"].startswith("xla:")  # a CPU has no allocator stats
        assert timing["peak_memory_bytes"] == (
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        # The profile: this variant's own trace, its longest kernels named in it.
        trace_file = Path(timing["trace_file"])
        assert trace_file.is_relative_to(tmp_path / "profile" / variant)
        kernels = timing["top_kernels"]
        assert 0 < len(kernels) <= 10 and timing["profiled_steps"] == 2
        assert {k["name"] for k in kernels} <= _trace_event_names(trace_file)
        times = [k["ms_per_step"] for k in kernels]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert sum(k["share"] for k in kernels) <= 1
        assert sum(times) <= timing["kernel_ms_per_step"] * (1 + 1e-9)
    assert row["ratio_images_per_sec"] > 0


def test_device_peak_is_the_rise_of_the_high_water_mark_over_what_was_in_use():
    before = [{"bytes_in_use": 100, "peak_bytes_in_use": 150},
              {"bytes_in_use": 120, "peak_bytes_in_use": 150}]
    assert _device_peak(before, [{"peak_bytes_in_use": 400}, {"peak_bytes_in_use": 380}]) == 300
    # A mark that did not rise on every device is an earlier program's: no figure.
    assert _device_peak(before, [{"peak_bytes_in_use": 400}, {"peak_bytes_in_use": 150}]) is None
    assert _device_peak(None, None) is None  # a CPU keeps no statistics


@pytest.mark.slow
def test_noise_scale_prints_the_probe_against_the_plain_step():
    rows = _run("noise_scale", *TINY, "--devices", "2", "--steps", "2", "--repeats", "1",
                "--warmup_steps", "1", "--every", "10")
    assert len(rows) == 1
    row = rows[0]
    assert row["global_batch"] == 16 and row["workers"] == 2 and row["device_count"] == 2
    for variant in ("plain", "probe"):
        assert row[variant]["timed_steps"] == 2
    ratio = row["probe"]["step_time_median_s"] / row["plain"]["step_time_median_s"]
    assert row["ratio_probe_to_plain"] == pytest.approx(ratio)
    assert row["overhead_at_every_steps"] == pytest.approx((ratio - 1) / 10)


@pytest.mark.slow
def test_comm_lbsgd_all_reduces_exactly_the_gradient_and_nothing_for_batchnorm():
    rows = _run("comm", *TINY, "--variants", "lbsgd", "baseline")
    totals = {r["variant"]: r for r in rows if r["record"] == "totals"}
    listed = [r for r in rows if r["record"] == "collective"]
    assert set(totals) == {"lbsgd", "baseline"}
    assert all({"op", "bytes", "tensors"} <= set(r) for r in listed)
    assert all({"dtype", "shape", "bytes"} <= set(t) for r in listed for t in r["tensors"])

    lbsgd = totals["lbsgd"]
    assert lbsgd["device_count"] == 8
    assert lbsgd["collective_ops"] == {"all-reduce": lbsgd["collective_instructions"]}
    # Every gradient once, but XLA reduces equal gradients once: a projection shortcut's BN
    # beta gets exactly the gradient of its block's last BN beta (cifar_resnet8 has two
    # projection shortcuts, of 32 and 64 channels).
    assert lbsgd["unmatched_params"] == 2
    assert lbsgd["gradient_allreduce_bytes"] == lbsgd["param_bytes"] - (32 + 64) * 4
    assert lbsgd["batchnorm_bytes"] == 0
    assert lbsgd["collective_bytes"] == (lbsgd["gradient_allreduce_bytes"]
                                         + lbsgd["scalar_bytes"])
    # The baseline keeps its running statistics replicated, so it must all-reduce them.
    assert totals["baseline"]["batchnorm_bytes"] > 0


def test_scaling_prints_predictions_a_table_and_a_plot(tmp_path):
    step_json = tmp_path / "step.jsonl"
    step_json.write_text(json.dumps({
        "model": "resnet50", "image_size": 224, "per_device_batch": 32, "device_kind": "test",
        "lbsgd": {"step_time_median_s": 0.1}}) + "\n")
    comm_json = tmp_path / "comm.jsonl"
    comm_json.write_text(json.dumps({
        "record": "totals", "variant": "lbsgd", "model": "resnet50", "dtype": "float32",
        "gradient_allreduce_bytes": 102_228_128}) + "\n")
    png = tmp_path / "scaling.png"
    rows = _run("scaling", "--comm_json", str(comm_json), "--train_step_json",
                str(step_json), "--plot", str(png))
    predictions = [r for r in rows if r["record"] == "prediction"]
    assert {r["devices"] for r in predictions} == {8, 32, 256, 1024}
    assert {r["setting"] for r in predictions} == {s.name for s in scaling.SETTINGS}
    for r in predictions:
        assert r["grad_bytes"] == 102_228_128
        assert r["compute_s"] is not None
        for key in ("allreduce_s", "step_s_no_overlap", "step_s_overlap",
                    "efficiency_no_overlap", "efficiency_overlap"):
            assert r[key] is not None, key
    assert any(r["record"] == "paper_comparison" for r in rows)
    assert png.stat().st_size > 0


def test_scaling_model_formulas():
    # Ring: 2 (p - 1) / p * B / w + 2 (p - 1) * a; nothing to send on one device.
    assert scaling.ring_allreduce_s(1e9, 1, 1e9, 1e-6) == 0
    assert scaling.ring_allreduce_s(1e9, 4, 1e9, 1e-6) == pytest.approx(1.5 + 6e-6)
    paper = next(s for s in scaling.SETTINGS if s.name.startswith("paper"))
    # Within a node the hierarchy is just the node's ring.
    assert scaling.allreduce_s(paper, 1e8, 8) == pytest.approx(
        scaling.ring_allreduce_s(1e8, 8, paper.intra_bw, paper.intra_latency))
    # Across nodes it adds the network ring over the nodes.
    assert scaling.allreduce_s(paper, 1e8, 32) == pytest.approx(
        scaling.ring_allreduce_s(1e8, 8, paper.intra_bw, paper.intra_latency)
        + scaling.ring_allreduce_s(1e8, 4, paper.inter_bw, paper.inter_latency))
    # Overlap hides the all-reduce behind the backward pass (2/3 of compute) only.
    assert scaling.step_s(0.3, 0.1, overlap=True) == pytest.approx(0.3)
    assert scaling.step_s(0.3, 0.4, overlap=True) == pytest.approx(0.5)
    assert scaling.step_s(0.3, 0.1, overlap=False) == pytest.approx(0.4)


WITHOUT_TENSORFLOW = r'''
import sys
import benchmarks.train_step, lbsgd.train  # the step benchmark and everything a run imports
from lbsgd.config import default_config
from lbsgd.metrics import MetricsLogger
assert "tensorflow" not in sys.modules
logger = MetricsLogger(sys.argv[1], default_config(), total_steps=2, steps_per_epoch=2,
                       start_step=0)
logger.write_eval(2, {"eval_top1": 0.5, "eval_top5": 1.0, "eval_loss": 1.0})
logger.close()
'''


def test_lbsgd_imports_and_logs_where_tensorflow_is_not_installed(tmp_path):
    """The lent GPU machines have JAX but no TensorFlow (its wheel is larger than what a call
    carries): the step benchmark and a run must not need it. The installed packages are linked
    into a folder without TensorFlow and clu, Python starts without its own site-packages
    (-S), and a MetricsLogger writes its row to metrics.jsonl with no TensorBoard events,
    saying so."""
    import sysconfig

    site = tmp_path / "site"
    site.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        if not entry.name.lower().startswith(("tensorflow-", "tensorflow_cpu", "clu", "keras",
                                              "tf_keras")) and entry.name != "tensorflow":
            (site / entry.name).symlink_to(entry)
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-S", "-c", WITHOUT_TENSORFLOW, str(workdir)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TensorFlow is not installed: no TensorBoard events" in result.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_top1"]) for r in rows] == [(2, 0.5)]
    assert not list(workdir.glob("events.out.tfevents.*"))
