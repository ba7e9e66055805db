"""notebooks/walkthrough.ipynb runs end to end (nbclient) on small data."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_walkthrough_notebook_runs(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURN_TRAINING__MAX_ESTIMATORS", "80")  # the kernel inherits it
    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (f'WORKSPACE = "{workspace}"\nCUSTOMERS = 8000\nN_TRIALS = 2\n'
                     "TRAFFIC = 4000\nMIN_CANARY = 150\nEARLY_WINDOWS = 2")
    started = time.perf_counter()

    def _took(cell, cell_index, **_kw) -> None:
        print(f"cell {cell_index}: {time.perf_counter() - started:.0f} s since start", flush=True)

    NotebookClient(nb, timeout=1200, kernel_name="python3", on_cell_executed=_took,
                   resources={"metadata": {"path": str(workspace)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the data, PSI heatmap and segment plots are drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "'champion': '2'" in text or "'champion': 2" in text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    aliases = client.get_registered_model("churn-model").aliases
    assert str(aliases["champion"]) == "2" and str(aliases["previous-champion"]) == "1"
