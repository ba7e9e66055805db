"""Materialize's offline snapshot: `churn score` reads it instead of computing the features
again, with the same scores; a snapshot of other definitions or another instant is never used."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.features.materialize import materialize
from mlflow_churn.features.registry import registry_for
from mlflow_churn.features.snapshots import find_snapshot, read_snapshot, set_hash, write_snapshot
from mlflow_churn.serving.batch import read_scores, score_batch

AS_OF = datetime(2026, 4, 20, tzinfo=UTC)


@pytest.fixture
def champion(config: ChurnConfig, register_version):
    return register_version(config, alias="champion")


def test_score_reads_the_snapshot_and_gives_the_computed_scores(config: ChurnConfig, champion) -> None:
    computed = score_batch(config, AS_OF, batch_rows=1000)  # no snapshot yet
    assert computed.features_from == "computed"
    want = read_scores(config.workspace / "scores", AS_OF).sort_values("customer_id", ignore_index=True)

    info = materialize(config, AS_OF)
    fs = registry_for(config).feature_set(config.features.feature_set)
    snap = find_snapshot(config.feature_snapshot_dir, AS_OF, fs)
    assert snap is not None and snap.rows == info.rows and snap.batch_id == info.batch_id
    assert snap.path.parent.parent.name == "date=2026-04-20"
    assert snap.path.name == f"set={set_hash(snap.feature_hashes)}"

    result = score_batch(config, AS_OF, batch_rows=1000)
    assert result.features_from == "snapshot" and result.rows == computed.rows
    got = read_scores(config.workspace / "scores", AS_OF).sort_values("customer_id", ignore_index=True)
    pd.testing.assert_frame_equal(got, want)  # the same customers, bit-identical probabilities

    again = score_batch(config, AS_OF, batch_rows=1000, recompute=True)
    assert again.features_from == "computed"
    # another instant of the same day, or a later day, has no snapshot
    assert find_snapshot(config.feature_snapshot_dir, AS_OF + timedelta(hours=1), fs) is None
    assert score_batch(config, AS_OF + timedelta(days=1), batch_rows=1000).features_from == "computed"


def test_a_snapshot_of_other_definitions_is_never_used(config: ChurnConfig) -> None:
    fs = registry_for(config).feature_set(config.features.feature_set)
    frame = pd.DataFrame({"customer_id": [1, 2], **{c: [0, 0] for c in fs.columns}})
    changed = [dataclasses.replace(f, expression=f"({f.expression}) + 0") if i == 0 else f
               for i, f in enumerate(fs.features)]
    assert changed[0].hash != fs.features[0].hash
    root = config.feature_snapshot_dir
    write_snapshot(root, frame, AS_OF, changed)
    assert find_snapshot(root, AS_OF, fs) is None  # one definition differs: computed instead
    write_snapshot(root, frame, AS_OF, fs.features[1:])
    assert find_snapshot(root, AS_OF, fs) is None  # a feature is missing
    snap = write_snapshot(root, frame, AS_OF, fs.features)
    assert find_snapshot(root, AS_OF, fs) == snap
    with read_snapshot(snap, fs, batch_rows=1) as (rows, batches):
        assert rows == 2 and [b.num_rows for b in batches] == [1, 1]
    # written by a newer release: not read; a damaged metadata file: one clear error
    meta = snap.path / "_snapshot.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "schema_version": 99}))
    assert find_snapshot(root, AS_OF, fs) is None
    meta.write_text("{not json")
    with pytest.raises(ChurnError, match="cannot read the feature snapshot .*remove that directory"):
        find_snapshot(root, AS_OF, fs)


def test_old_snapshots_are_pruned_and_zero_days_writes_none(config: ChurnConfig) -> None:
    fs = registry_for(config).feature_set(config.features.feature_set)
    frame = pd.DataFrame({"customer_id": [1], **{c: [0] for c in fs.columns}})
    root = config.feature_snapshot_dir
    for days in (0, 5, 9):
        write_snapshot(root, frame, AS_OF + timedelta(days=days), fs.features, keep_days=7)
    assert sorted(p.name for p in root.iterdir()) == ["date=2026-04-25", "date=2026-04-29"]
    assert write_snapshot(root, frame, AS_OF + timedelta(days=10), fs.features, keep_days=0) is None
    assert not (root / "date=2026-04-30").exists()
