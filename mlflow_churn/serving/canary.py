"""Live canary analysis from the prediction log, and the promote / rollback transitions.

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

:func:`promote` moves ``champion`` to the canary version, ``previous-champion`` to the old
champion and removes ``canary`` (refused unless the canary evidence says ``promote``, or
``force`` with a reason recorded as the ``promotion_override`` tag);
:func:`adopt_promotion` does the same for a ``champion`` a person set by hand in the UI;
:func:`rollback` removes ``canary`` and tags the version with the reason, or, after a
promotion, puts ``champion`` back on ``previous-champion``. Every alias move is recorded in
the alias history (:mod:`mlflow_churn.registry.history`) with the run as evidence.
Transitions run under a cross-process lock (a PostgreSQL advisory lock when the
tracking store is PostgreSQL, else ``fcntl`` on ``<workspace>/locks/registry-<model>.lock``)
and re-read the aliases after taking it, so of two concurrent promotions one acts and the
other is a no-op ("already promoted"). Every evaluation and transition is an MLflow run
(tags ``decision``, metrics, params and ``decision.json``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.data.bounds import latest_as_of
from mlflow_churn.errors import ChurnError, first_line
from mlflow_churn.jsonable import jsonable
from mlflow_churn.registry.aliases import (
    CANARY,
    CHAMPION,
    PREVIOUS_CHAMPION,
    STAGE_OF,
    alias_version,
    aliases_of,
    move_alias,
    remove_alias,
)
from mlflow_churn.registry.promotion import OVERRIDE_TAG, check_approval, record_canary_verdict
from mlflow_churn.serving.prediction_log import PredictionLog, attach_labels
from mlflow_churn.stats.drift import psi
from mlflow_churn.stats.metrics import classification_metrics
from mlflow_churn.stats.performance import auc_standard_error
from mlflow_churn.times import utc
from mlflow_churn.tracking import fail_fast, failed_on_error, setup_mlflow, step_run

ROUTES = ("champion", "canary")


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
    """The verdict (promote | rollback | wait), why, and the evidence."""

    verdict: str
    reasons: list[str]
    model_name: str
    champion_version: str | None
    canary_version: str | None
    as_of: datetime
    since: datetime | None
    routes: dict[str, RouteStats]
    score_psi: float = float("nan")
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat()
        out["since"] = self.since.isoformat() if self.since else None
        return jsonable(out)


@dataclass
class TransitionResult:
    """What a promote / rollback did (``noop`` when another process already did it)."""

    action: str  # promote | rollback
    noop: bool
    message: str
    model_name: str
    version: str | None
    before: dict[str, str]
    after: dict[str, str]
    reason: str
    run_id: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # CanaryEvaluation.to_dict()
    evidence_error: str | None = None  # why no evidence could be computed

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class CanaryStatus:
    """Aliases and the traffic logged per route and version."""

    model_name: str
    aliases: dict[str, str]
    canary_fraction: float
    logged: dict[str, int]  # "route/version" -> rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version number as a string (the registry may hand out ints)."""
    return {a: str(v) for a, v in aliases_of(client, name).items()}


def _client(cfg: ChurnConfig) -> MlflowClient:
    setup_mlflow(cfg)
    uri = cfg.mlflow_tracking_uri
    return MlflowClient(uri, uri)



def canary_status(cfg: ChurnConfig, as_of: datetime | None = None,
                  since: datetime | None = None) -> CanaryStatus:
    """Aliases of the configured model and the rows logged per route/version, restricted
    to business times in ``[since, as_of]`` when given (tz-aware UTC)."""
    client = _client(cfg)
    name = cfg.training.model_name
    frame = _logged(cfg, as_of, since)
    logged: dict[str, int] = {}
    if len(frame):
        for (r, v), n in frame.groupby(["route", "model_version"]).size().items():
            logged[f"{r}/v{v}"] = int(n)
    return CanaryStatus(name, _aliases(client, name), cfg.serving.canary_fraction, logged)


def _logged(cfg: ChurnConfig, as_of: datetime | None, since: datetime | None) -> pd.DataFrame:
    """Rows of the prediction log with ``since <= as_of column <= as_of`` (bounds optional)."""
    log = PredictionLog(cfg.prediction_log_url)
    try:
        until = utc(as_of) + timedelta(microseconds=1) if as_of else None  # as_of inclusive
        return log.read(since=utc(since) if since else None, until=until)
    finally:
        log.close()


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


def gate_score_psi(canary: ModelVersion | None, champion_version: str | None) -> float:
    """The score PSI the gate measured offline between ``canary`` and the champion it was
    gated against (its ``gate_score_psi`` tag), when that champion is still the one served;
    else 0. Two models trained on different windows legitimately score differently."""
    if canary is None or canary.tags.get("gate_champion_version") != champion_version:
        return 0.0
    try:
        value = float(canary.tags.get("gate_score_psi", "0"))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


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
        verdict = "wait"
        reasons.append(f"no version of '{cfg.training.model_name}' has alias canary")
    elif can.rows < sv.min_canary_samples:
        verdict = "wait"
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
        verdict = "rollback" if reasons else "promote"
        if verdict == "promote":
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
) -> CanaryEvaluation:
    """Compare canary and champion on the logged traffic of ``[since, as_of]``.

    ``as_of`` (tz-aware UTC) also decides which predictions have matured labels;
    ``churn_events`` defaults to ``<data_dir>/churn_events.parquet`` (no labels when
    absent). ``log_run`` records the evaluation as an MLflow run with ``decision.json``.
    """
    as_of = utc(as_of)
    since = utc(since) if since else None
    sv = cfg.serving
    client = _client(cfg)
    name = cfg.training.model_name
    holders = {r: alias_version(client, name, r) for r in ROUTES}
    versions = {r: (str(mv.version) if mv else None) for r, mv in holders.items()}
    expected_psi = gate_score_psi(holders["canary"], versions["champion"])
    frame = _logged(cfg, as_of, since)
    per_route = {r: frame[(frame["route"] == r) & (frame["model_version"] == versions[r])] if versions[r]
                 else frame.iloc[0:0] for r in ROUTES}
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
    result = CanaryEvaluation(verdict, reasons, name, versions["champion"], versions["canary"], as_of,
                              since, stats, score_psi)
    if log_run:
        with decision_run(cfg, f"canary-evaluate v{versions['canary']}") as run:
            mlflow.set_tags({"decision": verdict, "kind": "canary-evaluate", "model_name": name,
                             "champion_version": str(versions["champion"]),
                             "canary_version": str(versions["canary"])})
            mlflow.log_params({"as_of": as_of.isoformat(), "since": since.isoformat() if since else "",
                               "min_canary_samples": sv.min_canary_samples,
                               "max_error_rate": sv.max_error_rate, "max_p99_ms": sv.max_p99_ms,
                               "max_p99_ratio": sv.max_p99_ratio,
                               "max_score_psi": sv.max_score_psi, "max_auc_drop": sv.max_auc_drop})
            mlflow.log_metrics(_metrics_of(result))
            log_json(result.to_dict(), "decision.json")
            result.run_id = run.info.run_id
        if versions["canary"] is not None:  # the verdict the guard / promote read (registry.promotion)
            record_canary_verdict(client, name, versions["canary"], verdict, result.run_id, as_of)
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


def _metrics_of(evaluation: CanaryEvaluation) -> dict[str, float]:
    out: dict[str, float] = {}
    if math.isfinite(evaluation.score_psi):
        out["score_psi"] = evaluation.score_psi
    for r, st in evaluation.routes.items():
        for key in ("rows", "errors", "error_rate", "p50_latency_ms", "p99_latency_ms", "mean_score",
                    "labelled", "auc", "recall_at_k"):
            value = float(getattr(st, key))
            if math.isfinite(value):
                out[f"{r}_{key}"] = value
    return out


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


def _pg_url(uri: str) -> str | None:
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://", "postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql://" + uri[len(prefix):]
    return None


@contextmanager
def registry_lock(cfg: ChurnConfig, timeout_s: float = 120.0) -> Iterator[str]:
    """Hold the cross-process lock of the model's aliases; yields a description of it.

    PostgreSQL tracking store: ``pg_advisory_lock`` on a key derived from the model name
    (every machine using that store is serialised); otherwise an exclusive ``fcntl`` lock
    on ``<workspace>/locks/registry-<model>.lock`` (processes sharing the workspace).
    """
    name = cfg.training.model_name
    pg = _pg_url(cfg.mlflow_tracking_uri)
    if pg:
        import psycopg2

        key = int.from_bytes(hashlib.blake2b(f"mlflow-churn:{name}".encode(), digest_size=8).digest(),
                             "big", signed=True)
        con = psycopg2.connect(pg)
        con.autocommit = True
        try:
            with con.cursor() as cur:
                cur.execute("SET lock_timeout = %s", (f"{int(timeout_s * 1000)}ms",))
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield f"pg_advisory_lock({key})"
            finally:
                with con.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            con.close()
        return
    lock_dir = cfg.workspace / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"registry-{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}.lock"
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield f"flock({path})"
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- transitions
def promote(cfg: ChurnConfig, reason: str, version: str | None = None,
            evidence: CanaryEvaluation | None = None, as_of: datetime | None = None,
            since: datetime | None = None, force: bool = False, actor: str | None = None) -> TransitionResult:
    """Make the canary the champion (old champion -> ``previous-champion``; canary removed).

    ``version``: the canary version the caller saw; when another process promoted it
    already, this is a no-op. Raises ChurnError when there is no canary to promote.
    The run carries ``evidence``, by default the canary analysis of the logged traffic in
    ``[since, as_of]`` (see :func:`_transition_evidence`).

    When there is a champion to replace, the evidence must say ``promote`` (so the canary
    served at least ``serving.min_canary_samples`` logged predictions within every limit);
    else ChurnError naming the verdict, unless ``force``: then ``reason`` is recorded as
    the version's ``promotion_override`` tag (the override a guarded server accepts) and on
    the run (tag ``override``). ``actor`` (default: the OS user) goes to the alias history.
    """
    client = _client(cfg)
    name = cfg.training.model_name
    if force and not reason.strip():
        raise ChurnError("a forced promotion needs a reason (--reason TEXT): it is recorded as the "
                         f"version's {OVERRIDE_TAG} tag")
    with registry_lock(cfg) as lock:
        before = _aliases(client, name)  # re-read under the lock
        canary = before.get(CANARY)
        if canary is None or (version is not None and str(version) != canary):
            if version is not None and before.get(CHAMPION) == str(version):
                return _noop(cfg, "promote", name, str(version), before, reason,
                             f"already promoted: version {version} is the champion of '{name}'")
            if canary is None:
                raise ChurnError(f"'{name}' has no canary to promote (aliases: {before or 'none'}); "
                                 "pass a challenger through `churn evaluate` first")
            raise ChurnError(f"version {version} is not the canary of '{name}' (canary is {canary}); "
                             "check --version")
        approval = check_approval(client, name, canary, cfg)  # registry.require_approval
        if not approval.allowed:
            raise ChurnError(approval.message)
        old = before.get(CHAMPION)
        # logged as a canary-evaluate run: the verdict tag on the version is what a guarded
        # server (registry.promotion.check_promotion) reads
        proof, proof_error = _transition_evidence(cfg, evidence, as_of, since, log_run=old is not None)
        if old is not None and old != canary and not force:
            _require_promote_verdict(cfg, canary, proof, proof_error)
        if force:
            client.set_model_version_tag(name, canary, OVERRIDE_TAG, reason[:500])
        with fail_fast(cfg, f"promoting v{canary} of '{name}'"), \
                decision_run(cfg, f"promote v{canary}") as run, failed_on_error(cfg):
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            # ordered so that an interruption between two moves leaves a consistent registry that
            # the same command completes: previous-champion first (the champion stays), then
            # champion, then canary removed (champion and canary on one version until then)
            if old is not None and old != canary:
                move_alias(client, name, PREVIOUS_CHAMPION, old, cfg.evaluation.mirror_stages, **who)
            move_alias(client, name, CHAMPION, canary, cfg.evaluation.mirror_stages, **who)
            result = _finish_promotion(cfg, client, canary, old, before, reason, run.info.run_id, who)
            if force:
                mlflow.set_tag("override", reason[:500])
            _log_transition(result, lock, proof, proof_error)
        return result


def _require_promote_verdict(cfg: ChurnConfig, canary: str, proof: CanaryEvaluation | None,
                             proof_error: str | None) -> None:
    """ChurnError unless ``proof`` is a ``promote`` verdict on ``canary`` with enough traffic."""
    fix = "; to promote anyway pass --force with --reason TEXT (recorded as an override)"
    if proof is None:
        raise ChurnError(f"cannot promote version {canary}: no canary evidence ({proof_error}){fix}")
    rows = proof.routes["canary"].rows if "canary" in proof.routes else 0
    need = cfg.canary.needed(cfg.serving)
    if proof.verdict != "promote" or rows < need:
        why = "; ".join(proof.reasons) or "no reason given"
        raise ChurnError(f"cannot promote version {canary}: the canary verdict is '{proof.verdict}' on "
                         f"{rows} logged predictions (canary.min_requests={need}): {why}{fix}")


def _finish_promotion(cfg: ChurnConfig, client: MlflowClient, canary: str, old: str | None,
                      before: dict[str, str], reason: str, run_id: str,
                      who: dict[str, Any]) -> TransitionResult:
    """After ``champion`` moved to ``canary``: ``previous-champion`` -> ``old``, ``canary``
    removed, version tags; inside the transition run ``run_id``."""
    name = cfg.training.model_name
    mirror = cfg.evaluation.mirror_stages
    if old is not None and old != canary and _aliases(client, name).get(PREVIOUS_CHAMPION) != old:
        move_alias(client, name, PREVIOUS_CHAMPION, old, mirror, **who)
    if _aliases(client, name).get(CANARY) == canary:  # champion owns the stage now: no mirroring
        remove_alias(client, name, CANARY, False, **who)
    after = _aliases(client, name)
    stamp = datetime.now(UTC).isoformat()
    tags = {"promoted_at": stamp, "promote_reason": reason[:500], "promote_run_id": run_id}
    for key, value in tags.items():
        client.set_model_version_tag(name, canary, key, value)
    if old is not None and old != canary:
        client.set_model_version_tag(name, old, "replaced_by", canary)
    return TransitionResult("promote", False, f"version {canary} is now champion of '{name}'"
                            + (f"; version {old} is previous-champion" if old else ""),
                            name, canary, before, after, reason, run_id)


def adopt_promotion(cfg: ChurnConfig, version: str, previous: str | None, actor: str, reason: str,
                    moved_at: datetime | None = None) -> TransitionResult:
    """Complete a promotion someone made by hand (``champion`` set to the canary ``version``
    in the UI or over REST, away from ``previous``) as :func:`promote` would have: the
    transition run with the canary evidence, ``previous-champion`` -> ``previous``,
    ``canary`` removed, stages mirrored when configured. A no-op (decision ``noop``) when
    ``champion`` is no longer on ``version``."""
    client = _client(cfg)
    name = cfg.training.model_name
    with registry_lock(cfg) as lock:
        before = _aliases(client, name)
        if before.get(CHAMPION) != str(version):
            return _noop(cfg, "promote", name, str(version), before, reason,
                         f"champion of '{name}' is no longer version {version} ({before.get(CHAMPION)})")
        proof, proof_error = _transition_evidence(cfg, None, None, None)
        with decision_run(cfg, f"promote v{version} (by hand)") as run:
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            if cfg.evaluation.mirror_stages:  # the champion's stage, as move_alias mirrors it
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    client.transition_model_version_stage(name, str(version), STAGE_OF[CHAMPION])
                    if previous and previous != str(version) and \
                            client.get_model_version(name, previous).current_stage == STAGE_OF[CHAMPION]:
                        client.transition_model_version_stage(name, previous, "None")
            result = _finish_promotion(cfg, client, str(version), previous, before, reason, run.info.run_id,
                                       who)
            when = (moved_at or datetime.now(UTC)).isoformat()
            mlflow.set_tags({"promoted_by": actor, "promoted_at": when})
            _log_transition(result, lock, proof, proof_error)
        return result


def rollback(cfg: ChurnConfig, reason: str, version: str | None = None,
             evidence: CanaryEvaluation | None = None, as_of: datetime | None = None,
             since: datetime | None = None, actor: str | None = None) -> TransitionResult:
    """Undo the last step: with a canary, remove ``canary`` and tag its version with
    ``reason`` (champion untouched); without one, after a promotion, put ``champion`` back
    on ``previous-champion`` (the demoted version is tagged, ``previous-champion`` removed,
    stages mirrored when configured).

    ``version``: the canary (or champion) version the caller saw; a no-op when it was
    already rolled back. Raises ChurnError when there is nothing to roll back.
    Evidence as in :func:`promote`; its failure never blocks a rollback.
    """
    client = _client(cfg)
    name = cfg.training.model_name
    with registry_lock(cfg) as lock:
        before = _aliases(client, name)
        canary = before.get(CANARY)
        champion_back = before.get(CHAMPION) is not None and before.get(PREVIOUS_CHAMPION) is not None
        if version is not None:
            mv = client.get_model_version(name, str(version))
            if mv.tags.get("rolled_back") == "true" and str(version) not in (canary, before.get(CHAMPION)):
                return _noop(cfg, "rollback", name, str(version), before, reason,
                             f"already rolled back: version {version} ({mv.tags.get('rollback_reason')})")
        if version is not None and str(version) == before.get(CHAMPION) and str(version) != canary:
            if not champion_back:
                raise ChurnError(f"version {version} is the champion of '{name}' but there is no "
                                 "previous-champion to go back to")
            return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock)
        if canary is None:
            if version is None and champion_back:
                return _rollback_champion(cfg, client, before, reason, evidence, as_of, since, actor, lock)
            raise ChurnError(f"'{name}' has no canary to roll back and no previous-champion to go back to "
                             f"(aliases: {before or 'none'})")
        if version is not None and str(version) != canary:
            raise ChurnError(f"version {version} is not the canary of '{name}' (canary is {canary})")
        proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
        with fail_fast(cfg, f"rolling back v{canary} of '{name}'"), \
                decision_run(cfg, f"rollback v{canary}") as run, failed_on_error(cfg):
            who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
            remove_alias(client, name, CANARY, cfg.evaluation.mirror_stages, **who)
            _tag_rolled_back(client, name, canary, reason, run.info.run_id)
            after = _aliases(client, name)
            result = TransitionResult("rollback", False, f"canary version {canary} of '{name}' rolled back",
                                      name, canary, before, after, reason, run.info.run_id)
            _log_transition(result, lock, proof, proof_error)
        return result


def _tag_rolled_back(client: MlflowClient, name: str, version: str, reason: str, run_id: str) -> None:
    for key, value in {"rolled_back": "true", "rollback_reason": reason[:500],
                       "rolled_back_at": datetime.now(UTC).isoformat(), "rollback_run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)


def _rollback_champion(cfg: ChurnConfig, client: MlflowClient, before: dict[str, str], reason: str,
                       evidence: CanaryEvaluation | None, as_of: datetime | None, since: datetime | None,
                       actor: str | None, lock: str) -> TransitionResult:
    """``champion`` back to ``previous-champion`` (caller holds the lock)."""
    name = cfg.training.model_name
    demoted, restored = before[CHAMPION], before[PREVIOUS_CHAMPION]
    mirror = cfg.evaluation.mirror_stages
    proof, proof_error = _transition_evidence(cfg, evidence, as_of, since)
    with fail_fast(cfg, f"rolling champion of '{name}' back to v{restored}"), \
            decision_run(cfg, f"rollback champion v{demoted} -> v{restored}") as run, failed_on_error(cfg):
        who = {"actor": actor, "reason": reason, "evidence_run_id": run.info.run_id}
        # champion first: a guarded server accepts the version behind previous-champion
        move_alias(client, name, CHAMPION, restored, mirror, **who)
        remove_alias(client, name, PREVIOUS_CHAMPION, False, **who)  # its stage is Production now
        if mirror:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                client.transition_model_version_stage(name, demoted, "Archived")
        _tag_rolled_back(client, name, demoted, reason, run.info.run_id)
        client.set_model_version_tag(name, restored, "restored_at", datetime.now(UTC).isoformat())
        after = _aliases(client, name)
        result = TransitionResult("rollback", False, f"champion of '{name}' back on version {restored} "
                                  f"(version {demoted} rolled back)", name, demoted, before, after, reason,
                                  run.info.run_id)
        mlflow.set_tags({"rollback_of": "champion", "restored_version": restored})
        _log_transition(result, lock, proof, proof_error)
    return result


def _transition_evidence(cfg: ChurnConfig, evidence: CanaryEvaluation | None, as_of: datetime | None,
                        since: datetime | None,
                        log_run: bool = False) -> tuple[CanaryEvaluation | None, str | None]:
    """``(evidence, None)``; when none is given, the canary analysis of ``[since, as_of]``
    (``as_of`` default :func:`default_as_of`), with a run of its own when ``log_run``. When
    it cannot be computed (prediction log unreachable, unreadable labels): ``(None, why)``, so that a
    transition, above all a rollback during an incident, never waits on its evidence."""
    if evidence is not None:
        return evidence, None
    try:
        when = as_of or default_as_of(cfg, datetime.now(UTC))
        return evaluate_canary(cfg, when, since, log_run=log_run), None
    except Exception as exc:  # any failure: record why, do not block the alias move
        first = first_line(exc)
        return None, f"{type(exc).__name__}: {first}"


def _log_transition(result: TransitionResult, lock: str, evidence: CanaryEvaluation | None,
                    evidence_error: str | None) -> None:
    """Tags, params, the evidence's metrics (as a canary-evaluate run names them) and
    ``decision.json`` of a transition run; fills ``result.evidence``."""
    if evidence is not None:
        result.evidence = evidence.to_dict()
    result.evidence_error = evidence_error
    mlflow.set_tags({"decision": {"promote": "promoted", "rollback": "rolled_back"}[result.action],
                     "kind": f"canary-{result.action}", "model_name": result.model_name,
                     "version": str(result.version), "lock": lock,
                     "evidence": evidence.verdict if evidence else "unavailable"})
    params = {"reason": result.reason[:500], "version": result.version,
              "champion_before": result.before.get(CHAMPION, ""),
              "canary_before": result.before.get(CANARY, ""),
              "champion_after": result.after.get(CHAMPION, "")}
    if evidence is not None:
        params.update({"evidence_as_of": evidence.as_of.isoformat(),
                       "evidence_since": evidence.since.isoformat() if evidence.since else ""})
        mlflow.log_metrics(_metrics_of(evidence))
    else:
        params["evidence_error"] = (evidence_error or "")[:500]
    mlflow.log_params(params)
    log_json(result.to_dict(), "decision.json")


def _noop(cfg: ChurnConfig, action: str, name: str, version: str, before: dict[str, str],
          reason: str, message: str) -> TransitionResult:
    """Record a transition that another process already made (decision ``noop``)."""
    with decision_run(cfg, f"{action} v{version} (no-op)") as run:
        result = TransitionResult(action, True, message, name, version, before, before, reason,
                                  run.info.run_id)
        mlflow.set_tags({"decision": "noop", "kind": f"canary-{action}", "model_name": name,
                         "version": version})
        mlflow.log_params({"reason": reason[:500], "version": version})
        log_json(result.to_dict(), "decision.json")
    return result


def act_on_verdict(cfg: ChurnConfig, as_of: datetime, since: datetime | None = None,
                   reason: str | None = None) -> tuple[CanaryEvaluation, TransitionResult | None]:
    """Evaluate, then promote / roll back on the verdict (nothing on ``wait``): what
    `churn canary auto` and `churn canary evaluate --auto` run."""
    evaluation = evaluate_canary(cfg, as_of, since)
    why = (reason + ": " if reason else "") + "; ".join(evaluation.reasons)
    if evaluation.verdict == "promote":
        return evaluation, promote(cfg, f"auto: {why}", version=evaluation.canary_version,
                                   evidence=evaluation)
    if evaluation.verdict == "rollback":
        return evaluation, rollback(cfg, f"auto: {why}", version=evaluation.canary_version,
                                    evidence=evaluation)
    return evaluation, None
