"""The canary verdict as a pure function of what each route served (no MLflow, no I/O)."""

from __future__ import annotations

from mlflow_churn.config import load_config
from mlflow_churn.serving.canary import RouteStats, canary_verdict

CFG = load_config(environ={})
N = CFG.serving.min_canary_samples


def _route(route: str, version: str | None, rows: int = N, **kw) -> RouteStats:
    base = {"scored": rows, "error_rate": 0.0, "p50_latency_ms": 2.0, "p99_latency_ms": 5.0}
    return RouteStats(route, version, rows, **{**base, **kw})


def test_no_canary_waits() -> None:
    verdict, reasons = canary_verdict(_route("champion", "1"), _route("canary", None, 0), CFG)
    assert verdict == "wait" and "has alias canary" in reasons[0]


def test_too_few_predictions_wait() -> None:
    verdict, reasons = canary_verdict(_route("champion", "1"), _route("canary", "2", N - 1), CFG)
    assert verdict == "wait" and f"min_canary_samples={N}" in reasons[0]


def test_within_every_limit_promotes() -> None:
    verdict, reasons = canary_verdict(_route("champion", "1"), _route("canary", "2"), CFG, score_psi=0.01)
    assert verdict == "promote" and "within every limit" in reasons[0]


def test_errors_latency_and_score_psi_roll_back() -> None:
    sv = CFG.serving
    errors = _route("canary", "2", error_rate=sv.max_error_rate + 0.01)
    assert canary_verdict(_route("champion", "1"), errors, CFG)[0] == "rollback"
    slow = _route("canary", "2", p99_latency_ms=max(sv.max_p99_ms, 5.0 * sv.max_p99_ratio) * 2 + 1)
    verdict, reasons = canary_verdict(_route("champion", "1"), slow, CFG)
    assert verdict == "rollback" and "p99 latency" in reasons[0]
    verdict, reasons = canary_verdict(_route("champion", "1"), _route("canary", "2"), CFG,
                                      score_psi=sv.max_score_psi + 0.05)
    assert verdict == "rollback" and "score PSI" in reasons[0]
    # the PSI the gate measured between the two versions is allowed on top
    assert canary_verdict(_route("champion", "1"), _route("canary", "2"), CFG,
                          score_psi=sv.max_score_psi + 0.05, expected_psi=0.1)[0] == "promote"


def test_auc_drop_beyond_noise_rolls_back() -> None:
    many = 50 * N
    champ = _route("champion", "1", many, labelled=many, positives=many // 5, auc=0.80, recall_at_k=0.5)
    worse = _route("canary", "2", many, labelled=many, positives=many // 5, auc=0.60, recall_at_k=0.5)
    verdict, reasons = canary_verdict(champ, worse, CFG)
    assert verdict == "rollback" and any("canary AUC" in r for r in reasons)
    same = _route("canary", "2", many, labelled=many, positives=many // 5, auc=0.80, recall_at_k=0.5)
    assert canary_verdict(champ, same, CFG)[0] == "promote"
