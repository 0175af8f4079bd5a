"""Execute every teaching notebook from a clean kernel; any error (a failed ``assert`` included) fails.

The notebooks assert their own claims (gradient-check errors below the package's
tolerances, greedy != exact decoding on a constructed tree, the diagonal-only Gumbel
Jacobian failing its check, ...), so a regression in the package breaks its
notebook here. Each one runs as ``jupyter nbconvert --execute`` would: a fresh
``python3`` kernel whose working directory is ``notebooks/``. The executed copy stays
in memory; the stored ``.ipynb`` files (with their outputs) are never rewritten —
``notebooks/_build.py`` regenerates them.

Needs the ``[notebooks]`` extra (nbformat, nbclient, ipykernel); skipped without it.
"""

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPOSITORY / "notebooks"
#: The course, in order (the issue's list); the test fails if one is missing or unlisted.
COURSE = [
    "01_softmax_cross_entropy.ipynb",
    "02_fully_connected_backprop.ipynb",
    "03_convolution_im2col.ipynb",
    "04_pooling_and_batchnorm.ipynb",
    "05_gumbel_softmax.ipynb",
    "06_hierarchical_softmax.ipynb",
    "07_adaptive_softmax.ipynb",
    "08_train_and_compare.ipynb",
]
#: Wall-clock limit for one whole notebook, kernel start included. Each runs in well under
#: 20 s on a 2-core machine; this only stops a hung or runaway notebook, it does not time it.
NOTEBOOK_TIMEOUT_SECONDS = 180


def test_the_course_is_complete_and_linked_in_order():
    found = sorted(path.name for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == COURSE
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((\d\d_[a-z0-9_]+\.ipynb)\)", readme)
    assert links == COURSE, f"notebooks/README.md must link the notebooks once each, in order; got {links}"


@pytest.mark.parametrize("name", COURSE)
def test_stored_notebook_has_outputs_and_no_errors(name):
    # Stored executed, so they read well on a code host: every code cell ran, none failed.
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    assert all(cell.execution_count is not None for cell in code_cells), f"{name} is stored unexecuted"
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"{name} is stored with an error output: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs), \
        f"{name} has no figure"


def execute(path, monkeypatch):
    """Run ``path`` top to bottom in a fresh python3 kernel (cwd = notebooks/); return the executed copy."""
    # The kernel is a subprocess that inherits this environment: make the checkout importable
    # even when the package is not pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # start from a clean slate, as a reader would
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=NOTEBOOK_TIMEOUT_SECONDS,
                                     record_timing=False, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.reset_execution_trackers()
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_SECONDS
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{path.name} did not finish within {NOTEBOOK_TIMEOUT_SECONDS} s (stopped before cell {index})")
            client.timeout = max(1, int(remaining))  # the per-cell limit shrinks to what is left
            # Raises CellExecutionError, with the cell's traceback, on any exception or failed assert.
            client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
    return notebook


@pytest.mark.parametrize("name", COURSE)
def test_notebook_runs_from_a_clean_kernel(name, monkeypatch):
    notebook = execute(NOTEBOOK_DIR / name, monkeypatch)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
