"""Rebuild each teaching notebook (``NN_name.ipynb``) from its source script (``NN_name.py``).

    python notebooks/_sync.py --execute          # rebuild all eight, execute them, store the outputs
    python notebooks/_sync.py --execute 03 05    # only the notebooks whose names start with these
    python notebooks/_sync.py                    # rebuild the cells only (outputs dropped: CI then fails)
    python notebooks/_sync.py --from-ipynb 05    # the other way: after editing 05_*.ipynb in Jupyter

The ``.py`` files are the source; edit them in any editor. They are in the
"percent" format that jupytext, VS Code and PyCharm understand: a line ``# %%``
starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are written
as comments (``# `` before each line, a lone ``#`` for a blank one), and a cell
ends at the blank line before the next marker. A marker may carry cell tags,
``# %% tags=["varies"]``: that one marks a cell whose printed output is not
expected to repeat (timings, optional PyTorch), so ``tests/test_notebooks.py``
does not compare it with the stored output.

Executing runs each notebook as ``jupyter nbconvert --execute`` would and as the
test does: a fresh ``python3`` kernel whose working directory is ``notebooks/``,
with the checkout on ``PYTHONPATH``. Needs ``pip install -e ".[notebooks]"``.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
#: Wall-clock limit for one whole notebook while syncing (the test sets its own, tighter one).
NOTEBOOK_TIMEOUT_SECONDS = 600
#: Tag of a cell whose printed output may differ from run to run (see the module docstring).
VARIES_TAG = "varies"
# Written at the top of every source: jupytext reads it as the notebook's metadata, we skip it.
HEADER = """\
# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
"""
MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?$")


def course():
    """The notebook names (``NN_name``, no suffix) that have a source script, in course order."""
    return sorted(path.stem for path in HERE.glob("[0-9][0-9]_*.py"))


def read_source(path):
    """Parse a percent-format script into a list of nbformat cells (no outputs)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.startswith("# ---\n"):  # the metadata header ends at the second "# ---"
        text = text[text.index("\n# ---\n", 1) + len("\n# ---\n"):]
    cells, lines, match = [], [], None
    for line in text.split("\n") + ["# %%"]:  # a final marker closes the last cell
        next_match = MARKER.match(line)
        if next_match is None:
            lines.append(line)
            continue
        if match is not None:
            cells.append(_cell(match, "\n".join(lines).strip("\n")))
        elif "".join(lines).strip():
            raise ValueError(f"{path}: text before the first '# %%' marker")
        match, lines = next_match, []
    return cells


def _cell(match, body):
    if match.group("markdown"):
        lines = body.split("\n")
        bad = [line for line in lines if line != "#" and not line.startswith("# ")]
        if bad:
            raise ValueError(f"markdown cell line is not a '# ' comment: {bad[0]!r}")
        cell = nbformat.v4.new_markdown_cell("\n".join(line[2:] for line in lines))
    else:
        cell = nbformat.v4.new_code_cell(body)
    if match.group("tags"):
        cell.metadata["tags"] = json.loads(match.group("tags"))
    return cell


def write_source(cells, path):
    """Write cells (markdown and code) to ``path`` in the percent format ``read_source`` reads."""
    blocks = [HEADER.rstrip("\n")]
    for cell in cells:
        marker = "# %% [markdown]" if cell.cell_type == "markdown" else "# %%"
        if cell.metadata.get("tags"):
            marker += " tags=" + json.dumps(list(cell.metadata["tags"]))
        source = cell.source.strip("\n")
        if cell.cell_type == "markdown":
            source = "\n".join("# " + line if line else "#" for line in source.split("\n"))
        blocks.append(marker + "\n" + source)
    Path(path).write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


def notebook_from_source(path):
    """A fresh, unexecuted notebook whose cells are those of the script at ``path``."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.cells = read_source(path)
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index:02d}"  # stable ids: a rebuild does not rewrite every cell's id
    return notebook


def execute(notebook, timeout=NOTEBOOK_TIMEOUT_SECONDS):
    """Run ``notebook`` top to bottom in a fresh python3 kernel (cwd = notebooks/), in place.

    Clears old outputs first, as a reader starting from a clean kernel would; raises
    ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on any exception
    or failed ``assert``, and ``TimeoutError`` if the whole notebook exceeds ``timeout`` seconds.
    """
    from nbclient import NotebookClient

    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel is a subprocess: make the checkout importable even when it is not pip-installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, kernel_name=KERNELSPEC["name"], timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    client.reset_execution_trackers()
    deadline = time.monotonic() + timeout
    with client.setup_kernel(env=env):
        for index, cell in enumerate(notebook.cells):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the notebook did not finish within {timeout} s (stopped before cell {index})")
            client.timeout = max(1, int(remaining))  # the per-cell limit shrinks to what is left
            client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        # Stored like nbconvert stores it: the kernel's language_info, for syntax highlighting.
        info_message = client.wait_for_reply(client.kc.kernel_info())
        notebook.metadata["language_info"] = info_message["content"]["language_info"]
    return notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="prefixes of the notebooks to sync, e.g. 03 or 05_gumbel (default: all)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--execute", action="store_true",
                           help="execute each rebuilt notebook from a clean kernel and store its outputs")
    direction.add_argument("--from-ipynb", action="store_true",
                           help="rewrite the .py sources from the .ipynb cells instead (after editing in Jupyter)")
    args = parser.parse_args(argv)
    selected = [name for name in course() if not args.names or name.startswith(tuple(args.names))]
    if not selected:
        parser.error(f"no notebook matches {args.names}; choose from {course()}")
    for name in selected:
        if args.from_ipynb:
            write_source(nbformat.read(HERE / f"{name}.ipynb", as_version=4).cells, HERE / f"{name}.py")
            print(f"{name}.py: rewritten from {name}.ipynb", flush=True)
            continue
        notebook = notebook_from_source(HERE / f"{name}.py")
        start = time.perf_counter()
        if args.execute:
            execute(notebook)
        nbformat.validate(notebook)
        nbformat.write(notebook, HERE / f"{name}.ipynb")
        done = f"executed in {time.perf_counter() - start:.1f} s" if args.execute else "cells rebuilt, not executed"
        print(f"{name}.ipynb: {done}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
