"""TensorFlow never sees a GPU, in any command: each entry point that brings TensorFlow in
hides the GPUs from it before TF's runtime starts (lbsgd.hide_gpus_from_tensorflow).

On a machine without GPUs, TF's GPU list is empty whether or not they were hidden, and hiding
changes nothing one could read back. So each entry point is imported in a fresh process in
which the real `tf.config.set_visible_devices` is wrapped the moment TensorFlow is imported: the
wrapper records each call and whether TF's runtime (its eager context handle, which TF creates
at its first op and after which it refuses new visible devices) had already started.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RECORD_CALLS = r'''
import importlib.abc, importlib.util, json, sys

calls = []


class WrapTensorFlow(importlib.abc.MetaPathFinder):
    """Import tensorflow as usual, then wrap its config.set_visible_devices."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            from tensorflow.python.eager import context
            real = module.config.set_visible_devices

            def set_visible_devices(devices, device_type=None):
                calls.append({"devices": [d.name for d in devices], "device_type": device_type,
                              "runtime_started": context.context()._context_handle is not None})
                return real(devices, device_type)

            module.config.set_visible_devices = set_visible_devices

        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, WrapTensorFlow())
exec(sys.argv[1])
result = {"tensorflow": "tensorflow" in sys.modules, "calls": calls}
if result["tensorflow"]:
    import tensorflow as tf
    from tensorflow.python.eager import context
    result["runtime_started"] = context.context()._context_handle is not None
    result["visible_gpus"] = [d.name for d in tf.config.get_visible_devices("GPU")]
print(json.dumps(result))
'''


def entry_points() -> list[str]:
    """Every command of the repository: the modules under lbsgd/, benchmarks/ and experiments/
    that run as a script, as Python statements that import them without running them."""
    statements = []
    for folder in ("lbsgd", "benchmarks", "experiments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "__main__.py" or 'if __name__ == "__main__"' in path.read_text():
                if (path.parent / "__init__.py").exists():
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                    statements.append(f"import {module}")
                else:  # a script outside a package, run with another name than __main__
                    script = str(path.relative_to(ROOT))
                    statements.append(f"import runpy; runpy.run_path({script!r})")
    return statements


def _record(statement: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", RECORD_CALLS, statement], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_entry_points_are_found():
    found = entry_points()
    for module in ("lbsgd.main", "lbsgd.evaluate", "lbsgd.export", "lbsgd.report",
                   "lbsgd.datasets.__main__", "benchmarks.train_step", "benchmarks.comm",
                   "benchmarks.scaling", "benchmarks.input_pipeline"):
        assert f"import {module}" in found, module
    assert "import runpy; runpy.run_path('experiments/fashion_mnist.py')" in found


# lbsgd.main imports TensorFlow only when its command runs, inside lbsgd.cli.run.
@pytest.mark.slow
@pytest.mark.parametrize("statement", [
    *entry_points(), "from lbsgd import cli; cli.run(lambda: None)"])
def test_tensorflow_gets_no_gpu_before_its_runtime_starts(statement):
    result = _record(statement)
    if not result["tensorflow"]:
        return  # TensorFlow never came in: it sees nothing
    hides = [c for c in result["calls"] if c["device_type"] == "GPU" and c["devices"] == []]
    assert hides, result
    assert not hides[0]["runtime_started"], result
    assert result["visible_gpus"] == []
