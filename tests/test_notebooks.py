"""The notebooks in ``notebooks/``: committed clean, and each one executes without an error.

Execution uses nbclient with the ``python3`` kernel, which jupyter_client resolves to the
interpreter running the tests (the kernel spec's ``python`` is replaced by ``sys.executable``);
the test checks that with an extra cell.  No GUI backend: the notebooks select matplotlib's inline
backend (figures become PNG outputs) and the kernel's default is Agg.  W&B is disabled, torch uses
one thread (tiny models run fastest that way, also on a busy machine) and the notebooks' temporary
folders go to pytest's ``tmp_path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_moe_anatomy", "03_dense_vs_moe", "04_real_data"]
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [p.stem for p in paths]


def test_the_notebooks_exist_and_the_readme_lists_them():
    stems = [p.stem for p in PATHS]
    assert set(EXPECTED) <= set(stems), stems
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in stems:
        assert f"{name}.ipynb" in readme, f"notebooks/README.md does not list {name}.ipynb"


@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown", "must open with a markdown cell"
    assert nb.cells[0].source.startswith("# "), "the first cell is the notebook's title"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    # markdown between the steps, not one wall of code
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2
    text = "\n".join(c.source for c in code)
    assert "import echomoe" in text or "from echomoe" in text


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=_ids(PATHS))
def test_notebook_executes(path, monkeypatch, tmp_path):
    # the kernel is a subprocess: it inherits these
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary folders
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], i
            assert cell.execution_count is not None, f"code cell {i} did not run"
    executable = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "wrote next to the notebooks"
