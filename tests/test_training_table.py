"""Bring your own table: type inference, label mapping, clear errors, and the Telco AUC."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.config import load_config
from mlflow_churn.errors import ChurnError
from mlflow_churn.training.table import load_table, map_label
from mlflow_churn.training.train import train_table

#: a copy inside the repository (tests/data/README.md: source and licence), so a plain clone runs it
TELCO = Path(__file__).resolve().parent / "data" / "telco-customer-churn.csv.gz"


def _table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": [f"c{i}" for i in range(n)],
        "plan": rng.choice(["basic", "plus"], n),
        "tenure": rng.integers(1, 70, n),
        "charges": [f"{v:.2f}" for v in rng.uniform(10, 100, n)],
        "churned": rng.choice(["Yes", "No"], n),
    })


def test_telco_types_blanks_and_schema() -> None:
    data = load_table(TELCO, "Churn", "customerID")
    assert len(data.features) == 7043 and "customerID" not in data.features and "Churn" not in data.features
    cols = data.schema["columns"]
    assert cols["TotalCharges"] == {"kind": "numeric", "source_dtype": "string", "nulls": 11}
    assert data.features["TotalCharges"].dtype == "float64"
    assert cols["Contract"]["kind"] == "categorical"
    assert cols["Contract"]["categories"] == ["Month-to-month", "One year", "Two year"]
    assert data.feature_set.categorical["Contract"] == ["Month-to-month", "One year", "Two year"]
    assert cols["tenure"]["kind"] == "numeric"
    assert int(data.label.sum()) == 1869 and data.schema["label"]["positive"] == 1869
    coerced = data.feature_set.coerce(data.features)
    assert isinstance(coerced["Contract"].dtype, pd.CategoricalDtype)
    json.dumps(data.schema)


def test_parquet_and_label_spellings(tmp_path: Path) -> None:
    frame = _table()
    frame["churned"] = np.where(np.arange(40) % 3 == 0, "TRUE", "false")
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    data = load_table(path, "churned", "id")
    assert data.label.tolist() == [1 if i % 3 == 0 else 0 for i in range(40)]
    assert data.features["charges"].dtype == "float64"  # numeric strings -> numbers
    assert map_label(pd.Series([1, 0, 1]), "y").tolist() == [1, 0, 1]
    assert map_label(pd.Series([" Yes", "no "]), "y").tolist() == [1, 0]


def test_blank_cells_are_missing(tmp_path: Path) -> None:
    frame = _table()
    frame.loc[3, "charges"] = "  "
    frame.loc[5, "plan"] = ""
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    data = load_table(path, "churned", "id")
    assert np.isnan(data.features.loc[3, "charges"])
    assert data.features.loc[5, "plan"] is None
    assert data.schema["columns"]["plan"]["categories"] == ["basic", "plus"]


@pytest.mark.parametrize(
    ("mutate", "label", "needle"),
    [
        (lambda f: f, "Churn", "label column 'Churn' is not in"),
        (lambda f: f.assign(churned="No"), "churned", "single class"),
        (lambda f: f.assign(churned=["maybe"] + ["Yes"] * 39), "churned", "'maybe'"),
        (lambda f: f.assign(charges=["12.5"] * 20 + ["abc"] + ["3.1"] * 19), "charges", "row 21 holds 'abc'"),
        (lambda f: f.assign(churned=[None] + ["Yes", "No"] * 19 + ["No"]), "churned", "blank in row 1"),
    ],
)
def test_bad_tables_raise_naming_the_cause(tmp_path: Path, mutate, label: str, needle: str) -> None:
    path = tmp_path / "t.csv"
    mutate(_table()).to_csv(path, index=False)
    with pytest.raises(ChurnError) as err:
        load_table(path, "churned" if label == "charges" else label, "id")
    assert needle in str(err.value)


@pytest.mark.slow
def test_telco_reaches_auc_083_and_registers(workspace: Path) -> None:
    cfg = load_config(workspace=workspace, environ={},
                      overrides={"training.max_estimators": 300, "training.nthread": 1})
    result = train_table(cfg, TELCO, "Churn", "customerID", n_trials=5, progress=False)
    assert result.val_auc >= 0.83, result.val_auc
    assert result.source == "table" and result.version == "1"
    assert result.rows_valid == round(7043 * cfg.training.validation_fraction)
    client = MlflowClient(cfg.mlflow_tracking_uri)
    name = "churn-model-table-telco-customer-churn"  # its own model, never the production one
    assert result.model_uri == f"models:/{name}/1"
    mv = client.get_model_version_by_alias(name, "challenger")
    assert mv.tags["source"] == "table" and mv.tags["feature_set"] == "table_telco_customer_churn"
    assert abs(float(mv.tags["val_auc"]) - result.val_auc) < 1e-6
    run = client.get_run(result.run_id)
    assert run.data.params["validation"] == "seeded stratified holdout"
    schema = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="schema.json", tracking_uri=cfg.mlflow_tracking_uri)).read_text())
    assert schema["columns"]["TotalCharges"]["kind"] == "numeric" and schema["label"]["column"] == "Churn"
    raw = pd.read_csv(TELCO).head(20)
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    from mlflow_churn.training.model import to_model_input

    data = load_table(TELCO, "Churn", "customerID")
    p = model.predict(to_model_input(data.feature_set, data.features.head(20)))
    assert p.shape == (len(raw),) and ((p >= 0) & (p <= 1)).all()


def test_table_model_name_derives_from_the_file() -> None:
    from mlflow_churn.training.train import table_model_name

    cfg = load_config(environ={})
    assert table_model_name(cfg, "/data/Telco Churn (2024).csv") == "churn-model-table-Telco-Churn-2024"
    assert table_model_name(cfg, "x/.csv") == "churn-model-table-csv"


def test_table_training_never_moves_the_production_challenger(workspace: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """`churn train --table` registers into <training.model_name>-table-<stem>; --model-name
    picks another; the production model's `challenger` alias stays where it was."""
    import sys

    from mlflow_churn.cli import main

    path = tmp_path / "accounts.csv"
    _table(n=120, seed=3).to_csv(path, index=False)
    cfg = load_config(workspace=workspace, environ={}, overrides={"training.nthread": 1})
    # the production model already has a challenger (here: trained explicitly into it)
    prod = train_table(cfg, path, "churned", "id", n_trials=1, progress=False, model_name="churn-model")
    assert prod.model_uri == "models:/churn-model/1"
    client = MlflowClient(cfg.mlflow_tracking_uri)
    monkeypatch.setattr(sys, "argv", ["churn", "--workspace", str(workspace), "train", "--table", str(path),
                                      "--label", "churned", "--id", "id", "--n-trials", "1", "--no-progress"])
    capsys.readouterr()
    main()
    out = capsys.readouterr().out
    assert "registered churn-model-table-accounts version 1" in out, out
    assert str(client.get_model_version_by_alias("churn-model", "challenger").version) == "1"
    assert len(client.search_model_versions("name='churn-model'")) == 1
    own = client.get_model_version_by_alias("churn-model-table-accounts", "challenger")
    assert str(own.version) == "1" and own.tags["source"] == "table"
    with pytest.raises(ChurnError, match="model name 'bad name!'"):
        train_table(cfg, path, "churned", "id", n_trials=1, progress=False, model_name="bad name!")
