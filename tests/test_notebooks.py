"""The teaching notebooks: each stored ``.ipynb`` is current with its ``.py`` source, and runs.

Each notebook's source is the percent-format script beside it (``notebooks/NN_name.py``);
``python notebooks/_sync.py --execute NN`` rebuilds ``NN_name.ipynb`` from it, executes it and
stores the outputs. Three checks keep the stored files honest:

1. *Cells current*: the stored ``.ipynb`` has exactly the cells (type, text, tags) of its
   ``.py`` source, so editing a source without re-syncing fails here, naming the cell.
2. *Stored executed*: every code cell of the stored notebook ran, in order (execution counts
   1, 2, 3, ...), none stored an error, and there is at least one figure.
3. *Outputs current*: each notebook is executed again here from a clean kernel, as
   ``jupyter nbconvert --execute`` would (a fresh ``python3`` kernel whose working directory
   is ``notebooks/``). Any error fails; the notebooks ``assert`` their own claims (gradient
   checks below the package's tolerances, greedy != exact decoding on a constructed tree,
   the diagonal-only Gumbel Jacobian failing its check, ...), so a regression in the package
   breaks its notebook here. Then the text each code cell printed (stdout and the plain-text
   or markdown form of its displays, figures included as ``<Figure size ... with N Axes>``)
   is compared with the stored text. Not compared, and why:

   - cells tagged ``varies`` in the source (``# %% tags=["varies"]``): they print wall-clock
     timings (03 im2col speeds, 06 and 07 time vs K, 08 seconds of training and its results
     table), or depend on whether the optional PyTorch is installed (07's equivalence check);
   - figure pixels: PNG bytes change with the matplotlib version and fonts;
   - stderr: warnings carry file paths and library versions;
   - numbers at round-off level (both below 1e-6 in magnitude, e.g. gradient-check relative
     errors of 1e-10): their digits change with the BLAS kernel, the CPU's SIMD paths and
     OpenMP scheduling. Every other number must agree to 1% (float32 training on another
     machine may move an accuracy by a sample; it does not move it by 1%), and the words
     around the numbers must be identical (whitespace aside).

The executed copy stays in memory; the stored ``.ipynb`` files are never rewritten here.
Needs the ``[notebooks]`` extra (nbformat, nbclient, ipykernel); skipped without it.
"""

import difflib
import importlib.util
import math
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPOSITORY / "notebooks"
# The sync tool is a script, not part of the package: load it from its file.
_spec = importlib.util.spec_from_file_location("notebook_sync", NOTEBOOK_DIR / "_sync.py")
sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)

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
    "09_write_your_own_head.ipynb",
    "10_gradient_estimators.ipynb",
    "11_cifar100_results.ipynb",
]
#: Wall-clock limit for one whole notebook, kernel start included. Each runs in well under
#: 20 s on a 2-core machine; this only stops a hung or runaway notebook, it does not time it.
NOTEBOOK_TIMEOUT_SECONDS = 180
#: Printed numbers agree if within 1% of each other, or both below the round-off floor.
RELATIVE_TOLERANCE, ROUND_OFF_FLOOR = 1e-2, 1e-6
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
MEMORY_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")  # "<object at 0x7f...>" differs every run


def regenerate_command(name):
    return f"python notebooks/_sync.py --execute {name[:2]}"


def test_the_course_is_complete_and_linked_in_order():
    found = sorted(path.name for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == COURSE
    sources = [f"{stem}.ipynb" for stem in sync.course()]
    assert sources == COURSE, f"every notebook needs its .py source beside it (and no other NN_*.py); got {sources}"
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((\d\d_[a-z0-9_]+\.ipynb)\)", readme)
    assert links == COURSE, f"notebooks/README.md must link the notebooks once each, in order; got {links}"


def test_percent_format_round_trips(tmp_path):
    # The sync tool's reader and writer are inverses, so --from-ipynb after editing in Jupyter
    # gives back the source: a markdown blank line, a code blank line, tags, a '#' heading.
    cells = [nbformat.v4.new_markdown_cell("# Title\n\nText with `code`."),
             nbformat.v4.new_code_cell("x = 1\n\n\n# a comment\nprint(x)"),
             nbformat.v4.new_code_cell("print('timing')"),
             nbformat.v4.new_markdown_cell("one line")]
    cells[2].metadata["tags"] = [sync.VARIES_TAG]
    path = tmp_path / "round_trip.py"
    sync.write_source(cells, path)
    back = sync.read_source(path)
    assert [(cell.cell_type, cell.source, cell.metadata) for cell in back] == \
           [(cell.cell_type, cell.source, cell.metadata) for cell in cells]


@pytest.mark.parametrize("name", COURSE)
def test_stored_notebook_has_the_cells_of_its_source(name):
    source_path = NOTEBOOK_DIR / name.replace(".ipynb", ".py")
    source = sync.read_source(source_path)
    stored = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
    stale = f"notebooks/{name} is stale: regenerate it from notebooks/{source_path.name} with `{regenerate_command(name)}`"
    for index, (want, have) in enumerate(zip(source, stored)):
        if want.cell_type != have.cell_type:
            pytest.fail(f"{stale}: cell {index} is {want.cell_type} in the .py, {have.cell_type} in the .ipynb")
        if want.metadata.get("tags", []) != have.metadata.get("tags", []):
            pytest.fail(f"{stale}: cell {index} has tags {want.metadata.get('tags', [])} in the .py, "
                        f"{have.metadata.get('tags', [])} in the .ipynb")
        if want.source != have.source:
            diff = difflib.unified_diff(have.source.splitlines(), want.source.splitlines(),
                                        f"{name} cell {index}", f"{source_path.name} cell {index}", lineterm="")
            pytest.fail(f"{stale}: cell {index} ({want.cell_type}) differs:\n" + "\n".join(list(diff)[:40]))
    assert len(source) == len(stored), f"{stale}: {len(source)} cells in the .py, {len(stored)} in the .ipynb"


@pytest.mark.parametrize("name", COURSE)
def test_stored_notebook_has_outputs_and_no_errors(name):
    # Stored executed, so they read well on a code host: every code cell ran, in order, none failed.
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    counts = [cell.execution_count for cell in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), \
        f"{name} is not stored executed top to bottom (execution counts {counts}): run `{regenerate_command(name)}`"
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"{name} is stored with an error output: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs), \
        f"{name} has no figure"


def printed_text(cell):
    """The text a code cell shows: its stdout, then the markdown or plain-text form of each display."""
    stdout = "".join(output.text for output in cell.outputs
                     if output.output_type == "stream" and output.name == "stdout")
    shown = [output.data.get("text/markdown") or output.data.get("text/plain", "") for output in cell.outputs
             if output.output_type in ("execute_result", "display_data")]
    return MEMORY_ADDRESS.sub("0x", "\n".join([stdout, *shown]))


def printed_difference(stored, fresh):
    """None if the two printouts agree (see the module docstring), else what differs first."""
    words = ["".join(NUMBER.sub("#", text).split()) for text in (stored, fresh)]
    if words[0] != words[1]:
        return "the text differs"
    for old, new in zip(NUMBER.findall(stored), NUMBER.findall(fresh)):
        if not math.isclose(float(old), float(new), rel_tol=RELATIVE_TOLERANCE, abs_tol=ROUND_OFF_FLOOR):
            return f"stored {old}, now {new}"
    return None


def test_printed_difference_ignores_round_off_but_not_values_or_words():
    assert printed_difference("relative error 6.65e-10\n[-0.  0.]", "relative error 9.1e-10\n[ 0. -0.]") is None
    assert printed_difference("accuracy 0.958", "accuracy 0.9581") is None
    assert printed_difference("accuracy 0.958", "accuracy 0.912") == "stored 0.958, now 0.912"
    assert printed_difference("loss 1.0", "cost 1.0") == "the text differs"
    assert printed_difference("shape (2, 3)", "shape (2, 3, 1)") == "the text differs"


@pytest.mark.parametrize("name", COURSE)
def test_notebook_runs_from_a_clean_kernel_and_reproduces_its_stored_outputs(name):
    stored = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # Raises CellExecutionError, with the cell's traceback, on any exception or failed assert.
    fresh = sync.execute(nbformat.read(NOTEBOOK_DIR / name, as_version=4), timeout=NOTEBOOK_TIMEOUT_SECONDS)
    assert all(cell.execution_count is not None for cell in fresh.cells if cell.cell_type == "code")
    for index, (old, new) in enumerate(zip(stored.cells, fresh.cells)):
        if new.cell_type != "code" or sync.VARIES_TAG in new.metadata.get("tags", []):
            continue
        was, now = printed_text(old), printed_text(new)
        difference = printed_difference(was, now)
        assert difference is None, (
            f"notebooks/{name}: the stored output of cell {index} is out of date ({difference}); "
            f"run `{regenerate_command(name)}`, or tag the cell `# %% tags=[\"{sync.VARIES_TAG}\"]` "
            f"in its .py if its output legitimately varies.\n--- stored:\n{was[:800]}\n--- now:\n{now[:800]}")
