"""The churn simulator: reproducibility, layout, scenarios doing what they claim, bad input."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_churn.data.simulator import SimulationSpec, read_manifest, simulate
from mlflow_churn.data.tables import TablePaths, register_views
from mlflow_churn.errors import ChurnError

START = date(2026, 1, 1)


def _digest(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*")) if p.is_file()
    }


def _sim(tmp_path: Path, scenario: str, customers: int = 3000, days: int = 70, onset: int = 35,
         seed: int = 3) -> Path:
    out = tmp_path / scenario / "data"
    simulate(SimulationSpec(customers=customers, days=days, start=START, scenario=scenario,
                            seed=seed, onset_day=onset), out)
    return out


def _monthly(data_dir: Path, end_day: int, column: str = "minutes_used") -> pd.DataFrame:
    """Per-customer 30-day sums of ``column`` and static attributes, as of the end of day index."""
    con = duckdb.connect()
    register_views(con, TablePaths(data_dir))
    cutoff = pd.Timestamp(START + timedelta(days=end_day), tz="UTC")
    return con.execute(
        f"""SELECT a.customer_id, sum({column}) AS total, count({column}) AS n, count(*) AS days,
                   any_value(c.region) AS region
            FROM activity a JOIN customers c USING (customer_id)
            WHERE a.event_timestamp <= ? AND a.event_timestamp > ? - INTERVAL 30 DAY
            GROUP BY 1""",
        [cutoff, cutoff],
    ).df()


def _psi(ref: np.ndarray, cur: np.ndarray, bins: int = 10) -> float:
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    p = np.clip(np.histogram(ref, edges)[0] / ref.size, 1e-4, None)
    q = np.clip(np.histogram(cur, edges)[0] / cur.size, 1e-4, None)
    return float(np.sum((q - p) * np.log(q / p)))


def test_same_seed_same_bytes_and_layout(tmp_path: Path) -> None:
    spec = SimulationSpec(customers=500, days=10, start=START, scenario="usage_shift", seed=11)
    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    simulate(spec, a)
    simulate(spec, b)
    assert _digest(a) == _digest(b)
    assert (a / "customers.parquet").is_file() and (a / "churn_events.parquet").is_file()
    days = sorted(p.name for p in (a / "activity").iterdir())
    assert days[0] == "date=2026-01-01" and days[-1] == "date=2026-01-10" and len(days) == 10
    other = tmp_path / "c" / "data"
    simulate(SimulationSpec(customers=500, days=10, start=START, scenario="usage_shift", seed=12), other)
    assert _digest(a)["customers.parquet"] != _digest(other)["customers.parquet"]


def test_tables_are_point_in_time_consistent(small_data: Path) -> None:
    con = duckdb.connect()
    register_views(con, TablePaths(small_data))
    # daily aggregates are stamped at the end of their day
    bad = con.execute(
        "SELECT count(*) FROM activity WHERE event_timestamp <> CAST(date AS TIMESTAMP) + INTERVAL 1 DAY"
    ).fetchone()[0]
    assert bad == 0
    # nobody is active on or after their churn date, nobody before signing up
    after = con.execute(
        """SELECT count(*) FROM activity a JOIN churn_events e USING (customer_id)
           WHERE a.event_timestamp > e.event_timestamp"""
    ).fetchone()[0]
    before = con.execute(
        """SELECT count(*) FROM activity a JOIN customers c USING (customer_id)
           WHERE CAST(a.date AS DATE) < c.signup_date"""
    ).fetchone()[0]
    assert after == 0 and before == 0
    assert con.execute("SELECT count(DISTINCT customer_id) = count(*) FROM churn_events").fetchone()[0]
    rate = con.execute("SELECT count(*) FROM churn_events").fetchone()[0] / 3000
    assert 0.05 < rate < 0.35  # a few percent a month over 120 days
    manifest = read_manifest(small_data)
    assert manifest["rows"]["churn_events"] == con.execute("SELECT count(*) FROM churn_events").fetchone()[0]
    for col in ("plan", "region", "contract", "payment_method", "monthly_charge", "signup_date"):
        assert col in con.execute("SELECT * FROM customers LIMIT 1").df().columns


def test_stable_does_not_move_usage(tmp_path: Path) -> None:
    data = _sim(tmp_path, "stable")
    pre, post = _monthly(data, 35), _monthly(data, 70)
    assert _psi(pre.total.to_numpy(), post.total.to_numpy()) < 0.05


def test_usage_shift_moves_usage_after_onset_only(tmp_path: Path) -> None:
    data = _sim(tmp_path, "usage_shift")
    early, pre, post = _monthly(data, 30), _monthly(data, 35), _monthly(data, 70)
    assert _psi(early.total.to_numpy(), pre.total.to_numpy()) < 0.05
    psi = _psi(pre.total.to_numpy(), post.total.to_numpy())
    assert 0.2 < psi < 0.6, psi  # designed around 0.35
    # support calls are untouched
    a, b = _monthly(data, 35, "support_calls"), _monthly(data, 70, "support_calls")
    assert _psi(a.total.to_numpy(), b.total.to_numpy()) < 0.05


def test_gradual_ramps(tmp_path: Path) -> None:
    data = _sim(tmp_path, "gradual", days=100, onset=30)
    pre = _monthly(data, 30).total.to_numpy()
    mid, late = _monthly(data, 50).total.to_numpy(), _monthly(data, 100).total.to_numpy()
    assert _psi(pre, mid) < _psi(pre, late)
    assert _psi(pre, late) > 0.2


def _segment_churn(data: Path, first: int, last: int) -> tuple[float, float]:
    con = duckdb.connect()
    register_views(con, TablePaths(data))
    lo, hi = START + timedelta(days=first), START + timedelta(days=last)
    rows = con.execute(
        """SELECT c.region = 'pacific' AS seg, count(e.customer_id) / count(*) AS rate
           FROM customers c LEFT JOIN churn_events e
             ON e.customer_id = c.customer_id AND e.churn_date > ? AND e.churn_date <= ?
           GROUP BY 1 ORDER BY 1""",
        [lo, hi],
    ).fetchall()
    return rows[1][1], rows[0][1]  # (segment, rest)


def test_segment_shift_hits_one_segment_only(tmp_path: Path) -> None:
    data = _sim(tmp_path, "segment_shift", customers=6000)
    seg_pre, rest_pre = _segment_churn(data, 0, 35)
    seg_post, rest_post = _segment_churn(data, 35, 70)
    assert seg_post > 1.6 * seg_pre
    assert rest_post < 1.3 * rest_pre
    pre, post = _monthly(data, 35), _monthly(data, 70)
    assert _psi(pre.total.to_numpy(), post.total.to_numpy()) < 0.1  # population barely moves
    seg = lambda f: f[f.region == "pacific"].total.to_numpy()  # noqa: E731
    assert _psi(seg(pre), seg(post)) > 0.1


def test_usage_and_segment_combines_both(tmp_path: Path) -> None:
    data = _sim(tmp_path, "usage_and_segment", customers=6000)
    pre, post = _monthly(data, 35), _monthly(data, 70)
    assert _psi(pre.total.to_numpy(), post.total.to_numpy()) > 0.2
    seg_pre, _ = _segment_churn(data, 0, 35)
    seg_post, _ = _segment_churn(data, 35, 70)
    assert seg_post > 1.6 * seg_pre


def _usage_auc(data: Path, cutoff_day: int) -> float:
    """AUC of low usage + many support calls as a churn score, 30 days ahead."""
    con = duckdb.connect()
    register_views(con, TablePaths(data))
    cutoff = pd.Timestamp(START + timedelta(days=cutoff_day), tz="UTC")
    df = con.execute(
        """WITH f AS (
             SELECT customer_id, sum(minutes_used) AS usage, sum(support_calls) AS calls
             FROM activity WHERE event_timestamp <= ? AND event_timestamp > ? - INTERVAL 30 DAY
             GROUP BY 1)
           SELECT f.*, (e.event_timestamp IS NOT NULL AND e.event_timestamp <= ? + INTERVAL 30 DAY)::INT AS y
           FROM f LEFT JOIN churn_events e USING (customer_id)
           WHERE e.event_timestamp IS NULL OR e.event_timestamp > ?""",
        [cutoff, cutoff, cutoff, cutoff],
    ).df()
    score = df.calls.rank() - df.usage.rank()
    return roc_auc_score(df.y, score)


def test_concept_drift_breaks_the_behaviour_churn_relation(tmp_path: Path) -> None:
    stable = _sim(tmp_path, "stable", customers=8000, days=100, onset=40)
    drift = _sim(tmp_path, "concept_drift", customers=8000, days=100, onset=40)
    assert _usage_auc(drift, 5) == pytest.approx(_usage_auc(stable, 5), abs=1e-12)  # same before onset
    assert _usage_auc(stable, 60) > 0.62
    assert _usage_auc(drift, 60) < _usage_auc(stable, 60) - 0.06


def test_data_outage_nulls_part_of_a_feature_after_onset(tmp_path: Path) -> None:
    data = _sim(tmp_path, "data_outage", customers=2000, days=20, onset=10)
    con = duckdb.connect()
    register_views(con, TablePaths(data))
    rows = con.execute(
        """SELECT CAST(date AS DATE) >= DATE '2026-01-11' AS after, avg((data_used_mb IS NULL)::INT)
           FROM activity GROUP BY 1 ORDER BY 1"""
    ).fetchall()
    assert rows[0][1] == 0.0
    assert 0.2 < rows[1][1] < 0.4


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"customers": -5}, "--customers"),
        ({"days": 0}, "--days"),
        ({"scenario": "chaos"}, "chaos"),
        ({"onset_day": 99}, "--onset-day"),
        ({"segment_value": "mars"}, "mars"),
    ],
)
def test_bad_spec_is_named(tmp_path: Path, kwargs: dict, needle: str) -> None:
    base = {"customers": 10, "days": 5, "start": START}
    with pytest.raises(ChurnError, match=needle):
        simulate(SimulationSpec(**{**base, **kwargs}), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_existing_dataset_is_kept_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    simulate(SimulationSpec(customers=50, days=3, start=START), out)
    before = _digest(out)
    with pytest.raises(ChurnError, match="--overwrite"):
        simulate(SimulationSpec(customers=60, days=3, start=START), out)
    assert _digest(out) == before

    @contextmanager
    def boom(label: str, total: int):  # a progress factory whose second tick crashes
        days = []

        def tick(n: int = 1) -> None:
            days.append(n)
            if len(days) == 2:
                raise RuntimeError("crash mid-simulation")

        yield tick

    with pytest.raises(RuntimeError):
        simulate(SimulationSpec(customers=60, days=3, start=START), out, overwrite=True, progress=boom)
    assert _digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    simulate(SimulationSpec(customers=60, days=3, start=START), out, overwrite=True)
    assert read_manifest(out)["customers"] == 60


@pytest.mark.slow
def test_segment_concept_changes_who_churns_in_one_segment_only(tmp_path: Path) -> None:
    """The seed's scenario (config seed 42, segment region=pacific): a model trained before the
    onset on the feature store's features loses AUC on the segment while the population's moves
    by < 0.01 and the features do not drift; churn rates hold. Paired with ``stable`` at the same
    seed, which it equals up to the onset."""
    import xgboost as xgb

    from mlflow_churn.config import load_config
    from mlflow_churn.features.offline import build_training_frame
    from mlflow_churn.features.registry import registry_for
    from mlflow_churn.stats.drift import psi
    from mlflow_churn.times import midnight

    spec = {"customers": 40_000, "days": 140, "start": START, "seed": 42, "onset_day": 100}
    simulate(SimulationSpec(scenario="stable", **spec), tmp_path / "stable")
    simulate(SimulationSpec(scenario="segment_concept", **spec), tmp_path / "concept")
    before = {k: v for k, v in _digest(tmp_path / "stable").items() if "date=2026-03" in k}
    assert before and before == {k: v for k, v in _digest(tmp_path / "concept").items() if k in before}
    assert read_manifest(tmp_path / "concept")["segment"] == {"column": "region", "value": "pacific"}

    cfg = load_config(environ={})
    fs = registry_for(cfg).feature_set(cfg.features.feature_set)
    day = lambda i: midnight(START + timedelta(days=i))  # noqa: E731
    train = build_training_frame(tmp_path / "stable", fs, [day(60), day(65), day(70)], 30, label=True)
    model = xgb.XGBClassifier(n_estimators=150, max_depth=4, learning_rate=0.05, enable_categorical=True,
                              tree_method="hist", nthread=2).fit(fs.coerce(train), train["label"])
    auc, rate, frames = {}, {}, {}
    for name in ("stable", "concept"):
        frame = build_training_frame(tmp_path / name, fs, [day(102), day(106), day(109)], 30, label=True,
                                     label_as_of=day(139))
        scores, y = model.predict_proba(fs.coerce(frame))[:, 1], frame["label"].to_numpy()
        seg = (frame["region"] == "pacific").to_numpy()
        auc[name] = (roc_auc_score(y, scores), roc_auc_score(y[seg], scores[seg]))
        rate[name] = (y.mean(), y[seg].mean())
        frames[name] = frame
    population_move, segment_drop = (auc["stable"][i] - auc["concept"][i] for i in (0, 1))
    assert segment_drop > 0.05, segment_drop
    assert abs(population_move) < 0.01, population_move
    assert rate["concept"][0] == pytest.approx(rate["stable"][0], rel=0.05)
    assert rate["concept"][1] == pytest.approx(rate["stable"][1], rel=0.25)
    for col in ("monthly_usage", "support_calls_30d", "usage_trend", "monthly_charge"):
        assert psi(train[col].to_numpy(dtype=float), frames["concept"][col].to_numpy(dtype=float)) < 0.1, col
