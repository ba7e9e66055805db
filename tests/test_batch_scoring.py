"""Batch scoring: the offline SQL streamed as Arrow batches, scored, written as Parquet."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame
from mlflow_churn.features.registry import registry_for
from mlflow_churn.serving.batch import (
    OUTPUT_SCHEMA,
    coerce_batch,
    read_scores,
    score_batch,
    stream_features,
)
from mlflow_churn.training.model import load_scorer

AS_OF = datetime(2026, 4, 20, tzinfo=UTC)


@pytest.fixture
def champion(config: ChurnConfig, register_version):
    """A registered version with alias champion in the test's own MLflow store."""
    return register_version(config, alias="champion")


def _expected(cfg: ChurnConfig, version) -> pd.DataFrame:
    """The scores the same model gives the training builder's frame at AS_OF."""
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    frame = build_training_frame(cfg.data_dir, fs, [AS_OF], cfg.features.label_horizon_days, label=False)
    scorer = load_scorer(f"models:/{cfg.training.model_name}/{version.version}")
    return pd.DataFrame({"customer_id": frame["customer_id"].to_numpy(),
                         "expected": scorer.predict_proba(frame)})


def test_stream_is_the_training_builders_values(small_data: Path, config: ChurnConfig) -> None:
    fs = registry_for(config).feature_set("churn_default")
    frame = build_training_frame(small_data, fs, [AS_OF], 30, label=False)
    with stream_features(small_data, fs, AS_OF, batch_rows=700) as stream:
        batches = list(stream.batches)
        assert stream.rows == len(frame)
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == len(frame)
    got = pd.concat([pd.concat([pd.Series(b.column("customer_id").to_numpy(), name="customer_id"),
                                coerce_batch(fs, b)], axis=1) for b in batches], ignore_index=True)
    got = got.sort_values("customer_id").reset_index(drop=True)
    want = frame.drop(columns=["cutoff"]).sort_values("customer_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=True)
    # values outside the categories become missing, as FeatureSet.coerce does
    odd = pa.table({c: (["moon", None] if c in fs.categorical else [1, None]) for c in fs.columns})
    pd.testing.assert_frame_equal(coerce_batch(fs, odd), fs.coerce(odd.to_pandas()))


def test_score_batch_writes_the_models_probabilities(config: ChurnConfig, champion) -> None:
    result = score_batch(config, AS_OF, batch_rows=1000)
    assert result.path == config.workspace / "scores" / "date=2026-04-20"
    assert result.version == str(champion.version) and result.engine == "local"
    assert result.rows > 2000 and result.rows_per_second > 0 and result.seconds > 0
    files = sorted(p.name for p in result.path.iterdir())
    assert files == ["part-0.parquet"]
    part = pq.ParquetFile(result.path / "part-0.parquet")
    assert part.schema_arrow.equals(OUTPUT_SCHEMA)
    scores = part.read().to_pandas()
    assert len(scores) == result.rows and scores["customer_id"].is_unique
    assert set(scores["model_version"]) == {str(champion.version)}
    assert set(scores["feature_set_hash"]) == {champion.tags["feature_set_hash"]}
    assert set(scores["as_of"]) == {pd.Timestamp(AS_OF)}
    merged = scores.merge(_expected(config, champion), on="customer_id", how="outer", validate="1:1")
    assert merged.notna().all().all()
    np.testing.assert_allclose(merged["churn_probability"], merged["expected"], rtol=0, atol=1e-12)
    assert ((scores["churn_probability"] > 0) & (scores["churn_probability"] < 1)).all()
    # hive layout: the date partition reads back as a column
    hive = pd.read_parquet(config.workspace / "scores")
    assert set(hive["date"].astype(str)) == {"2026-04-20"} and len(hive) == result.rows

    # scoring the same day again with another version replaces the partition, nothing left over
    again = score_batch(config, AS_OF, model_uri=f"models:/{config.training.model_name}/{champion.version}",
                        out_dir=config.workspace / "scores", batch_rows=10_000_000, progress=True)
    assert again.rows == result.rows
    assert sorted(p.name for p in (config.workspace / "scores").iterdir()) == ["date=2026-04-20"]
    pd.testing.assert_frame_equal(
        read_scores(config.workspace / "scores", AS_OF).sort_values("customer_id").reset_index(drop=True),
        scores.sort_values("customer_id").reset_index(drop=True))


def test_bad_input_names_the_fix(config: ChurnConfig, register_version) -> None:
    register_version(config, alias="challenger")
    with pytest.raises(ChurnError, match="champion.*--model-uri"):
        score_batch(config, AS_OF)
    uri = f"models:/{config.training.model_name}@challenger"
    with pytest.raises(ChurnError, match="after the newest data"):
        score_batch(config, datetime(2027, 1, 1, tzinfo=UTC), model_uri=uri)
    with pytest.raises(ChurnError, match="less than 60 days"):
        score_batch(config, datetime(2026, 1, 20, tzinfo=UTC), model_uri=uri)
    with pytest.raises(ChurnError, match="engine must be one of"):
        score_batch(config, AS_OF, model_uri=uri, engine="dask")  # type: ignore[arg-type]
    with pytest.raises(ChurnError, match="batch_rows"):
        score_batch(config, AS_OF, model_uri=uri, batch_rows=0)
    with pytest.raises(ChurnError, match="spark://10.0.0.1:7077.*--staging"):
        score_batch(config, AS_OF, model_uri=uri, engine="spark", spark_master="spark://10.0.0.1:7077")
    assert not (config.workspace / "scores" / "date=2026-04-20").exists()


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CHURN_", "MLFLOW_"))}
    full.update(env)
    full["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "mlflow_churn.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # among the slowest of make test-fast (mlflow run in a subprocess)
def test_cli_scores_into_the_project_run(config: ChurnConfig, champion, tmp_path: Path) -> None:
    client = MlflowClient(config.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(config.training.experiment)
    parent = client.create_run(exp.experiment_id, run_name="project-run")
    env = {"MLFLOW_RUN_ID": parent.info.run_id, "MLFLOW_TRACKING_URI": config.mlflow_tracking_uri}
    out = tmp_path / "out"
    res = _cli(["--workspace", str(config.workspace), "score", "--as-of", "2026-04-20",
                "--out", str(out), "--no-progress"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert "date=2026-04-20" in res.stdout
    scores = read_scores(out, AS_OF)
    assert set(scores["model_version"]) == {str(champion.version)}
    run = client.get_run(parent.info.run_id)
    assert run.data.metrics["rows"] == len(scores)
    assert run.data.params["model_version"] == str(champion.version)
    assert run.data.params["engine"] == "local"
    # no --as-of: the newest data (2026-05-01 for small_data)
    res = _cli(["--workspace", str(config.workspace), "score", "--out", str(out), "--no-progress"],
               tmp_path, {"MLFLOW_TRACKING_URI": config.mlflow_tracking_uri})
    assert res.returncode == 0, res.stderr
    assert (out / "date=2026-05-01" / "part-0.parquet").is_file()
    res = _cli(["--workspace", str(config.workspace), "score", "--as-of", "someday", "--no-progress"],
               tmp_path, {})
    assert res.returncode == 2 and "someday" in res.stderr and "Traceback" not in res.stderr
    assert mlflow.get_tracking_uri()  # the test process' own tracking setup is untouched


@pytest.mark.slow
@pytest.mark.spark
def test_spark_engine_gives_identical_scores(config: ChurnConfig, champion, tmp_path: Path,
                                             spark) -> None:
    """Features computed by the executors (no snapshot), scored with spark_udf."""
    local = score_batch(config, AS_OF, out_dir=config.workspace / "local")
    staging = tmp_path / "staging"  # stands for the shared storage of a cluster
    on_spark = score_batch(config, AS_OF, out_dir=config.workspace / "spark", engine="spark",
                           spark=spark, spark_master="local[2]", staging=str(staging))
    assert on_spark.engine == "spark" and on_spark.rows == local.rows
    assert on_spark.features_from == "computed"
    assert staging.is_dir() and not any(staging.iterdir())  # the run's staged files are removed
    a = read_scores(config.workspace / "local", AS_OF)
    b = read_scores(config.workspace / "spark", AS_OF)
    assert len(b) == len(a)
    merged = a.merge(b, on="customer_id", suffixes=("_local", "_spark"), validate="1:1")
    assert len(merged) == len(a)
    # bit-identical: both engines run the same booster on the same float64 inputs (XGBoost
    # casts them to float32 the same way and returns float32 probabilities, widened to float64)
    np.testing.assert_array_equal(merged["churn_probability_spark"], merged["churn_probability_local"])
    for col in ("model_version", "as_of", "feature_set_hash"):
        assert (merged[f"{col}_local"] == merged[f"{col}_spark"]).all(), col


def test_the_streamed_feature_query_runs_under_the_wall_clock_limit(small_data: Path,
                                                                    config: ChurnConfig) -> None:
    """The stream is computed as it is read, so features.query_timeout_seconds covers the whole
    read: a read that outlasts it stops in one line naming the limit (DuckDB's interrupt comes
    back through pyarrow as an OSError)."""
    import time

    from mlflow_churn.errors import ChurnError
    from mlflow_churn.features.sandbox import QueryLimits, set_query_limits

    fs = registry_for(config).feature_set("churn_default")
    previous = set_query_limits(QueryLimits(timeout_seconds=3.0))
    try:
        with pytest.raises(ChurnError) as err:
            with stream_features(small_data, fs, AS_OF, batch_rows=1) as stream:
                for _ in stream.batches:
                    time.sleep(0.05)  # a slow reader: ~2,000 rows take far longer than 3 s
    finally:
        set_query_limits(previous)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("batch scoring: the feature query of")
    assert "features.query_timeout_seconds = 3 s" in msg
