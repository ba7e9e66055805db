"""`churn score`: batch-score every customer at one date into date-partitioned Parquet."""

from __future__ import annotations

import typer
from rich.table import Table

from mlflow_churn.cli_common import (
    SPARK_MASTER_OPTION,
    as_of_or_latest,
    console,
    engine_option,
    get_config,
    opt_str,
    progress_arg,
    staging_option,
    writable_dir,
)
from mlflow_churn.errors import ChurnError


def score(
    ctx: typer.Context,
    as_of: str = typer.Option(
        None, "--as-of", help="Score at this instant, ISO date/time UTC (default: the newest data)."
    ),
    engine: str = engine_option("spark_udf; local: Arrow batches, all cores"),
    model_uri: str = typer.Option(
        None, "--model-uri", help="MLflow model URI (default: models:/<training.model_name>@champion)."
    ),
    out: str = typer.Option(None, "--out", help="Output directory (default: <workspace>/scores)."),
    batch_rows: int = typer.Option(None, "--batch-rows", help="Rows per Arrow batch (default 131072)."),
    spark_master: str = SPARK_MASTER_OPTION,
    staging: str = staging_option("the staged features and scores"),
    recompute: bool = typer.Option(
        False, "--recompute", help="Compute the features from the tables even when materialize left a "
        "snapshot at --as-of with the model's definitions (default: read the snapshot)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Score every customer alive at --as-of from the offline features into Parquet.

    Writes <out>/date=YYYY-MM-DD/ (customer_id, churn_probability, model_version, as_of,
    feature_set_hash)."""
    from mlflow_churn.serving.batch import DEFAULT_BATCH_ROWS, ENGINES, score_batch

    cfg = get_config(ctx)
    if engine not in ENGINES:
        raise ChurnError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if batch_rows is not None and batch_rows < 1:
        raise ChurnError(f"--batch-rows must be >= 1, got {batch_rows}")
    when = as_of_or_latest(cfg, as_of)
    if opt_str(out):  # before any model is loaded: a bad --out fails at once
        writable_dir(out, "--out")
    result = score_batch(cfg, when, model_uri=opt_str(model_uri), out_dir=opt_str(out),
                         engine=engine, batch_rows=batch_rows or DEFAULT_BATCH_ROWS,
                         progress=progress_arg(progress), spark_master=opt_str(spark_master),
                         staging=opt_str(staging), recompute=recompute)
    table = Table(title=f"churn score: {result.engine} engine")
    table.add_column("as_of")
    table.add_column("model")
    table.add_column("features")
    table.add_column("rows", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("rows/s", justify="right")
    table.add_column("path")
    table.add_row(result.as_of.isoformat(), f"{result.model_uri} (v{result.version})", result.features_from,
                  f"{result.rows:,}", f"{result.seconds:.2f}", f"{result.rows_per_second:,.0f}",
                  str(result.path))
    console.print(table)
    from mlflow_churn.tracking import log_to_project_run

    # inside `mlflow run . -e score`: resolved values under their own keys (the project run
    # holds the raw as_of / model_uri)
    log_to_project_run(
        params={"scored_as_of": result.as_of.isoformat(), "engine": result.engine,
                "resolved_model_uri": result.model_uri, "model_version": result.version,
                "feature_set_hash": result.feature_set_hash, "output": str(result.path),
                "features_from": result.features_from},
        metrics={"rows": result.rows, "seconds": result.seconds, "rows_per_second": result.rows_per_second})


def register(app: typer.Typer) -> None:
    """Add ``churn score`` to ``app``."""
    app.command("score")(score)
