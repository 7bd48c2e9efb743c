"""The benchmark scripts run and print the JSON they promise (tiny settings; no speed asserted).

Each script runs as a subprocess, as a user would start it. They inherit conftest's 8 simulated
CPU devices. The one property checked beyond the output's shape is lbsgd's communication
contract, read from comm.py: the gradient all-reduce carries exactly the parameter bytes and
BatchNorm carries none.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import scaling

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


@pytest.mark.slow
def test_train_step_prints_one_json_object_with_lbsgd_and_baseline():
    rows = _run("train_step", *TINY, "--devices", "2", "--steps", "2", "--repeats", "1",
                "--warmup_steps", "1", "--compile_repeats", "1")
    assert len(rows) == 1
    row = rows[0]
    for key in ("model", "image_size", "per_device_batch", "global_batch", "bn_group_size",
                "dtype", "device_kind", "device_count", "jax_version", "param_bytes",
                "flop_count", "ratio_images_per_sec", "paired_ratio_median", "command"):
        assert key in row, key
    assert row["device_count"] == 2 and row["global_batch"] == 16
    for variant in ("lbsgd", "baseline"):
        timing = row[variant]
        for key in ("compile_s", "step_time_median_s", "step_time_min_s", "step_time_max_s",
                    "images_per_sec", "images_per_sec_per_device",
                    "xla_flops_per_step_per_device", "achieved_tflops_per_device", "mfu",
                    "peak_memory_bytes"):
            assert key in timing, (variant, key)
        assert timing["timed_steps"] == 2
        assert timing["step_time_min_s"] <= timing["step_time_median_s"]
        assert timing["mfu"] is None  # no --peak_tflops given
    assert row["ratio_images_per_sec"] > 0


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
