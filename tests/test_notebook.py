"""The Colab quickstart executes end to end on the smoke config, so it never rots."""

import pathlib

import pytest
from test_tensorboard import summaries

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs_on_smoke_config(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    monkeypatch.setenv("NBJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("NBJAX_SOURCE", str(ROOT))
    monkeypatch.setenv("NBJAX_WORKDIR", str(workdir))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # burden plots and the merge picture
    text = "".join(o.get("text", "") for o in outputs)
    assert "gmp90_mitigated" in text
    assert f"nbjax checkout: {ROOT}" in text
    assert (workdir / "merges.png").is_file()
    assert "token_merging/merges" in summaries(workdir / "gmp90_mitigated")
    assert "test accuracy" in text and "predicted:" in text
    assert (workdir / "gmp90_mitigated.safetensors").is_file()
