"""Live canary analysis from the prediction log: route statistics, the verdict, the status.

:func:`evaluate_canary` compares the canary with the champion on the traffic they served
(rows of the prediction log with ``as_of`` in ``[since, as_of]``, each route restricted
to the version its alias points at now):

- error rate (rows with status ``error`` / all rows of the route), p99 latency (ms);
- the PSI of the canary's score distribution against the champion's
  (:func:`mlflow_churn.stats.drift.psi`, champion = reference);
- once labels have matured (``churn_events`` of the data, horizon
  ``features.label_horizon_days``, :func:`~mlflow_churn.serving.prediction_log.attach_labels`)
  AUC and recall@k per route (:func:`mlflow_churn.stats.metrics.classification_metrics`).

Verdict: ``wait`` until the canary has ``serving.min_canary_samples`` scored rows; then
``rollback`` if its error rate > ``max_error_rate``, p99 > ``max_p99_ms`` while also above
``max_p99_ratio`` x the champion's p99 (a loaded host slows both routes), score PSI >
``max_score_psi`` + the PSI the gate measured between the same two versions on its holdout
(tag ``gate_score_psi``: a retrained model scores differently from a drifted champion by
design; the live split should not differ much more than that), or (with at least
``min_canary_samples`` labelled rows on both routes) AUC below the champion's by more than
``max_auc_drop`` or recall@k by more than ``evaluation.recall_tolerance`` (each widened to
2.326 standard errors of the difference: the routes score disjoint random customers, so
small samples differ by chance); else ``promote``.

With ``log_run`` the verdict is recorded on the canary version: tags for people
(``canary_decision``, ``canary_run_id``) and the signed canary decision ``churn.sig.canary``
(:mod:`mlflow_churn.registry.signing`: the verdict, the evaluation run, the champion it was
compared with, a digest of the metrics), which is what the guard and ``churn canary promote``
trust. The transitions that act on a verdict (promote, rollback) are in
:mod:`mlflow_churn.serving.transitions`.

The canary's arm is the log's ``canary`` rows, or with ``canary.mode: shadow`` its
``shadow`` rows (the canary's scores of customers the champion answered;
:func:`arm_routes`); rows of forced test requests (``X-Churn-Route``) are in neither arm.

With ``canary.judge.enabled`` (or ``evaluate_canary(..., use_judge=True)``) the verdict comes
from the canary judge instead (:func:`judge_canary` over
:func:`mlflow_churn.serving.judge.judge`: per metric a test and a tolerance band, weighted
groups, pass / marginal / fail): ``pass`` = promote, ``marginal`` = wait, ``fail`` = rollback,
still ``wait`` below ``serving.min_canary_samples`` canary rows; ``decision.json`` then carries
the judge's every metric (statistic, effect, p-value, decision) under ``judge``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.bounds import latest_as_of
from mlflow_churn.errors import ChurnError
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.aliases import (
    alias_version,
    aliases_of,
)
from mlflow_churn.registry.promotion import record_canary_verdict
from mlflow_churn.registry.signing import record_signed, version_ref
from mlflow_churn.registry.vocab import CanaryVerdict, SignedKind
from mlflow_churn.serving.judge import ACTIONS, JudgeVerdict, MetricCall, judge, judge_figure
from mlflow_churn.serving.prediction_log import PredictionLog, attach_labels
from mlflow_churn.serving.routing import CHAMPION_ROUTE, Route, canary_arm_route
from mlflow_churn.stats.drift import psi
from mlflow_churn.stats.metrics import classification_metrics
from mlflow_churn.stats.performance import auc_standard_error
from mlflow_churn.times import utc
from mlflow_churn.tracking import setup_mlflow, step_run
from mlflow_churn.training.profile import NoProfile, profile_for_version

ROUTES = (Route.CHAMPION, Route.CANARY)


@dataclass
class RouteStats:
    """What one route served: counts, errors, latency, score summary, labelled metrics."""

    route: str
    version: str | None
    rows: int = 0
    scored: int = 0
    not_found: int = 0
    errors: int = 0
    error_rate: float = float("nan")
    p50_latency_ms: float = float("nan")
    p99_latency_ms: float = float("nan")
    mean_score: float = float("nan")
    labelled: int = 0
    positives: int = 0
    auc: float = float("nan")
    recall_at_k: float = float("nan")


@dataclass
class CanaryEvaluation:
    """The verdict (:class:`~mlflow_churn.registry.vocab.CanaryVerdict`: promote | rollback |
    wait), why, and the evidence."""

    verdict: CanaryVerdict
    reasons: list[str]
    model_name: str
    champion_version: str | None
    canary_version: str | None
    as_of: datetime
    since: datetime | None
    routes: dict[str, RouteStats]
    score_psi: float = float("nan")
    run_id: str | None = None
    judge: dict[str, Any] | None = None  # the canary judge's verdict (JudgeVerdict.to_dict) when it decided

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        out["since"] = self.since.isoformat() if self.since else None
        return jsonable(out)


@dataclass
class CanaryStatus:
    """Aliases and the traffic logged per route and version."""

    model_name: str
    aliases: dict[str, str]
    canary_fraction: float
    logged: dict[str, int]  # "route/version" -> rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_client(cfg: ChurnConfig) -> MlflowClient:
    setup_mlflow(cfg)
    uri = cfg.mlflow_tracking_uri
    return MlflowClient(uri, uri)



def canary_status(cfg: ChurnConfig, as_of: datetime | None = None,
                  since: datetime | None = None) -> CanaryStatus:
    """Aliases of the configured model and the rows logged per route/version, restricted
    to business times in ``[since, as_of]`` when given (tz-aware UTC)."""
    client = registry_client(cfg)
    name = cfg.training.model_name
    frame = _logged(cfg, as_of, since)
    logged: dict[str, int] = {}
    if len(frame):
        for (r, v), n in frame.groupby(["route", "model_version"]).size().items():
            logged[f"{r}/v{v}"] = int(n)
    return CanaryStatus(name, aliases_of(client, name), cfg.serving.canary_fraction, logged)


def _logged(cfg: ChurnConfig, as_of: datetime | None, since: datetime | None,
            served_since: datetime | None = None) -> pd.DataFrame:
    """Rows of the prediction log with ``since <= as_of column <= as_of`` (bounds optional),
    served at or after ``served_since`` (optional)."""
    log = PredictionLog(cfg.prediction_log_url)
    try:
        until = utc(as_of) + timedelta(microseconds=1) if as_of else None  # as_of inclusive
        return log.read(since=utc(since) if since else None, until=until, served_since=served_since)
    finally:
        log.close()


def _served_by(frame: pd.DataFrame, route: str, mv: ModelVersion | None) -> pd.DataFrame:
    """The rows ``route`` served with version ``mv`` itself: its number, and served after
    it was created. The log keeps numbers; a number re-used after the model was deleted and
    re-created is another model (another identity), whose rows all predate the new one.
    Rows of test requests whose route was forced (``forced``, the ``X-Churn-Route`` header)
    are no evidence and are left out."""
    if mv is None:
        return frame.iloc[0:0]
    created = pd.Timestamp(int(mv.creation_timestamp or 0), unit="ms", tz="UTC")
    keep = (frame["route"] == route) & (frame["model_version"] == str(mv.version))
    if "forced" in frame.columns:
        keep &= pd.to_numeric(frame["forced"], errors="coerce").fillna(0).to_numpy() == 0
    return frame[keep & (frame["served_at"] >= created)]


def arm_routes(cfg: ChurnConfig) -> dict[str, str]:
    """Arm -> the log route whose rows it is judged on: the champion's ``champion`` rows; the
    canary's ``canary`` rows (``canary.mode: split``) or ``shadow`` rows (``shadow``)."""
    return {Route.CHAMPION: CHAMPION_ROUTE, Route.CANARY: canary_arm_route(cfg.canary.mode)}


def default_as_of(cfg: ChurnConfig, now: datetime) -> datetime:
    """The evaluation time when none is given: the newest event of the data (labels are
    known up to it); without data, the newest business time in the prediction log (every
    logged row counts, no labels); with neither, ``now`` (tz-aware UTC)."""

    try:
        return latest_as_of(cfg.data_dir)
    except ChurnError:
        pass
    log = PredictionLog(cfg.prediction_log_url)
    try:
        newest = log.newest_as_of()
    finally:
        log.close()
    return newest or utc(now)


# --------------------------------------------------------------------------- evaluation
def _route_stats(route: str, version: str | None, rows: pd.DataFrame) -> RouteStats:
    st = RouteStats(route, version, rows=len(rows))
    if not len(rows):
        return st
    ok = rows[rows["status"] == "ok"]
    st.scored = len(ok)
    st.not_found = int((rows["status"] == "not_found").sum())
    st.errors = int((rows["status"] == "error").sum())
    st.error_rate = st.errors / len(rows)
    lat = rows["latency_ms"].dropna().to_numpy(dtype="float64")
    if lat.size:
        st.p50_latency_ms = float(np.percentile(lat, 50))
        st.p99_latency_ms = float(np.percentile(lat, 99))
    if len(ok):
        st.mean_score = float(ok["score"].mean())
    return st


def _churn_events(cfg: ChurnConfig) -> pd.DataFrame | None:
    path = cfg.data_dir / "churn_events.parquet"
    if not path.is_file():
        return None
    events = pd.read_parquet(path, columns=["customer_id", "event_timestamp"])
    events["event_timestamp"] = pd.to_datetime(events["event_timestamp"], utc=True)
    return events


def _gated_against(canary: ModelVersion | None, champion: ModelVersion | None, tag: str) -> float | None:
    """A number the gate measured offline between ``canary`` and the champion it was gated
    against (tag ``tag`` of the canary), when that champion, by identity
    (``gate_champion_ref``, not its number alone), is still the one served; else None."""
    if canary is None or champion is None or canary.tags.get("gate_champion_ref") != version_ref(champion):
        return None
    try:
        value = float(canary.tags.get(tag, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def gate_score_psi(canary: ModelVersion | None, champion: ModelVersion | None) -> float:
    """The score PSI the gate measured offline between ``canary`` and the champion it was
    gated against (its ``gate_score_psi`` tag, see :func:`_gated_against`); else 0. Two models
    trained on different windows legitimately score differently."""
    value = _gated_against(canary, champion, "gate_score_psi")
    return value if value is not None and value > 0 else 0.0


def gate_score_shift(canary: ModelVersion | None, champion: ModelVersion | None) -> float:
    """P(canary score > champion score) - 0.5 the gate measured offline on its holdout rows
    (tag ``gate_score_shift``, :func:`mlflow_churn.stats.drift.score_shift`), when the champion
    gated against is still the one served; else 0: the score shift the judge expects between
    the arms (a model retrained after drift scores differently from the drifted champion by
    design; a live shift beyond it is the canary's, e.g. a feature read wrong in serving)."""
    value = _gated_against(canary, champion, "gate_score_shift")
    return value if value is not None else 0.0


def canary_verdict(champ: RouteStats, can: RouteStats, cfg: ChurnConfig, score_psi: float = float("nan"),
                   expected_psi: float = 0.0) -> tuple[str, list[str]]:
    """The canary's verdict from what each route served (pure: no MLflow, no I/O).

    ``wait`` without a canary or with fewer than ``serving.min_canary_samples`` logged
    predictions; else ``rollback`` when any limit of ``cfg.serving`` is broken (error rate,
    p99 latency against the absolute and the champion-relative limit, score PSI beyond what the
    gate measured between the two versions (``expected_psi``), AUC / recall@k below the
    champion by more than the tolerance or the sampling noise once enough labels matured),
    ``promote`` otherwise. Returns ``(verdict, reasons)``.
    """
    sv = cfg.serving
    reasons: list[str] = []
    if can.version is None:
        verdict = CanaryVerdict.WAIT
        reasons.append(f"no version of '{cfg.training.model_name}' has alias canary")
    elif can.rows < sv.min_canary_samples:
        verdict = CanaryVerdict.WAIT
        reasons.append(f"canary version {can.version} has {can.rows} logged predictions; "
                       f"a verdict needs serving.min_canary_samples={sv.min_canary_samples}")
    else:
        if can.error_rate > sv.max_error_rate:
            reasons.append(f"canary error rate {can.error_rate:.4f} > serving.max_error_rate "
                           f"{sv.max_error_rate}")
        slower = not can.p99_latency_ms <= champ.p99_latency_ms * sv.max_p99_ratio  # NaN champion: slower
        if can.p99_latency_ms > sv.max_p99_ms and slower:
            reasons.append(f"canary p99 latency {can.p99_latency_ms:.1f} ms > serving.max_p99_ms "
                           f"{sv.max_p99_ms} and > {sv.max_p99_ratio} x champion p99 "
                           f"{champ.p99_latency_ms:.1f} ms")
        if math.isfinite(score_psi) and score_psi > sv.max_score_psi + expected_psi:
            reasons.append(f"score PSI canary vs champion {score_psi:.3f} > serving.max_score_psi "
                           f"{sv.max_score_psi} + {expected_psi:.3f}, the PSI the gate measured between "
                           "the two versions on its holdout")
        labelled_enough = min(champ.labelled, can.labelled) >= sv.min_canary_samples
        if labelled_enough and math.isfinite(champ.auc) and math.isfinite(can.auc):
            auc_limit, recall_limit = _performance_limits(cfg, champ, can)
            if can.auc < champ.auc - auc_limit:
                reasons.append(f"canary AUC {can.auc:.4f} < champion {champ.auc:.4f} - {auc_limit:.4f} "
                               f"(max of serving.max_auc_drop {sv.max_auc_drop} and the sampling noise)")
            if can.recall_at_k < champ.recall_at_k - recall_limit:
                reasons.append(f"canary recall@k {can.recall_at_k:.4f} < champion {champ.recall_at_k:.4f} "
                               f"- {recall_limit:.4f} (max of evaluation.recall_tolerance "
                               f"{cfg.evaluation.recall_tolerance} and the sampling noise)")
        verdict = CanaryVerdict.ROLLBACK if reasons else CanaryVerdict.PROMOTE
        if verdict == CanaryVerdict.PROMOTE:
            reasons.append(f"canary version {can.version} within every limit on {can.rows} "
                           "predictions")
            if not labelled_enough:
                reasons.append(f"labels: {can.labelled} canary / {champ.labelled} champion predictions have "
                               "matured; performance not compared yet (operational checks only)")
    return verdict, reasons


def evaluate_canary(
    cfg: ChurnConfig,
    as_of: datetime,
    since: datetime | None = None,
    churn_events: pd.DataFrame | None = None,
    log_run: bool = True,
    use_judge: bool | None = None,
    served_since: datetime | None = None,
) -> CanaryEvaluation:
    """Compare canary and champion on the logged traffic of ``[since, as_of]``.

    ``as_of`` (tz-aware UTC) also decides which predictions have matured labels;
    ``churn_events`` defaults to ``<data_dir>/churn_events.parquet`` (no labels when
    absent). ``log_run`` records the evaluation as an MLflow run with ``decision.json``.
    ``served_since`` (wall clock, tz-aware UTC) keeps only the rows served at or after it
    (a rollout step's own traffic: :mod:`mlflow_churn.serving.rollout`).
    """
    as_of = utc(as_of)
    since = utc(since) if since else None
    sv = cfg.serving
    client = registry_client(cfg)
    name = cfg.training.model_name
    holders = {r: alias_version(client, name, r) for r in ROUTES}
    versions = {r: (str(mv.version) if mv else None) for r, mv in holders.items()}
    expected_psi = gate_score_psi(holders["canary"], holders["champion"])
    frame = _logged(cfg, as_of, since, utc(served_since, "served_since") if served_since else None)
    arms = arm_routes(cfg)  # shadow mode: the canary's arm is its shadow rows
    per_route = {r: _served_by(frame, arms[r], holders[r]) for r in ROUTES}
    stats = {r: _route_stats(r, versions[r], per_route[r]) for r in ROUTES}
    score_psi = float("nan")
    champ_scores = per_route["champion"].loc[per_route["champion"]["status"] == "ok", "score"].to_numpy(float)
    canary_scores = per_route["canary"].loc[per_route["canary"]["status"] == "ok", "score"].to_numpy(float)
    if champ_scores.size and canary_scores.size:

        score_psi = psi(champ_scores, canary_scores, bins=cfg.monitoring.bins,
                        epsilon=cfg.monitoring.psi_epsilon)
    events = churn_events if churn_events is not None else _churn_events(cfg)
    if events is not None and len(frame):

        horizon = cfg.features.label_horizon_days
        for r in ROUTES:
            ok = per_route[r][(per_route[r]["status"] == "ok") & (per_route[r]["customer_id"] >= 0)]
            labelled = attach_labels(ok, events, horizon, as_of) if len(ok) else ok
            st = stats[r]
            st.labelled = len(labelled)
            if st.labelled:
                st.positives = int(labelled["label"].sum())
                m = classification_metrics(labelled["label"].to_numpy(), labelled["score"].to_numpy(float),
                                           cfg.evaluation)
                st.auc, st.recall_at_k = float(m["roc_auc"]), float(m["recall_at_k"])
    verdict, reasons = canary_verdict(stats["champion"], stats["canary"], cfg, score_psi, expected_psi)
    judged: JudgeVerdict | None = None
    if cfg.canary.judge.enabled if use_judge is None else use_judge:  # the judge decides instead
        judged = judge_canary(client, cfg, holders, per_route, events, as_of)
        verdict, reasons = judge_action(judged, stats["canary"], cfg)
    result = CanaryEvaluation(verdict, reasons, name, versions["champion"], versions["canary"], as_of,
                              since, stats, score_psi, judge=judged.to_dict() if judged else None)
    if log_run:
        with decision_run(cfg, f"canary-evaluate v{versions['canary']}") as run:
            mlflow.set_tags({"decision": verdict, "kind": "canary-evaluate", "model_name": name,
                             "champion_version": str(versions["champion"]),
                             "canary_version": str(versions["canary"])})
            mlflow.log_params({"as_of": as_of.isoformat(), "since": since.isoformat() if since else "",
                               "served_since": served_since.isoformat() if served_since else "",
                               "min_canary_samples": sv.min_canary_samples,
                               "max_error_rate": sv.max_error_rate, "max_p99_ms": sv.max_p99_ms,
                               "max_p99_ratio": sv.max_p99_ratio,
                               "max_score_psi": sv.max_score_psi, "max_auc_drop": sv.max_auc_drop})
            mlflow.log_metrics(metrics_of(result))
            if judged is not None:
                mlflow.set_tags({"judge_verdict": judged.verdict,
                                 "judge_performance": judged.performance_source})
                mlflow.log_figure(judge_figure(judged, f"canary v{versions['canary']} vs champion "
                                               f"v{versions['champion']}: {judged.verdict}, score "
                                               f"{judged.score:.1f}"), "judge.png")
            log_json(result.to_dict(), "decision.json")
            result.run_id = run.info.run_id
        if versions["canary"] is not None:
            # tags for people, then the signed decision the guard / promote trust
            # (registry.promotion): this verdict, against exactly this champion
            # (not while both aliases are on one version, mid-promotion: its signed promotion,
            # naming the champion it replaces, must stay)
            record_canary_verdict(client, name, versions["canary"], verdict, result.run_id, as_of)
            if versions["canary"] != versions["champion"]:
                record_signed(client, cfg, name, versions["canary"], SignedKind.CANARY, verdict,
                              champion=holders["champion"], run_id=result.run_id or "",
                              metrics=metrics_of(result), reason="; ".join(reasons))
    return result


#: one-sided z of the noise allowance (~1 %, as monitoring uses): a drop smaller than z x its
#: standard error between two disjoint random sets of customers is not evidence against the canary
NOISE_Z = 2.326


def _performance_limits(cfg: ChurnConfig, champ: RouteStats, can: RouteStats) -> tuple[float, float]:
    """Allowed AUC and recall@k drops of the canary: the configured tolerance, widened to
    NOISE_Z standard errors of the difference (Hanley-McNeil for AUC, binomial for recall)
    when the labelled samples are small (the two routes see different customers)."""

    se_auc = math.hypot(*(auc_standard_error(st.auc, st.positives, st.labelled - st.positives)
                          for st in (champ, can)))
    se_recall = math.hypot(*(math.sqrt(max(st.recall_at_k * (1 - st.recall_at_k), 0.0) / st.positives)
                             if st.positives and math.isfinite(st.recall_at_k) else 0.0
                             for st in (champ, can)))
    auc_limit = max(cfg.serving.max_auc_drop, NOISE_Z * se_auc if math.isfinite(se_auc) else 0.0)
    return auc_limit, max(cfg.evaluation.recall_tolerance, NOISE_Z * se_recall)


def judge_canary(client: MlflowClient, cfg: ChurnConfig, holders: dict[str, ModelVersion | None],
                 per_route: dict[str, pd.DataFrame], churn_events: pd.DataFrame | None,
                 as_of: datetime) -> JudgeVerdict:
    """The canary judge on what each route served (``per_route``: prediction-log rows of the
    champion and the canary route): labels matured by ``as_of`` from ``churn_events`` (none
    when None), each version's calibration from its training profile (raw scores for a
    version without one; an outage reading it raises)."""
    labels = None
    if churn_events is not None:
        parts = []
        for rows in per_route.values():
            ok = rows[(rows["status"] == "ok") & (rows["customer_id"] >= 0)]
            if len(ok):
                parts.append(attach_labels(ok, churn_events, cfg.features.label_horizon_days, as_of))
        labels = pd.concat(parts)[["request_id", "customer_id", "label"]] if parts else None
    calibration: dict[str, Any] = {}
    for route, mv in holders.items():
        if mv is not None:
            try:
                calibration[route] = profile_for_version(client, mv.name, mv.version).get("calibration")
            except NoProfile:
                calibration[route] = None
    return judge(per_route["champion"], per_route["canary"], cfg, labels=labels, calibration=calibration,
                 expected_score_shift=gate_score_shift(holders.get("canary"), holders.get("champion")))


def judge_action(judged: JudgeVerdict, canary: RouteStats,
                 cfg: ChurnConfig) -> tuple[CanaryVerdict, list[str]]:
    """The canary's ``(promote | wait | rollback, reasons)`` from the judge's verdict: ``wait``
    without a canary or below ``serving.min_canary_samples`` canary rows, whatever the judge says."""
    head = (f"judge: {judged.verdict} (score {judged.score:.1f}, performance {judged.performance_source}, "
            f"confidence {judged.confidence:g})")
    if canary.version is None:
        return CanaryVerdict.WAIT, [f"no version of '{cfg.training.model_name}' has alias canary", head]
    if canary.rows < cfg.serving.min_canary_samples:
        return CanaryVerdict.WAIT, [f"canary version {canary.version} has {canary.rows} logged predictions; "
                                    "a verdict needs "
                                    f"serving.min_canary_samples={cfg.serving.min_canary_samples}", head]
    return ACTIONS[judged.verdict], [head, *judged.reasons]


def metrics_of(evaluation: CanaryEvaluation) -> dict[str, float]:
    out: dict[str, float] = {}
    if math.isfinite(evaluation.score_psi):
        out["score_psi"] = evaluation.score_psi
    for r, st in evaluation.routes.items():
        for key in ("rows", "errors", "error_rate", "p50_latency_ms", "p99_latency_ms", "mean_score",
                    "labelled", "auc", "recall_at_k"):
            value = float(getattr(st, key))
            if math.isfinite(value):
                out[f"{r}_{key}"] = value
    if evaluation.judge:
        out["judge_score"] = evaluation.judge["score"]
        for m in evaluation.judge["metrics"]:
            for key in ("statistic", "effect", "p_value"):
                if m[key] is not None and math.isfinite(m[key]):
                    out[f"judge_{m['name']}_{key}"] = float(m[key])
            out[f"judge_{m['name']}_failed"] = float(m["decision"] == MetricCall.FAIL)
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}


# --------------------------------------------------------------------------- runs, locks
@contextmanager
def decision_run(cfg: ChurnConfig, run_name: str) -> Iterator[Any]:
    """An MLflow run for one decision on ``cfg``'s store (:func:`mlflow_churn.tracking.step_run`:
    a child of the ``mlflow run`` project run when there is one)."""
    setup_mlflow(cfg)
    with step_run(run_name) as run:
        yield run


def log_json(data: dict[str, Any], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
        mlflow.log_artifact(str(path))
