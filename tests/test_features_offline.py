"""Feature registry and point-in-time correct offline frames (real DuckDB over Parquet)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlflow_churn.data.bounds import data_bounds
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.offline import build_training_frame, compute_latest, daily_cutoffs
from mlflow_churn.features.registry import (
    FeatureSet,
    UnknownFeatureError,
    load_registry,
    table_feature_set,
)

CUTOFF = datetime(2026, 3, 15, tzinfo=UTC)


@pytest.fixture
def data_copy(small_data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    return out


def test_v1_and_v2_side_by_side_with_distinct_hashes() -> None:
    reg = load_registry()
    v1, v2 = reg.versions("monthly_usage")
    assert (v1.full_name, v2.full_name) == ("monthly_usage", "monthly_usage_v2")
    a, b = reg.feature_set("churn_default"), reg.feature_set("churn_v2")
    assert "monthly_usage" in a.columns and "monthly_usage_v2" in b.columns
    assert len(a.columns) >= 15
    assert a.hash != b.hash and len(a.hash) == 64
    assert FeatureSet.from_dict(a.to_dict()).hash == a.hash
    with pytest.raises(UnknownFeatureError, match="monthly_usage_v2") as err:
        reg.get("monthly_usage_v9")
    assert "monthly_usage_v2" in err.value.available


def test_user_yaml_adds_a_version_and_a_set(tmp_path: Path) -> None:
    path = tmp_path / "features.yaml"
    path.write_text(
        "features:\n"
        "  - {name: monthly_usage, version: 3, dtype: float64, source: activity, window_days: 28,\n"
        "     expression: 'sum(minutes_used)', default: 0, description: minutes in 28 days}\n"
        "feature_sets:\n"
        "  - {name: churn_v3, base: churn_default, replace: {monthly_usage: monthly_usage_v3}}\n"
    )
    reg = load_registry(path)
    fs = reg.feature_set("churn_v3")
    assert "monthly_usage_v3" in fs.columns and "monthly_usage" not in fs.columns
    path.write_text("features:\n  - {name: x, version: 1, dtype: text, source: activity}\n")
    with pytest.raises(ChurnError):
        load_registry(path)


def test_coerce_fixes_dtypes_and_names_missing_columns() -> None:
    fs = load_registry().feature_set("churn_default")
    row = {c: 1 for c in fs.columns} | {"plan": "premium", "region": "mars", "contract": None,
                                        "payment_method": "credit-card"}
    out = fs.coerce(pd.DataFrame([row]))
    assert list(out.columns) == fs.columns
    assert out["plan"].cat.codes.iloc[0] == fs.categorical["plan"].index("premium")
    assert pd.isna(out["region"].iloc[0]) and pd.isna(out["contract"].iloc[0])
    with pytest.raises(ChurnError, match="monthly_usage"):
        fs.coerce(pd.DataFrame([{k: v for k, v in row.items() if k != "monthly_usage"}]))
    with pytest.raises(ChurnError, match="'age' must be numeric"):
        fs.coerce(pd.DataFrame([row | {"age": "old"}]))


def test_table_feature_set_infers_categories() -> None:
    fs = table_feature_set("t", pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}))
    assert fs.categorical == {"b": ["x", "y"]} and fs.from_table


def test_frame_rows_are_live_customers_and_labels_match_events(small_data: Path) -> None:
    fs = load_registry().feature_set("churn_default")
    frame = build_training_frame(small_data, fs, [CUTOFF], horizon_days=30)
    customers = pd.read_parquet(small_data / "customers.parquet")
    churn = pd.read_parquet(small_data / "churn_events.parquet")
    churned_by = set(churn.loc[churn.event_timestamp <= CUTOFF, "customer_id"])
    signed = set(customers.loc[customers.event_timestamp <= CUTOFF, "customer_id"])
    assert set(frame.customer_id) == signed - churned_by
    in_horizon = churn[(churn.event_timestamp > CUTOFF)
                       & (churn.event_timestamp <= CUTOFF + timedelta(days=30))]
    assert set(frame.loc[frame.label == 1, "customer_id"]) == set(in_horizon.customer_id) & signed
    # monthly_usage = the sum of the 30 daily rows that closed at or before the cutoff
    cid = int(frame.customer_id.iloc[10])
    days = pd.concat(
        pd.read_parquet(small_data / "activity" / f"date={(CUTOFF - timedelta(days=k)).date()}")
        for k in range(1, 31)
    )
    expected = days.loc[days.customer_id == cid, "minutes_used"].astype("float64").sum()
    got = frame.loc[frame.customer_id == cid, "monthly_usage"].iloc[0]
    assert got == pytest.approx(expected, rel=1e-5)


def test_planted_future_events_never_leak(data_copy: Path) -> None:
    fs = load_registry().feature_set("churn_default")
    before = build_training_frame(data_copy, fs, [CUTOFF], horizon_days=30, label=False)
    cid = int(before.customer_id.iloc[0])
    # a huge usage day stamped one microsecond after the cutoff, inside the partition of that day
    future = pa.table({
        "customer_id": pa.array([cid], pa.int64()),
        "event_timestamp": pa.array([CUTOFF + timedelta(microseconds=1)], pa.timestamp("us", tz="UTC")),
        "created": pa.array([CUTOFF + timedelta(microseconds=1)], pa.timestamp("us", tz="UTC")),
        "sessions": pa.array([999], pa.int32()), "minutes_used": pa.array([1e6], pa.float32()),
        "data_used_mb": pa.array([1e6], pa.float32()), "support_calls": pa.array([99], pa.int32()),
        "failed_payments": pa.array([9], pa.int32()), "dropped_calls": pa.array([9], pa.int32()),
    })
    pq.write_table(future, data_copy / "activity" / f"date={CUTOFF.date()}" / "part-planted.parquet")
    # and a churn event just after the horizon: must stay label 0
    churn = pq.read_table(data_copy / "churn_events.parquet").to_pandas()
    churn = churn[churn.customer_id != cid]
    late = CUTOFF + timedelta(days=31)
    planted = pd.DataFrame({"customer_id": [cid], "churn_date": [late.date()],
                            "event_timestamp": [late], "created": [late]})
    pq.write_table(pa.Table.from_pandas(pd.concat([churn, planted]), preserve_index=False),
                   data_copy / "churn_events.parquet")
    after = build_training_frame(data_copy, fs, [CUTOFF], horizon_days=30)
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after[before.columns].reset_index(drop=True))
    assert after.loc[after.customer_id == cid, "label"].iloc[0] == 0
    # the same event is seen by a cutoff one day later
    later = build_training_frame(data_copy, fs, [CUTOFF + timedelta(days=1)], horizon_days=30, label=False)
    assert later.loc[later.customer_id == cid, "monthly_usage"].iloc[0] > 1e6


def test_online_values_equal_offline_values(small_data: Path) -> None:
    reg = load_registry()
    fs = reg.feature_set("churn_v2")
    offline = build_training_frame(small_data, fs, [CUTOFF], horizon_days=30, label=False)
    latest = compute_latest(small_data, fs.features, CUTOFF)
    online = fs.coerce(latest.frame.set_index("customer_id").loc[offline.customer_id].reset_index())
    np.testing.assert_allclose(online.select_dtypes("number").to_numpy(),
                               offline[fs.columns].select_dtypes("number").to_numpy(), rtol=1e-9)
    assert latest.watermark == CUTOFF


def test_label_as_of_and_windows(small_data: Path) -> None:
    fs = load_registry().feature_set("churn_default")
    with pytest.raises(ChurnError, match="mature only at 2026-04-14"):
        build_training_frame(small_data, fs, [CUTOFF], 30, label_as_of=CUTOFF + timedelta(days=10))
    with pytest.raises(ChurnError, match="no cutoffs"):
        build_training_frame(small_data, fs, [], 30)
    with pytest.raises(ChurnError, match="use cutoffs from 2026-03-02 on"):
        build_training_frame(small_data, fs, [datetime(2026, 2, 1, tzinfo=UTC)], 30)
    with pytest.raises(ChurnError, match="after the newest data"):
        build_training_frame(small_data, fs, [datetime(2026, 6, 1, tzinfo=UTC)], 30, label=False)
    bounds = data_bounds(small_data)
    assert str(bounds.first_day) == "2026-01-01" and str(bounds.last_day) == "2026-04-30"
    cuts = daily_cutoffs(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 29, 13, tzinfo=UTC), 7)
    assert [c.day for c in cuts] == [1, 8, 15, 22, 29]
