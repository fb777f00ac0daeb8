"""The Colab quickstart executes end to end on the smoke config, so it never rots."""

import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs_on_smoke_config(tmp_path, monkeypatch):
    monkeypatch.setenv("NBJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NBJAX_SOURCE", str(ROOT))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # burden plots and the merge picture
    text = "".join(o.get("text", "") for o in outputs)
    assert "gmp90_mitigated" in text
    assert os.path.exists("/tmp/nbjax_quickstart_smoke/merges.png")
