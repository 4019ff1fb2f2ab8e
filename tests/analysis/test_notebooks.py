"""The analysis notebooks: committed without outputs, one parameters cell, logic only from hawkspec.analysis;
and (slow) every notebook runs top to bottom on the embedded tiny model."""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"attention_sinking.ipynb", "heads_by_distance.ipynb", "acceptance_maps.ipynb"}
MAX_BYTES = 50_000


def test_the_three_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes: clear its outputs"
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} has outputs: clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} has execution counts: clear them"
        assert "attachments" not in cell, f"{path.name} has attachments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_structure_and_imports(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "How to read" in "".join(cells[0]["source"])
    code = [c for c in cells if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and params[0] is code[0], "one parameters cell, the first code cell"
    for cell in code:
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert mod.startswith(("hawkspec.analysis", "matplotlib")), f"{path.name} imports {mod}"
            elif isinstance(node, ast.Import):
                assert all(a.name.startswith(("hawkspec.analysis", "matplotlib")) for a in node.names)


def test_analysis_talks_to_backbones_through_the_interface():
    """No model internals in the analysis package: it must work for every adapter."""
    for path in (ROOT / "src" / "hawkspec" / "analysis").glob("*.py"):
        text = path.read_text()
        for attr in (".model", ".vq", ".lm_head", ".transformer"):
            assert f"backbone{attr}" not in text and f"bb{attr}" not in text, f"{path.name} uses {attr}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_the_tiny_default(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 1, f"{path.name} drew no figure"
