"""Each Colab notebook runs top to bottom, in its reduced mode, on this machine's kernel."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO, lbsgd_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["01_schedules", "02_small_reproduction",
                                  "03_resnet50_accelerator"])
def test_notebook_runs_top_to_bottom(name, monkeypatch):
    for key, value in lbsgd_env({"LBSGD_NOTEBOOK_QUICK": "1"}).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "colab" / f"{name}.ipynb", as_version=4)
    # Committed with their outputs (plots visible on GitHub): check they are there.
    assert any(output.get("output_type") == "display_data" and "image/png" in output["data"]
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    NotebookClient(notebook, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(REPO)}}).execute()  # raises on error
