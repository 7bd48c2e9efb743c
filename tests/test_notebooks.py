"""The Colab notebooks run the way users run them, `jupyter nbconvert --execute`: the kernel
starts in colab/, with no PYTHONPATH. Each runs once here, in its reduced mode
(LBSGD_NOTEBOOK_QUICK=1), and that one execution serves two checks: it goes top to bottom and
leaves no temporary folder, and its outputs have the structure of the committed ones (which
come from a full run: the same plots and tables, other numbers)."""

import dataclasses
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.helpers import REPO, lbsgd_env, made_once, write_fashion, write_image_folder

pytestmark = pytest.mark.slow

COLAB = REPO / "colab"
NOTEBOOKS = ["01_schedules", "02_small_reproduction", "03_resnet50_accelerator"]
SIMULATED_DEVICES = "--xla_force_host_platform_device_count=8"  # conftest.py
TABLE_RULE = re.compile(r"\|( *:?-+:? *\|)+")  # the line under a markdown table's header


def output_structure(notebook) -> list[list[str]]:
    """Per code cell, what its rich outputs are: an image by its alt text, else by its plain
    text (matplotlib's names the figure's size and number of axes); a markdown table by its
    header row. Streams are left out: their text changes from run to run (timings, logs)."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            if output.output_type not in ("display_data", "execute_result"):
                continue
            data = output["data"]
            if "image/png" in data:
                alt = output.get("metadata", {}).get("image/png", {}).get("alt")
                outputs.append(f"image {alt or data.get('text/plain')}")
            elif "text/markdown" in data:
                lines = data["text/markdown"].splitlines()
                headers = [lines[i - 1] for i in range(1, len(lines))
                           if TABLE_RULE.fullmatch(lines[i].strip())]
                outputs.append(f"markdown with tables {headers}")
            else:
                outputs.append(" + ".join(sorted(data)))
        cells.append(outputs)
    return cells


def imagenette_stand_in(root):
    """Imagenette's layout (train/ and val/, 10 classes, 160 px on the short side), with two
    training images and one validation image per class."""
    return write_image_folder(root, classes=10, train_per_class=2, val_per_class=1,
                              size=(213, 160))


def fashion_mnist_stand_in(root):
    """Fashion-MNIST's four gzipped IDX files, with random images: 26 training and 2 test
    images per class, enough for one step at the reduced mode's largest kn (256)."""
    write_fashion(root, per_class=(26, 2))
    return root


@dataclasses.dataclass
class Execution:
    name: str
    notebook: nbformat.NotebookNode = dataclasses.field(repr=False)  # with this run's outputs
    error: str | None  # the CellExecutionError's text
    left_behind: list[str]  # lbsgd-* entries in the kernel's temporary directory


_EXECUTIONS: dict[str, Execution] = {}  # name -> its one execution, read by this process


@pytest.fixture(scope="module", params=NOTEBOOKS)
def execution(request, tmp_path_factory) -> Execution:
    """The notebook's one execution, shared by the tests of that notebook. Kept beyond the
    fixture's life: pytest sets a parametrized fixture up again whenever the next test takes
    another parameter, and pytest-xdist does not order a worker's tests by parameter."""
    if request.param not in _EXECUTIONS:  # and once per session (the test processes share it)
        _EXECUTIONS[request.param] = made_once(
            tmp_path_factory, request.param, lambda scratch: _execute(request.param, scratch))[1]
    return _EXECUTIONS[request.param]


def _execute(name: str, scratch: Path) -> Execution:
    kernel_tmp = scratch / "tmp"
    kernel_tmp.mkdir()
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        for key, value in lbsgd_env({"LBSGD_NOTEBOOK_QUICK": "1"}).items():
            env.setenv(key, value)
        # A user's kernel has no PYTHONPATH; one naming the repository would import configs
        # whatever the setup cell does.
        env.delenv("PYTHONPATH", raising=False)
        # Nor the suite's 8 simulated devices (conftest.py): the kernel sees this machine's
        # one CPU device, as on a Colab CPU runtime.
        flags = os.environ.get("XLA_FLAGS", "").replace(SIMULATED_DEVICES, "").strip()
        env.setenv("XLA_FLAGS", flags)
        # What the notebook leaves behind lands here, where the test sees it, not in /tmp.
        env.setenv("TMPDIR", str(kernel_tmp))
        if name == "02_small_reproduction":  # instead of the real 60,000 images
            folder = fashion_mnist_stand_in(scratch / "fashion_mnist")
            env.setenv("LBSGD_NOTEBOOK_FASHION_MNIST", str(folder))
        if name == "03_resnet50_accelerator":
            # The branch an online CPU runtime takes (Colab's: one device, so kn = 8 in one
            # BN group of n = 8), offline.
            folder = imagenette_stand_in(scratch / "imagenette")
            env.setenv("LBSGD_NOTEBOOK_IMAGENETTE", str(folder))
        client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                                resources={"metadata": {"path": str(COLAB)}})
        try:
            client.execute()
            error = None
        except CellExecutionError as raised:
            error = str(raised)
    return Execution(name, notebook, error, sorted(p.name for p in kernel_tmp.glob("lbsgd-*")))


def printed(notebook) -> str:
    return "".join(output.text for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs
                   if output.output_type == "stream" and output.name == "stdout")


def test_notebook_runs_from_the_colab_folder(execution):
    assert execution.error is None, str(execution.error)
    assert execution.left_behind == []
    if execution.name == "02_small_reproduction":  # the stand-in, not the real files
        assert re.search(r"Fashion-MNIST files: \S*/02_small_reproduction\d*/fashion_mnist\n",
                         printed(execution.notebook))
    if execution.name == "03_resnet50_accelerator":  # the branch it took, with which layout
        command = printed(execution.notebook)
        for part in ("--config=configs/bs256.py", "--config.dataset=folder:",
                     "--config.global_batch_size=8 ", "--config.bn_group_size=8 "):
            assert part in command


def test_committed_outputs_have_the_structure_the_code_gives(execution):
    if execution.error is not None:
        pytest.fail("the notebook did not run: see test_notebook_runs_from_the_colab_folder")
    committed = nbformat.read(COLAB / f"{execution.name}.ipynb", as_version=4)
    outputs = [o for cell in committed.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Committed with their outputs, plots visible on GitHub.
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert output_structure(committed) == output_structure(execution.notebook)
