"""Feast as a peer of our online store; run ONLY inside the separate venv bench/.feast-venv.

Feast is not a dependency of this project. ``bench/bench_features.py`` runs this script
with that venv's interpreter as a subprocess:

    bench/.feast-venv/bin/python bench/feast_peer.py FEATURES.parquet WORKDIR IDS.json LOOKUPS

``FEATURES.parquet`` holds the very rows our materialization wrote (customer_id,
event_timestamp, the served features; Feast's FileSource cannot compute windowed
aggregates, so it gets them precomputed: its materialize only loads and writes, ours also
computes). Feast gets a SQLite online store, a local provider, the same 100-id lookups.
Prints one JSON object on stdout: materialize seconds, lookup latencies (ms), rows.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd


def main(argv: list[str]) -> int:
    parquet, workdir, ids_path, lookups = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    import feast
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.repo_config import RepoConfig
    from feast.types import Float64, Int64, String

    frame = pd.read_parquet(parquet)
    features = [c for c in frame.columns if c not in ("customer_id", "event_timestamp")]
    types = {}
    for c in features:
        kind = frame[c].dtype.kind
        types[c] = String if kind in "OUS" else Int64 if kind in "iu" else Float64
    workdir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project="churn_bench", provider="local", registry=str(workdir / "registry.db"),
        online_store={"type": "sqlite", "path": str(workdir / "online.db")},
        offline_store={"type": "dask"}, entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    store = FeatureStore(config=config)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(path=str(parquet), timestamp_field="event_timestamp")
    view = FeatureView(name="churn_features", entities=[customer], ttl=timedelta(days=3650),
                       schema=[Field(name=c, dtype=types[c]) for c in features], source=source,
                       online=True)
    store.apply([customer, view])
    start = frame["event_timestamp"].min().to_pydatetime() - timedelta(seconds=1)
    end = frame["event_timestamp"].max().to_pydatetime() + timedelta(seconds=1)
    t0 = time.perf_counter()
    store.materialize(start, end)
    materialize_s = time.perf_counter() - t0

    id_lists = json.loads(ids_path.read_text())
    refs = [f"churn_features:{c}" for c in features]
    store.get_online_features(refs, [{"customer_id": i} for i in id_lists[0]]).to_dict()  # warm-up
    times = []
    found = 0
    for i in range(lookups):
        ids = id_lists[i % len(id_lists)]
        t0 = time.perf_counter()
        out = store.get_online_features(refs, [{"customer_id": c} for c in ids]).to_dict()
        times.append((time.perf_counter() - t0) * 1000)
        found += sum(v is not None for v in out[features[0]])
    times.sort()
    print(json.dumps({
        "feast_version": feast.__version__, "rows": len(frame), "features": len(features),
        "materialize_s": materialize_s, "lookup_p50_ms": statistics.median(times),
        "lookup_p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
        "lookups": lookups, "found_share": found / (lookups * len(id_lists[0])),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
