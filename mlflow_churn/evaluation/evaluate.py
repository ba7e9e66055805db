"""The champion/challenger gate: score both on the holdout, compare, move ``canary`` or reject.

:func:`evaluate` resolves the two registered versions (aliases or version numbers), builds
the holdout frame (:mod:`mlflow_churn.evaluation.holdout`), scores both models in process,
computes :func:`~mlflow_churn.stats.metrics.classification_metrics` overall and per
segment, and applies the gate. Each rule is checked with
``mlflow.validate_evaluation_results`` and a ``MetricThreshold``:

=================  ==========================================================================
rule               passes when
=================  ==========================================================================
auc_vs_champion    challenger roc_auc >= champion roc_auc + ``min_auc_delta``. MLflow requires
                   ``min_absolute_change > 0``; with ``min_auc_delta = 0`` the rule is a
                   plain ``threshold = champion roc_auc`` (a tie passes).
segment_auc        for every segment value with ``n >= min_segment_size`` rows, at least
                   ``min_segment_churners`` churned customers and both AUCs defined:
                   challenger AUC >= champion AUC - ``segment_tolerance`` - z x SE,
                   SE = bootstrap standard error of the paired AUC difference over the
                   segment's customers and z = Phi^-1(1 - ``segment_alpha`` / m) over the m
                   tested segments (Bonferroni: about one good model in 20 is rejected
                   on noise at 0.05, whatever m; :mod:`.uncertainty`).
recall_at_k        challenger recall@k >= champion recall@k - ``recall_tolerance`` (absolute).
revenue_lift       challenger revenue_lift >= champion revenue_lift - ``lift_tolerance`` x
                   abs(champion revenue_lift) (relative).
auc_floor          (no champion only) roc_auc >= ``min_auc``.
lift_floor         (no champion only) revenue_lift >= 0: better than targeting at random.
=================  ==========================================================================

Pass: alias ``canary`` moves to the challenger (``registry.aliases.move_alias``, mirrored onto
the Staging stage when ``evaluation.mirror_stages``) and the version gets ``gate=passed``.
Fail: the version gets ``gate=rejected`` and ``gate_reasons``. Both: ``gate_run_id`` and
``drift_report`` / ``drift_json`` tags (``runs:/<decision run>/drift/...``).

The decision is one MLflow run (nested under ``parent_run_id`` when given, e.g. the
``mlflow run`` project run) with metrics, params, plots, per-segment CSVs, the Evidently
HTML drift report, the project's drift JSON and ``decision.json`` holding every number.

Idempotence: the run is tagged ``gate_key`` = sha256 of (model name, challenger version,
champion version, holdout cutoffs, label horizon, data manifest, evaluation config). When a
finished decision run with that key exists, :func:`evaluate` returns its decision
(``reused=True``) and changes nothing: no run, no alias move, no tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.evaluation import plots
from mlflow_churn.evaluation.holdout import holdout_cutoffs, holdout_frame, parse_tag_time
from mlflow_churn.features.offline import daily_cutoffs
from mlflow_churn.registry.aliases import CANARY, alias_version, move_alias
from mlflow_churn.stats.drift import psi
from mlflow_churn.stats.metrics import (
    add_segment_columns,
    classification_metrics,
    scalar_metrics,
    segment_metric_values,
    segment_metrics,
)
from mlflow_churn.stats.uncertainty import segment_auc_diff_se, segment_z
from mlflow_churn.tracking import fail_fast, setup_mlflow, terminate_failed
from mlflow_churn.training.model import Scorer, load_scorer

DECISION_FILE = "decision.json"
DRIFT_HTML = "drift/report.html"
DRIFT_JSON = "drift/drift.json"
#: rows of reference / current data at most in the drift report (seeded sample)
DRIFT_SAMPLE_ROWS = 20_000
_TAG_LIMIT = 4000
#: stages reported through ``evaluate(on_step=...)``
STEPS = 7


@dataclass
class RuleResult:
    """One gate rule: the metric, both values, the threshold it had to meet, the verdict."""

    rule: str
    metric: str
    candidate: float
    baseline: float | None
    required: float
    passed: bool
    reason: str = ""


@dataclass
class GateDecision:
    """The gate's verdict with the numbers it rests on."""

    passed: bool
    reasons: list[str]
    challenger_version: str
    champion_version: str | None
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    rules: list[RuleResult] = field(default_factory=list)
    holdout_start: str = ""
    holdout_end: str = ""
    holdout_rows: int = 0
    gate_key: str = ""
    reused: bool = False

    @property
    def decision(self) -> str:
        return "passed" if self.passed else "rejected"

    @classmethod
    def from_json(cls, data: dict[str, Any], run_id: str, reused: bool) -> GateDecision:
        rules = [RuleResult(**r) for r in data.get("rules", [])]
        return cls(
            passed=bool(data["passed"]), reasons=list(data["reasons"]),
            challenger_version=str(data["challenger"]["version"]),
            champion_version=(str(data["champion"]["version"]) if data.get("champion") else None),
            run_id=run_id, metrics=dict(data.get("metrics", {})), rules=rules,
            holdout_start=data["holdout"]["start"], holdout_end=data["holdout"]["end"],
            holdout_rows=int(data["holdout"]["rows"]), gate_key=data["gate_key"], reused=reused,
        )


# ----------------------------------------------------------------------------- resolving
def _resolve(client: MlflowClient, name: str, ref: str, role: str, required: bool) -> ModelVersion | None:
    """``ref`` is an alias or a version number."""
    ref = str(ref).strip()
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except mlflow.exceptions.MlflowException:
            raise ChurnError(f"{role} version {ref} of model '{name}' does not exist; "
                             "list versions in the MLflow UI or pass an alias") from None
    mv = alias_version(client, name, ref)
    if mv is None and required:
        raise ChurnError(
            f"model '{name}' has no version with alias '{ref}' ({role}); train one with "
            f"`churn train` or pass --{role} VERSION"
        )
    return mv


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _data_fingerprint(data_dir: Path) -> str:
    manifest = Path(data_dir) / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    files = sorted(f"{p.relative_to(data_dir)}:{p.stat().st_size}" for p in Path(data_dir).rglob("*.parquet"))
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def gate_key(cfg: ChurnConfig, challenger: str, champion: str | None, cutoffs: list[datetime]) -> str:
    """sha256 identifying one decision (see module doc)."""
    ident = {
        "model": cfg.training.model_name, "challenger": str(challenger), "champion": champion,
        "cutoffs": [c.isoformat() for c in cutoffs], "horizon": cfg.features.label_horizon_days,
        "data": _data_fingerprint(cfg.data_dir), "evaluation": cfg.evaluation.model_dump(mode="json"),
        "segments_min": cfg.evaluation.min_segment_size,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def find_decision(client: MlflowClient, key: str) -> GateDecision | None:
    """The finished decision run tagged ``gate_key = key`` (any experiment), or None."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return None
    query = f"tags.gate_key = '{key}' and attributes.status = 'FINISHED'"
    runs = client.search_runs(exp_ids, filter_string=query,
                              order_by=["attributes.start_time ASC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, DECISION_FILE, tmp)
        data = json.loads(Path(path).read_text())
    return GateDecision.from_json(data, run.info.run_id, reused=True)


# ----------------------------------------------------------------------------- gate rules
def _check(rule: str, metric: str, candidate: float, threshold: MetricThreshold,
           baseline: float | None, required: float, describe: str) -> RuleResult:
    """Run one rule through ``mlflow.validate_evaluation_results``."""
    cand = EvaluationResult({metric: float(candidate)}, {}, run_id="gate")
    base = EvaluationResult({metric: float(baseline)}, {}, run_id="gate") if baseline is not None else None
    log = logging.getLogger("mlflow.models.evaluation.validation")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs two INFO lines per rule
    try:
        mlflow.validate_evaluation_results({metric: threshold}, cand, base)
        passed = True
    except ModelValidationFailedException:
        passed = False
    finally:
        log.setLevel(level)
    reason = "" if passed else f"{describe}: {candidate:.4f} < required {required:.4f}"
    return RuleResult(rule, metric, float(candidate), None if baseline is None else float(baseline),
                      float(required), passed, reason)


def apply_gate(cfg: ChurnConfig, chal: dict[str, Any], champ: dict[str, Any] | None,
               chal_seg: pd.DataFrame, champ_seg: pd.DataFrame | None) -> list[RuleResult]:
    """Every rule of the module doc on the challenger's (and champion's) metrics."""
    ev = cfg.evaluation
    if not math.isfinite(chal["roc_auc"]):
        raise ChurnError("the holdout has churners or non-churners only: AUC is undefined; "
                         "widen evaluation.holdout_days or check the data")
    out: list[RuleResult] = []
    if champ is None:
        out.append(_check("auc_floor", "roc_auc", chal["roc_auc"],
                          MetricThreshold(threshold=ev.min_auc, greater_is_better=True), None, ev.min_auc,
                          "no champion yet and ROC AUC is below the floor evaluation.min_auc"))
        out.append(_check("lift_floor", "revenue_lift", chal["revenue_lift"],
                          MetricThreshold(threshold=0.0, greater_is_better=True), None, 0.0,
                          "no champion yet and revenue lift is below 0 (worse than random targeting)"))
        return out
    if ev.min_auc_delta > 0:
        auc_thr = MetricThreshold(min_absolute_change=ev.min_auc_delta, greater_is_better=True)
        auc_base: float | None = champ["roc_auc"]
    else:  # MLflow refuses min_absolute_change=0: "not worse than the champion" is a threshold
        auc_thr = MetricThreshold(threshold=champ["roc_auc"], greater_is_better=True)
        auc_base = None
    res = _check("auc_vs_champion", "roc_auc", chal["roc_auc"], auc_thr, auc_base,
                 champ["roc_auc"] + ev.min_auc_delta,
                 f"ROC AUC is not at least champion {champ['roc_auc']:.4f} + min_auc_delta "
                 f"{ev.min_auc_delta}")
    res.baseline = float(champ["roc_auc"])
    out.append(res)
    need = champ["recall_at_k"] - ev.recall_tolerance
    out.append(_check("recall_at_k", "recall_at_k", chal["recall_at_k"],
                      MetricThreshold(threshold=need, greater_is_better=True), None, need,
                      f"recall@{ev.top_k_pct:g}% fell more than recall_tolerance {ev.recall_tolerance} "
                      f"below champion {champ['recall_at_k']:.4f}"))
    out[-1].baseline = float(champ["recall_at_k"])
    need = champ["revenue_lift"] - ev.lift_tolerance * abs(champ["revenue_lift"])
    out.append(_check("revenue_lift", "revenue_lift", chal["revenue_lift"],
                      MetricThreshold(threshold=need, greater_is_better=True), None, need,
                      f"revenue lift fell more than lift_tolerance {ev.lift_tolerance:.0%} below champion "
                      f"{champ['revenue_lift']:.4f}"))
    out[-1].baseline = float(champ["revenue_lift"])
    if champ_seg is not None:
        both = chal_seg.merge(champ_seg, on=["segment", "value"], suffixes=("", "_champion"))
        tested = [row for row in both.itertuples(index=False)
                  if row.gated and math.isfinite(row.roc_auc) and math.isfinite(row.roc_auc_champion)
                  and getattr(row, "churners", math.inf) >= ev.min_segment_churners]
        z = segment_z(ev.segment_alpha, len(tested))
        for row in tested:
            se = getattr(row, "auc_diff_se", float("nan"))
            margin = z * se if math.isfinite(se) else 0.0
            need = row.roc_auc_champion - ev.segment_tolerance - margin
            metric = f"roc_auc_{row.segment}_{row.value}"
            res = _check("segment_auc", metric, row.roc_auc,
                         MetricThreshold(threshold=need, greater_is_better=True), None, need,
                         f"segment {row.segment}={row.value} (n={row.n}) ROC AUC fell more than "
                         f"segment_tolerance {ev.segment_tolerance} + {z:.2f} x SE {se:.4f} "
                         f"below champion {row.roc_auc_champion:.4f}")
            res.baseline = float(row.roc_auc_champion)
            out.append(res)
    return out


# ----------------------------------------------------------------------------- data
def _sample(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    return frame if len(frame) <= rows else frame.sample(n=rows, random_state=seed).sort_index()


def reference_cutoffs(cfg: ChurnConfig, mv: ModelVersion) -> list[datetime]:
    """The challenger's training cutoffs, from its window_start / window_end tags."""
    start = parse_tag_time(mv.tags.get("window_start"), f"tag window_start of version {mv.version}")
    end = parse_tag_time(mv.tags.get("window_end"), f"tag window_end of version {mv.version}")
    return daily_cutoffs(start, end, cfg.training.cutoff_every_days)


def drift_reports(cfg: ChurnConfig, scorer: Scorer, reference: pd.DataFrame, current: pd.DataFrame,
                  ref_scores: np.ndarray, cur_scores: np.ndarray, out_dir: Path) -> dict[str, Any]:
    """Evidently HTML report + the project's drift JSON (monitoring.drift on a reference
    profile) of ``current`` against ``reference``; returns the JSON's summary."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from mlflow_churn.stats.drift import drift_against_entry
    from mlflow_churn.training.profile import build_profile

    fs = scorer.feature_set
    cats = list(fs.categorical)
    nums = [c for c in fs.columns if c not in fs.categorical]

    def _ds(frame: pd.DataFrame, scores: np.ndarray) -> Dataset:
        data = frame[fs.columns].copy()
        for c in cats:
            data[c] = data[c].astype("object")
        data["score"] = scores
        return Dataset.from_pandas(data, data_definition=DataDefinition(
            numerical_columns=nums + ["score"], categorical_columns=cats))

    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot = Report([DataDriftPreset()]).run(_ds(current, cur_scores), _ds(reference, ref_scores))
    snapshot.save_html(str(out_dir / "report.html"))
    evidently_summary: dict[str, Any] = {}
    for m in snapshot.dict().get("metrics", []):
        name = str(m.get("metric_name", ""))
        if name.startswith("DriftedColumnsCount"):
            evidently_summary = {"drifted_columns": m["value"].get("count"),
                                 "drifted_share": m["value"].get("share")}
    segments = [s for s in cfg.monitoring.segments if s in cats]
    profile = build_profile(reference, fs, ref_scores, bins=cfg.monitoring.bins, segments=segments)
    eps, thr = cfg.monitoring.psi_epsilon, 0.2
    features = {c: drift_against_entry(c, profile["features"][c], current[c], thr, eps).to_dict()
                for c in fs.columns}
    score = drift_against_entry("score", profile["score"], cur_scores, thr, eps).to_dict()
    drifted = sorted(c for c, d in features.items() if d["psi"] is not None and d["psi"] > d["threshold"])
    doc = {
        "reference_rows": int(len(reference)), "current_rows": int(len(current)),
        "psi_threshold": thr, "features": features, "score": score, "drifted_features": drifted,
        "evidently": evidently_summary,
    }
    (out_dir / "drift.json").write_text(json.dumps(_json_safe(doc), indent=2))
    return {"drifted_features": drifted, "score_psi": score["psi"], **evidently_summary}


# ----------------------------------------------------------------------------- entry point
def evaluate(
    cfg: ChurnConfig,
    as_of: datetime,
    challenger_alias: str = "challenger",
    champion_alias: str = "champion",
    parent_run_id: str | None = None,
    drift_sample_rows: int = DRIFT_SAMPLE_ROWS,
    on_step: Callable[[str], None] | None = None,
) -> GateDecision:
    """Gate the challenger against the champion (see :func:`_evaluate`). A tracking server
    that fails mid-way ends it with one ChurnError naming the server: the decision run is
    marked FAILED (or journalled when the server is gone), the version's ``gate`` verdict
    and the ``canary`` alias are written last, so they are never half-set."""
    with fail_fast(cfg, f"gating '{cfg.training.model_name}'"):
        return _evaluate(cfg, as_of, challenger_alias, champion_alias, parent_run_id, drift_sample_rows,
                         on_step)


def _evaluate(
    cfg: ChurnConfig,
    as_of: datetime,
    challenger_alias: str = "challenger",
    champion_alias: str = "champion",
    parent_run_id: str | None = None,
    drift_sample_rows: int = DRIFT_SAMPLE_ROWS,
    on_step: Callable[[str], None] | None = None,
) -> GateDecision:
    """Gate the challenger against the champion on the holdout at ``as_of`` (UTC).

    ``challenger_alias`` / ``champion_alias`` are aliases or version numbers;
    ``drift_sample_rows`` bounds the reference and current rows of the drift report (a
    seeded sample; the gate's metrics always use the whole holdout); ``on_step(label)`` is
    called after each of the :data:`STEPS` stages (progress bars). Returns the
    :class:`GateDecision`; see the module doc for the rules, side effects and idempotence.
    Raises ChurnError when a model, its tags or the holdout are missing.
    """
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    exp_id = setup_mlflow(cfg)
    client = MlflowClient()
    name = cfg.training.model_name
    chal_mv = _resolve(client, name, challenger_alias, "challenger", True)
    champ_mv = _resolve(client, name, champion_alias, "champion", False)
    assert chal_mv is not None
    if champ_mv is not None and champ_mv.version == chal_mv.version:
        raise ChurnError(f"version {chal_mv.version} is both challenger and champion; "
                         "register a new challenger or pass --champion VERSION")
    for mv in (chal_mv, champ_mv):
        if mv is not None and mv.tags.get("source") == "table":
            raise ChurnError(
                f"version {mv.version} of '{name}' was trained from a flat table (`churn train --table`): "
                "the gate needs feature-store data with time, a holdout window and matured labels; "
                "register table models under their own training.model_name (CHURN_TRAINING__MODEL_NAME)")
    ends = [parse_tag_time(mv.tags.get("window_end"), f"tag window_end of version {mv.version}")
            for mv in (chal_mv, champ_mv) if mv is not None]
    cutoffs = holdout_cutoffs(as_of, cfg, ends)
    key = gate_key(cfg, chal_mv.version, champ_mv.version if champ_mv else None, cutoffs)
    step = on_step or (lambda _label: None)
    found = find_decision(client, key)
    step("resolve versions and holdout")
    if found is not None:
        return found

    chal_scorer = load_scorer(f"models:/{name}/{chal_mv.version}", chal_mv.version)
    champ_scorer = (load_scorer(f"models:/{name}/{champ_mv.version}", champ_mv.version)
                    if champ_mv is not None else None)
    frame = add_segment_columns(holdout_frame(cfg, chal_scorer.feature_set, cutoffs))
    y = frame["label"].to_numpy()
    p_chal = chal_scorer.predict_proba(frame)
    scores = {f"challenger v{chal_mv.version}": p_chal}
    p_champ = None
    if champ_scorer is not None:
        if champ_scorer.feature_set.hash == chal_scorer.feature_set.hash:
            champ_frame = frame
        else:
            champ_frame = holdout_frame(cfg, champ_scorer.feature_set, cutoffs)
            keys = ["customer_id", "cutoff"]
            if not champ_frame[keys].reset_index(drop=True).equals(frame[keys].reset_index(drop=True)):
                raise ChurnError("holdout rows differ between the two feature sets; rebuild the data")
        p_champ = champ_scorer.predict_proba(champ_frame)
        scores[f"champion v{champ_mv.version}"] = p_champ

    ev = cfg.evaluation
    step("build holdout frame and score")
    chal_m = classification_metrics(y, p_chal, ev)
    champ_m = classification_metrics(y, p_champ, ev) if p_champ is not None else None
    segs = [s for s in ev.segments]
    scored = frame.assign(score=p_chal)
    chal_seg = segment_metrics(scored, "score", "label", segs, ev, ev.min_segment_size)
    champ_seg = (segment_metrics(frame.assign(score=p_champ), "score", "label", segs, ev, ev.min_segment_size)
                 if p_champ is not None else None)
    if p_champ is not None:
        se = segment_auc_diff_se(frame, p_chal, p_champ, segs, seed=cfg.training.seed)
        chal_seg = chal_seg.merge(se, on=["segment", "value"], how="left")
    rules = apply_gate(cfg, chal_m, champ_m, chal_seg, champ_seg)
    failed = [r for r in rules if not r.passed]
    passed = not failed
    reasons = [r.reason for r in failed]

    metrics = scalar_metrics(chal_m, "challenger_")
    if champ_m is not None:
        metrics.update(scalar_metrics(champ_m, "champion_"))
        for k in ("roc_auc", "pr_auc", "recall_at_k", "revenue_lift"):
            metrics[f"delta_{k}"] = chal_m[k] - champ_m[k]
    metrics["gate_passed"] = float(passed)
    metrics["rules_failed"] = float(len(failed))
    metrics["holdout_rows"] = float(len(frame))
    if p_champ is not None:  # what the canary's live score split should look like (serving.canary)
        metrics["score_psi_vs_champion"] = float(psi(p_champ, p_chal, bins=cfg.monitoring.bins,
                                                     epsilon=cfg.monitoring.psi_epsilon))

    step("metrics, segments and gate rules")
    ref_cutoffs = reference_cutoffs(cfg, chal_mv)
    # the holdout customers at the training cutoffs: scores of customers the model never saw
    ref_frame = _sample(holdout_frame(cfg, chal_scorer.feature_set, ref_cutoffs), drift_sample_rows)
    cur_frame = _sample(frame, drift_sample_rows)
    ref_scores = chal_scorer.predict_proba(ref_frame)
    cur_scores = chal_scorer.predict_proba(cur_frame)

    if parent_run_id:  # the decision run lives next to its parent (e.g. the `mlflow run` run)
        exp_id = client.get_run(parent_run_id).info.experiment_id
    run_name = f"gate v{chal_mv.version} vs " + (f"v{champ_mv.version}" if champ_mv else "floors")
    tags = {"gate_key": key, "churn.decision": "gate", "gate": "passed" if passed else "rejected",
            "challenger_version": chal_mv.version,
            "champion_version": champ_mv.version if champ_mv else "none",
            "as_of": as_of.isoformat()}

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        step("reference window")
        drift = drift_reports(cfg, chal_scorer, ref_frame, cur_frame, ref_scores, cur_scores, tmp / "drift")
        step("drift report")
        plot_dir = tmp / "plots"
        plots.roc_plot(y, scores, plot_dir / "roc.png")
        plots.pr_plot(y, scores, plot_dir / "pr.png")
        plots.gain_lift_plot(y, scores, plot_dir / "gain_lift.png", ev.top_k_pct)
        plots.calibration_plot(y, scores, plot_dir / "calibration.png")
        seg_tables = {f"challenger v{chal_mv.version}": chal_seg}
        if champ_seg is not None:
            seg_tables[f"champion v{champ_mv.version}"] = champ_seg
        plots.segment_auc_plot(seg_tables, plot_dir / "segment_auc.png", ev.segment_tolerance)
        step("plots")
        seg_dir = tmp / "segments"
        seg_dir.mkdir()
        chal_seg.to_csv(seg_dir / "challenger.csv", index=False)
        if champ_seg is not None:
            champ_seg.to_csv(seg_dir / "champion.csv", index=False)

        run_tags = dict(tags)
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        # explicit client calls: no fluent active-run state (MLFLOW_RUN_ID, threads) involved
        run = client.create_run(exp_id, run_name=run_name, tags=run_tags)
        run_id = run.info.run_id
        try:
            decision = {
                "gate_key": key, "passed": passed, "decision": "passed" if passed else "rejected",
                "reasons": reasons, "model": name, "as_of": as_of.isoformat(),
                "challenger": {"version": chal_mv.version, "ref": str(challenger_alias),
                               "metrics": chal_m, "feature_set_hash": chal_scorer.feature_set.hash,
                               "window_end": chal_mv.tags.get("window_end")},
                "champion": ({"version": champ_mv.version, "ref": str(champion_alias), "metrics": champ_m,
                              "feature_set_hash": champ_scorer.feature_set.hash,
                              "window_end": champ_mv.tags.get("window_end")} if champ_mv else None),
                "holdout": {"start": cutoffs[0].isoformat(), "end": cutoffs[-1].isoformat(),
                            "cutoffs": [c.isoformat() for c in cutoffs], "rows": int(len(frame)),
                            "churners": int(y.sum()), "horizon_days": cfg.features.label_horizon_days},
                "thresholds": ev.model_dump(mode="json"),
                "rules": [asdict(r) for r in rules],
                "segments": {"challenger": chal_seg.to_dict(orient="records"),
                             "champion": (champ_seg.to_dict(orient="records")
                                          if champ_seg is not None else None)},
                "drift": drift, "metrics": metrics,
                "actions": ([f"alias {CANARY} -> v{chal_mv.version}"] if passed
                            else [f"tag gate=rejected on v{chal_mv.version}"]),
                "mirror_stages": ev.mirror_stages, "run_id": run_id,
                "parent_run_id": parent_run_id,
            }
            (tmp / DECISION_FILE).write_text(json.dumps(_json_safe(decision), indent=2))
            params = {"challenger_version": chal_mv.version,
                      "champion_version": champ_mv.version if champ_mv else "none",
                      "as_of": as_of.isoformat(), "holdout_start": cutoffs[0].isoformat(),
                      "holdout_end": cutoffs[-1].isoformat(), "top_k_pct": ev.top_k_pct,
                      "min_auc_delta": ev.min_auc_delta, "segment_tolerance": ev.segment_tolerance,
                      "recall_tolerance": ev.recall_tolerance, "lift_tolerance": ev.lift_tolerance,
                      "min_auc": ev.min_auc, "min_segment_size": ev.min_segment_size,
                      "min_segment_churners": ev.min_segment_churners,
                      "segment_alpha": ev.segment_alpha}
            now = int(as_of.timestamp() * 1000)
            # per-segment AUC / recall@k as metrics too, so the UI compares them across gate runs
            logged = {**metrics, **segment_metric_values(chal_seg)}
            if champ_seg is not None:
                logged.update(segment_metric_values(champ_seg, "champion_"))
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in logged.items()],
                             params=[Param(k, str(v)) for k, v in params.items()])
            client.log_artifacts(run_id, str(plot_dir), "plots")
            client.log_artifacts(run_id, str(seg_dir), "segments")
            client.log_artifacts(run_id, str(tmp / "drift"), "drift")
            client.log_artifact(run_id, str(tmp / DECISION_FILE))
            # act last, once the evidence is stored
            _act(client, cfg, chal_mv.version, passed, reasons, run_id,
                 str(champ_mv.version) if champ_mv else None, metrics.get("score_psi_vs_champion"))
            step("decision run and registry")
        except BaseException:
            terminate_failed(cfg, client, run_id)
            raise
        client.set_terminated(run_id, "FINISHED")
        if parent_run_id:
            client.set_tag(parent_run_id, "gate_run_id", run_id)
            client.set_tag(parent_run_id, "gate", "passed" if passed else "rejected")
            client.log_metric(parent_run_id, "gate_passed", float(passed))

    return GateDecision(
        passed=passed, reasons=reasons, challenger_version=chal_mv.version,
        champion_version=champ_mv.version if champ_mv else None, run_id=run_id, metrics=metrics,
        rules=rules, holdout_start=cutoffs[0].isoformat(), holdout_end=cutoffs[-1].isoformat(),
        holdout_rows=int(len(frame)), gate_key=key, reused=False,
    )


def _act(client: MlflowClient, cfg: ChurnConfig, version: str, passed: bool, reasons: list[str],
         run_id: str, champion: str | None = None, score_psi: float | None = None) -> None:
    name = cfg.training.model_name
    tags = {"gate_run_id": run_id,
            "drift_report": f"runs:/{run_id}/{DRIFT_HTML}", "drift_json": f"runs:/{run_id}/{DRIFT_JSON}",
            "decision": f"runs:/{run_id}/{DECISION_FILE}", "gate_champion_version": champion or ""}
    if score_psi is not None:
        tags["gate_score_psi"] = f"{score_psi:.6f}"
    if not passed:
        tags["gate_reasons"] = "; ".join(reasons)[:_TAG_LIMIT]
    # the verdict last among the tags, the alias after it: an interruption never leaves a
    # verdict without its evidence tags, nor `canary` on a version without its verdict
    tags["gate"] = "passed" if passed else "rejected"
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if passed:
        if "gate_reasons" in client.get_model_version(name, version).tags:  # an earlier rejection
            client.delete_model_version_tag(name, version, "gate_reasons")
        move_alias(client, name, CANARY, version, cfg.evaluation.mirror_stages)

