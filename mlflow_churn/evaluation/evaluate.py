"""The champion/challenger gate: score both on the holdout, compare, move ``canary`` or reject.

:func:`gate` resolves the two registered versions (aliases or version numbers), builds
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
segment_improves   (a targeted challenger only: its source run carries the tag
                   ``churn.target_segments``, :mod:`mlflow_churn.training.targeting`) for every
                   named segment: challenger AUC >= champion AUC + max(z x SE, 0.0001), SE and
                   z as in segment_auc with z over the named segments; a named segment too
                   small to measure (under ``min_segment_size`` rows or
                   ``min_segment_churners`` churners, AUC or SE undefined) fails: its
                   improvement cannot be shown. The other segments keep segment_auc.
auc_floor          (no champion only: alias ``champion`` not set) roc_auc >= ``min_auc``.
lift_floor         (no champion only) revenue_lift >= 0: better than targeting at random.
=================  ==========================================================================

A targeted gate's decision names the targets: ``decision.json`` ``targeted`` (segments,
weight, source run), the decision run's tag ``gate.target_segments`` and
:attr:`GateDecision.target_segments`.

Pass: alias ``canary`` moves to the challenger (``registry.aliases.move_alias``, mirrored onto
the Staging stage when ``evaluation.mirror_stages``) and the version gets ``gate=passed``.
Fail: the version gets ``gate=rejected`` and ``gate_reasons``. Both: ``gate_run_id`` and
``drift_report`` / ``drift_json`` tags (``runs:/<decision run>/drift/...``), and, before the
alias moves, the signed gate decision ``churn.sig.gate`` (:mod:`mlflow_churn.registry.signing`:
the decision, the decision run, the champion compared with, a digest of the metrics and the
SHA-256 of the version's files), which is what the guard and ``churn canary promote`` trust.

The decision is one MLflow run (nested under ``parent_run_id`` when given, e.g. the
``mlflow run`` project run) with metrics, params, plots, per-segment CSVs, the Evidently
HTML drift report, the project's drift JSON and ``decision.json`` holding every number.

Idempotence: the run is tagged ``gate_key`` = sha256 of (model name, challenger and champion
versions by identity (:func:`~mlflow_churn.registry.signing.version_ref`: number, model id,
source run, creation time), holdout cutoffs, label horizon, data manifest, evaluation config). When a
finished decision run with that key exists, :func:`evaluate` returns its decision
(``reused=True``) and changes nothing: no run, no alias move, no tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException
from mlflow.tracking import MlflowClient

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError, NotFound, is_missing
from mlflow_churn.evaluation import plots
from mlflow_churn.evaluation.holdout import holdout_cutoffs, holdout_frame, parse_tag_time
from mlflow_churn.features.offline import daily_cutoffs
from mlflow_churn.jsonable import dumps
from mlflow_churn.progress import ProgressArg, resolve
from mlflow_churn.registry.aliases import CANARY, CHAMPION, alias_version, move_alias
from mlflow_churn.registry.lock import registry_lock
from mlflow_churn.registry.signing import Decision, record_signed, version_files_digest, version_ref
from mlflow_churn.registry.vocab import GateVerdict, SignedKind
from mlflow_churn.stats.drift import drift_against_entry, psi, score_shift
from mlflow_churn.stats.metrics import (
    add_segment_columns,
    classification_metrics,
    scalar_metrics,
    segment_metric_values,
    segment_metrics,
)
from mlflow_churn.stats.uncertainty import segment_auc_diff_se, segment_z
from mlflow_churn.tags import DECISION_KIND_TAG, GATE_KEY_TAG, GATE_RUN_TAG, GATE_TAG
from mlflow_churn.times import utc
from mlflow_churn.tracking import client_run, download_artifact, fail_fast, setup_mlflow
from mlflow_churn.training.model import Scorer, load_scorer
from mlflow_churn.training.profile import build_profile
from mlflow_churn.training.targeting import SegmentTargets, parse_segment_key

DECISION_FILE = "decision.json"
DRIFT_HTML = "drift/report.html"
DRIFT_JSON = "drift/drift.json"
#: rows of reference / current data at most in the drift report (seeded sample)
DRIFT_SAMPLE_ROWS = 20_000
_TAG_LIMIT = 4000
#: stages ``gate(progress=...)`` ticks through
STEPS = 7
#: the smallest AUC gain that counts as an improvement of a targeted segment (segment_alpha 0)
MIN_SEGMENT_IMPROVEMENT = 1e-4


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
    _gate_key: str = ""
    reused: bool = False
    #: a targeted challenger's named segments and sample weight (empty / None: a plain gate)
    target_segments: list[str] = field(default_factory=list)
    segment_weight: float | None = None

    @property
    def decision(self) -> GateVerdict:
        """``passed`` | ``rejected`` (:class:`~mlflow_churn.registry.vocab.GateVerdict`)."""
        return GateVerdict.of(self.passed)

    @classmethod
    def from_json(cls, data: dict[str, Any], run_id: str, reused: bool) -> GateDecision:
        rules = [RuleResult(**r) for r in data.get("rules", [])]
        targeted = data.get("targeted") or {}
        return cls(
            passed=bool(data["passed"]), reasons=list(data["reasons"]),
            challenger_version=str(data["challenger"]["version"]),
            champion_version=(str(data["champion"]["version"]) if data.get("champion") else None),
            run_id=run_id, metrics=dict(data.get("metrics", {})), rules=rules,
            holdout_start=data["holdout"]["start"], holdout_end=data["holdout"]["end"],
            holdout_rows=int(data["holdout"]["rows"]), _gate_key=data["gate_key"], reused=reused,
            target_segments=list(targeted.get("segments") or []), segment_weight=targeted.get("weight"),
        )


# ----------------------------------------------------------------------------- resolving
#: "no such alias" is errors.is_missing(exc, or_invalid=True): RESOURCE_DOES_NOT_EXIST, and
#: INVALID_PARAMETER_VALUE, which MLflow's own stores (sqlalchemy, file, hence `mlflow
#: server` too) answer for an alias the model does not have or a malformed alias name.
#: Any other error (an outage, a 5xx) propagates: it must never read as "no champion".


def _model_aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version of model ``name`` ({} when the model does not exist; other errors
    propagate)."""
    try:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        return {}


def _alias_target(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``; None only when the registry says it has no such alias
    and the model's alias list agrees. Every other error propagates."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not is_missing(exc, or_invalid=True) or alias in _model_aliases(client, name):
            raise
        return None


def _alias_listing(client: MlflowClient, name: str) -> str:
    """``champion -> v1, canary -> v2`` (by version), or ``none``."""
    aliases = sorted(_model_aliases(client, name).items(),
                     key=lambda av: (int(av[1]) if av[1].isdigit() else 0, av[0]))
    return ", ".join(f"{a} -> v{v}" for a, v in aliases) or "none"


def _resolve(client: MlflowClient, name: str, ref: str, role: str, required: bool) -> ModelVersion | None:
    """``ref`` is an alias or a version number. A missing alias is a ChurnError naming the
    model's aliases, except, when not ``required``, the champion alias (:data:`CHAMPION`):
    a model without a champion yet is gated against the absolute floors (returns None).
    Raised before anything is written."""
    ref = str(ref).strip()
    if ref.isdigit():
        try:
            return client.get_model_version(name, ref)
        except MlflowException as exc:
            if not is_missing(exc, or_invalid=True):  # an outage, not a missing version (fail_fast says so)
                raise
            raise NotFound(f"{role} version {ref} of model '{name}' does not exist; "
                           "list versions in the MLflow UI or pass an alias") from None
    mv = _alias_target(client, name, ref)
    if mv is not None or (not required and ref == CHAMPION):
        return mv
    if required:
        raise NotFound(
            f"model '{name}' has no version with alias '{ref}' ({role}; aliases: "
            f"{_alias_listing(client, name)}); train one with `churn train` or pass --{role} VERSION"
        )
    raise NotFound(
        f"--{role} {ref}: model '{name}' has no alias '{ref}' (aliases: {_alias_listing(client, name)}); "
        f"pass an existing alias or a version number, or omit --{role}"
    )


def _data_fingerprint(data_dir: Path) -> str:
    manifest = Path(data_dir) / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    files = sorted(f"{p.relative_to(data_dir)}:{p.stat().st_size}" for p in Path(data_dir).rglob("*.parquet"))
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def _gate_key(cfg: ChurnConfig, challenger: str, champion: str | None, cutoffs: list[datetime],
              targets: SegmentTargets | None = None) -> str:
    """sha256 identifying one decision (see module doc); ``challenger`` / ``champion`` are
    version refs (``<version>:<identity>``); a targeted challenger's ``targets`` are part of it
    (a plain gate's key is as before)."""
    ident: dict[str, Any] = {
        "model": cfg.training.model_name, "challenger": str(challenger), "champion": champion,
        "cutoffs": [c.isoformat() for c in cutoffs], "horizon": cfg.features.label_horizon_days,
        "data": _data_fingerprint(cfg.data_dir), "evaluation": cfg.evaluation.model_dump(mode="json"),
        "segments_min": cfg.evaluation.min_segment_size,
    }
    if targets is not None:
        ident["targets"] = {"segments": list(targets.segments), "weight": targets.weight}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _find_decision(client: MlflowClient, key: str) -> GateDecision | None:
    """The finished decision run tagged ``gate_key = key`` (any experiment), or None."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return None
    query = f"tags.{GATE_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'"
    runs = client.search_runs(exp_ids, filter_string=query,
                              order_by=["attributes.start_time ASC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifact(client, run.info.run_id, DECISION_FILE, tmp)
        data = json.loads(Path(path).read_text())
    return GateDecision.from_json(data, run.info.run_id, reused=True)


# ----------------------------------------------------------------------------- gate rules
def _threshold_rule(rule: str, metric: str, candidate: float, threshold: MetricThreshold,
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


def _apply_gate(cfg: ChurnConfig, chal: dict[str, Any], champ: dict[str, Any] | None,
               chal_seg: pd.DataFrame, champ_seg: pd.DataFrame | None,
               targets: SegmentTargets | None = None) -> list[RuleResult]:
    """Every rule of the module doc on the challenger's (and champion's) metrics; ``targets``
    (a targeted challenger) adds ``segment_improves`` for its named segments. The segment
    tables may hold more columns than ``evaluation.segments`` (a named segment's column):
    ``segment_auc`` looks at ``evaluation.segments`` only."""
    ev = cfg.evaluation
    if not math.isfinite(chal["roc_auc"]):
        raise ChurnError("the holdout has churners or non-churners only: AUC is undefined; "
                         "widen evaluation.holdout_days or check the data")
    out: list[RuleResult] = []
    if champ is None:
        out.append(_threshold_rule("auc_floor", "roc_auc", chal["roc_auc"],
                          MetricThreshold(threshold=ev.min_auc, greater_is_better=True), None, ev.min_auc,
                          "no champion yet and ROC AUC is below the floor evaluation.min_auc"))
        out.append(_threshold_rule("lift_floor", "revenue_lift", chal["revenue_lift"],
                          MetricThreshold(threshold=0.0, greater_is_better=True), None, 0.0,
                          "no champion yet and revenue lift is below 0 (worse than random targeting)"))
        return out
    if ev.min_auc_delta > 0:
        auc_thr = MetricThreshold(min_absolute_change=ev.min_auc_delta, greater_is_better=True)
        auc_base: float | None = champ["roc_auc"]
    else:  # MLflow refuses min_absolute_change=0: "not worse than the champion" is a threshold
        auc_thr = MetricThreshold(threshold=champ["roc_auc"], greater_is_better=True)
        auc_base = None
    res = _threshold_rule("auc_vs_champion", "roc_auc", chal["roc_auc"], auc_thr, auc_base,
                 champ["roc_auc"] + ev.min_auc_delta,
                 f"ROC AUC is not at least champion {champ['roc_auc']:.4f} + min_auc_delta "
                 f"{ev.min_auc_delta}")
    res.baseline = float(champ["roc_auc"])
    out.append(res)
    need = champ["recall_at_k"] - ev.recall_tolerance
    out.append(_threshold_rule("recall_at_k", "recall_at_k", chal["recall_at_k"],
                      MetricThreshold(threshold=need, greater_is_better=True), None, need,
                      f"recall@{ev.top_k_pct:g}% fell more than recall_tolerance {ev.recall_tolerance} "
                      f"below champion {champ['recall_at_k']:.4f}"))
    out[-1].baseline = float(champ["recall_at_k"])
    need = champ["revenue_lift"] - ev.lift_tolerance * abs(champ["revenue_lift"])
    out.append(_threshold_rule("revenue_lift", "revenue_lift", chal["revenue_lift"],
                      MetricThreshold(threshold=need, greater_is_better=True), None, need,
                      f"revenue lift fell more than lift_tolerance {ev.lift_tolerance:.0%} below champion "
                      f"{champ['revenue_lift']:.4f}"))
    out[-1].baseline = float(champ["revenue_lift"])
    if champ_seg is not None:
        both = chal_seg.merge(champ_seg, on=["segment", "value"], suffixes=("", "_champion"))
        tested = [row for row in both.itertuples(index=False)
                  if row.segment in ev.segments and row.gated
                  and math.isfinite(row.roc_auc) and math.isfinite(row.roc_auc_champion)
                  and getattr(row, "churners", math.inf) >= ev.min_segment_churners]
        z = segment_z(ev.segment_alpha, len(tested))
        for row in tested:
            se = getattr(row, "auc_diff_se", float("nan"))
            margin = z * se if math.isfinite(se) else 0.0
            need = row.roc_auc_champion - ev.segment_tolerance - margin
            metric = f"roc_auc_{row.segment}_{row.value}"
            res = _threshold_rule("segment_auc", metric, row.roc_auc,
                         MetricThreshold(threshold=need, greater_is_better=True), None, need,
                         f"segment {row.segment}={row.value} (n={row.n}) ROC AUC fell more than "
                         f"segment_tolerance {ev.segment_tolerance} + {z:.2f} x SE {se:.4f} "
                         f"below champion {row.roc_auc_champion:.4f}")
            res.baseline = float(row.roc_auc_champion)
            out.append(res)
        if targets is not None:
            out.extend(_targeted_rules(cfg, targets, both))
    return out


def _targeted_rules(cfg: ChurnConfig, targets: SegmentTargets, both: pd.DataFrame) -> list[RuleResult]:
    """``segment_improves`` for each segment a targeted challenger was trained for: its AUC
    must beat the champion's by more than the noise of the paired difference (``both``: the
    challenger's segment table merged with the champion's, ``_champion`` suffix)."""
    ev = cfg.evaluation
    z = segment_z(ev.segment_alpha, len(targets.segments))
    out = []
    for key in targets.segments:
        column, value = parse_segment_key(key)
        metric = f"roc_auc_{column}_{value}"
        rows = both[(both["segment"] == column) & (both["value"] == value)]
        row = rows.iloc[0] if len(rows) else None
        n = int(row["n"]) if row is not None else 0
        counted = row.get("churners", row["positives"]) if row is not None else 0
        churners = int(counted) if pd.notna(counted) else 0
        se = float(row.get("auc_diff_se", float("nan"))) if row is not None else float("nan")
        cand = float(row["roc_auc"]) if row is not None else float("nan")
        base = float(row["roc_auc_champion"]) if row is not None else float("nan")
        measurable = (row is not None and bool(row["gated"]) and churners >= ev.min_segment_churners
                      and math.isfinite(cand) and math.isfinite(base) and math.isfinite(se))
        if not measurable:
            out.append(RuleResult(
                "segment_improves", metric, cand, None if not math.isfinite(base) else base, float("nan"),
                False, f"targeted segment {key}: its improvement cannot be shown on the holdout ({n} "
                       f"rows, {churners} churners; needs evaluation.min_segment_size {ev.min_segment_size} "
                       f"rows and min_segment_churners {ev.min_segment_churners} churners, both AUCs and "
                       "their SE defined); widen evaluation.holdout_days or retrain without targeting "
                       "(training.segment_weight: 1)"))
            continue
        margin = max(z * se, MIN_SEGMENT_IMPROVEMENT)
        res = _threshold_rule(
            "segment_improves", metric, cand,
            MetricThreshold(min_absolute_change=margin, greater_is_better=True), base, base + margin,
            f"targeted segment {key} (n={n}) ROC AUC did not improve on champion {base:.4f} by more than "
            f"{z:.2f} x SE {se:.4f} (noise)")
        res.baseline = base
        out.append(res)
    return out


# ----------------------------------------------------------------------------- data
def _sample(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    return frame if len(frame) <= rows else frame.sample(n=rows, random_state=seed).sort_index()


def _reference_cutoffs(cfg: ChurnConfig, mv: ModelVersion) -> list[datetime]:
    """The challenger's training cutoffs, from its window_start / window_end tags."""
    start = parse_tag_time(mv.tags.get("window_start"), f"tag window_start of version {mv.version}")
    end = parse_tag_time(mv.tags.get("window_end"), f"tag window_end of version {mv.version}")
    return daily_cutoffs(start, end, cfg.training.cutoff_every_days)


def _drift_reports(cfg: ChurnConfig, scorer: Scorer, reference: pd.DataFrame, current: pd.DataFrame,
                  ref_scores: np.ndarray, cur_scores: np.ndarray, out_dir: Path) -> dict[str, Any]:
    """Evidently HTML report + the project's drift JSON (stats.drift on a reference
    profile) of ``current`` against ``reference``; returns the JSON's summary."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

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
    (out_dir / "drift.json").write_text(dumps(doc))
    return {"drifted_features": drifted, "score_psi": score["psi"], **evidently_summary}


# ----------------------------------------------------------------------------- the steps
@dataclass
class _Pair:
    """Step 1: the two versions, the holdout cutoffs and the decision's idempotence key."""

    name: str
    challenger: ModelVersion
    champion: ModelVersion | None
    cutoffs: list[datetime]
    key: str
    #: the challenger's targeted segments (from its source run's tags); None = a plain gate
    targets: SegmentTargets | None = None


@dataclass
class _Scored:
    """Step 2: the holdout frame and both models' scores on it."""

    frame: pd.DataFrame
    y: np.ndarray
    challenger: Scorer
    p_challenger: np.ndarray
    champion: Scorer | None
    p_champion: np.ndarray | None
    #: curve label -> scores, for the plots
    curves: dict[str, np.ndarray]


@dataclass
class _Verdict:
    """Step 3: metrics overall and per segment, the rules and the verdict."""

    challenger: dict[str, Any]
    champion: dict[str, Any] | None
    challenger_segments: pd.DataFrame
    champion_segments: pd.DataFrame | None
    rules: list[RuleResult]
    metrics: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.rules if not r.passed]


def _resolve_pair(client: MlflowClient, cfg: ChurnConfig, as_of: datetime, challenger_ref: str,
                  champion_ref: str) -> _Pair:
    """The challenger (required) and champion (optional) versions, refusing a version in both
    roles and models trained from a flat table; the holdout cutoffs and the gate key."""
    name = cfg.training.model_name
    chal_mv = _resolve(client, name, challenger_ref, "challenger", True)
    champ_mv = _resolve(client, name, champion_ref, "champion", False)
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
    # versions by identity, not number: a number re-used after a delete is another model
    targets = _challenger_targets(client, chal_mv)
    key = _gate_key(cfg, version_ref(chal_mv), version_ref(champ_mv) if champ_mv else None, cutoffs, targets)
    return _Pair(name, chal_mv, champ_mv, cutoffs, key, targets)


def _challenger_targets(client: MlflowClient, mv: ModelVersion) -> SegmentTargets | None:
    """What a targeted retrain trained ``mv`` for, from its source run's tags (the version's own
    tags when the run is gone); None for a plain challenger. An outage propagates."""
    tags: Mapping[str, str] = mv.tags or {}
    if mv.run_id:
        try:
            tags = client.get_run(mv.run_id).data.tags
        except MlflowException as exc:
            if not is_missing(exc):
                raise
    return SegmentTargets.from_tags(tags)


def _score_holdout(cfg: ChurnConfig, pair: _Pair) -> _Scored:
    """Both models scored in process on the same holdout rows (each with its own feature set)."""
    chal_mv, champ_mv = pair.challenger, pair.champion
    chal = load_scorer(f"models:/{pair.name}/{chal_mv.version}", chal_mv.version)
    champ = load_scorer(f"models:/{pair.name}/{champ_mv.version}", champ_mv.version) if champ_mv else None
    frame = add_segment_columns(holdout_frame(cfg, chal.feature_set, pair.cutoffs))
    p_chal = chal.predict_proba(frame)
    curves = {f"challenger v{chal_mv.version}": p_chal}
    p_champ = None
    if champ is not None and champ_mv is not None:
        champ_frame = frame
        if champ.feature_set.hash != chal.feature_set.hash:
            champ_frame = holdout_frame(cfg, champ.feature_set, pair.cutoffs)
            keys = ["customer_id", "cutoff"]
            if not champ_frame[keys].reset_index(drop=True).equals(frame[keys].reset_index(drop=True)):
                raise ChurnError("holdout rows differ between the two feature sets; rebuild the data")
        p_champ = champ.predict_proba(champ_frame)
        curves[f"champion v{champ_mv.version}"] = p_champ
    return _Scored(frame, frame["label"].to_numpy(), chal, p_chal, champ, p_champ, curves)


def _judge(cfg: ChurnConfig, scored: _Scored, targets: SegmentTargets | None = None) -> _Verdict:
    """Metrics overall and per segment (with the paired AUC-difference SE), the gate rules,
    and the flat metrics the decision run logs; ``targets``: a targeted challenger's segments
    (their columns are measured too when ``evaluation.segments`` lacks them)."""
    ev = cfg.evaluation
    frame, y, p_chal, p_champ = scored.frame, scored.y, scored.p_challenger, scored.p_champion
    segs = list(ev.segments)
    for key in targets.segments if targets is not None else ():
        column = parse_segment_key(key)[0]
        if column not in segs and column in frame.columns:
            segs.append(column)
    chal_m = classification_metrics(y, p_chal, ev)
    chal_seg = segment_metrics(frame.assign(score=p_chal), "score", "label", segs, ev, ev.min_segment_size)
    champ_m, champ_seg = None, None
    if p_champ is not None:
        champ_m = classification_metrics(y, p_champ, ev)
        champ_seg = segment_metrics(frame.assign(score=p_champ), "score", "label", segs, ev,
                                    ev.min_segment_size)
        se = segment_auc_diff_se(frame, p_chal, p_champ, segs, seed=cfg.training.seed)
        chal_seg = chal_seg.merge(se, on=["segment", "value"], how="left")
    rules = _apply_gate(cfg, chal_m, champ_m, chal_seg, champ_seg, targets)

    metrics = scalar_metrics(chal_m, "challenger_")
    if champ_m is not None:
        metrics.update(scalar_metrics(champ_m, "champion_"))
        for k in ("roc_auc", "pr_auc", "recall_at_k", "revenue_lift"):
            metrics[f"delta_{k}"] = chal_m[k] - champ_m[k]
    failed = [r for r in rules if not r.passed]
    metrics["gate_passed"] = float(not failed)
    metrics["rules_failed"] = float(len(failed))
    metrics["holdout_rows"] = float(len(frame))
    if p_champ is not None:  # what the canary's live score split should look like (serving.canary)
        metrics["score_psi_vs_champion"] = float(psi(p_champ, p_chal, bins=cfg.monitoring.bins,
                                                     epsilon=cfg.monitoring.psi_epsilon))
        # the canary judge's score effect the two models show on the same rows (serving.judge)
        metrics["score_shift_vs_champion"] = score_shift(p_champ, p_chal)
    return _Verdict(chal_m, champ_m, chal_seg, champ_seg, rules, metrics)


def _write_evidence(cfg: ChurnConfig, pair: _Pair, scored: _Scored, verdict: _Verdict,
                    drift_sample_rows: int, tmp: Path, step: Callable[[str], None]) -> dict[str, Any]:
    """Drift reports (holdout customers at the training cutoffs vs now), plots and per-segment
    CSVs under ``tmp`` (``drift/``, ``plots/``, ``segments/``); returns the drift summary."""
    chal = scored.challenger
    # the holdout customers at the training cutoffs: scores of customers the model never saw
    ref_frame = _sample(holdout_frame(cfg, chal.feature_set, _reference_cutoffs(cfg, pair.challenger)),
                        drift_sample_rows)
    cur_frame = _sample(scored.frame, drift_sample_rows)
    step("reference window")
    drift = _drift_reports(cfg, chal, ref_frame, cur_frame, chal.predict_proba(ref_frame),
                          chal.predict_proba(cur_frame), tmp / "drift")
    step("drift report")
    y, curves, ev = scored.y, scored.curves, cfg.evaluation
    plot_dir = tmp / "plots"
    plots.roc_plot(y, curves, plot_dir / "roc.png")
    plots.pr_plot(y, curves, plot_dir / "pr.png")
    plots.gain_lift_plot(y, curves, plot_dir / "gain_lift.png", ev.top_k_pct)
    plots.calibration_plot(y, curves, plot_dir / "calibration.png")
    seg_tables = {f"challenger v{pair.challenger.version}": verdict.challenger_segments}
    if verdict.champion_segments is not None and pair.champion is not None:
        seg_tables[f"champion v{pair.champion.version}"] = verdict.champion_segments
    plots.segment_auc_plot(seg_tables, plot_dir / "segment_auc.png", ev.segment_tolerance)
    step("plots")
    seg_dir = tmp / "segments"
    seg_dir.mkdir()
    verdict.challenger_segments.to_csv(seg_dir / "challenger.csv", index=False)
    if verdict.champion_segments is not None:
        verdict.champion_segments.to_csv(seg_dir / "champion.csv", index=False)
    return drift


def _decision_doc(cfg: ChurnConfig, as_of: datetime, refs: tuple[str, str], pair: _Pair, scored: _Scored,
                  verdict: _Verdict, drift: dict[str, Any], run_id: str,
                  parent_run_id: str | None) -> dict[str, Any]:
    """``decision.json``: every number the verdict rests on."""
    chal_mv, champ_mv, ev = pair.challenger, pair.champion, cfg.evaluation

    def side(mv: ModelVersion, ref: str, metrics: dict[str, Any], scorer: Scorer) -> dict[str, Any]:
        return {"version": mv.version, "ref": str(ref), "metrics": metrics,
                "feature_set_hash": scorer.feature_set.hash, "window_end": mv.tags.get("window_end")}

    return {
        "gate_key": pair.key, "passed": verdict.passed,
        "decision": GateVerdict.of(verdict.passed),
        "reasons": verdict.reasons, "model": pair.name, "as_of": as_of.isoformat(),
        "challenger": side(chal_mv, refs[0], verdict.challenger, scored.challenger),
        "champion": (side(champ_mv, refs[1], verdict.champion or {}, scored.champion)
                     if champ_mv is not None and scored.champion is not None else None),
        "holdout": {"start": pair.cutoffs[0].isoformat(), "end": pair.cutoffs[-1].isoformat(),
                    "cutoffs": [c.isoformat() for c in pair.cutoffs], "rows": int(len(scored.frame)),
                    "churners": int(scored.y.sum()), "horizon_days": cfg.features.label_horizon_days},
        "thresholds": ev.model_dump(mode="json"),
        "rules": [asdict(r) for r in verdict.rules],
        "segments": {"challenger": verdict.challenger_segments.to_dict(orient="records"),
                     "champion": (verdict.champion_segments.to_dict(orient="records")
                                  if verdict.champion_segments is not None else None)},
        "drift": drift, "metrics": verdict.metrics,
        "actions": ([f"alias {CANARY} -> v{chal_mv.version}"] if verdict.passed
                    else [f"tag gate=rejected on v{chal_mv.version}"]),
        "mirror_stages": ev.mirror_stages, "run_id": run_id, "parent_run_id": parent_run_id,
        "targeted": ({"segments": list(pair.targets.segments), "weight": pair.targets.weight,
                      "source_run": chal_mv.run_id,
                      "applied": champ_mv is not None}  # with no champion only the floors apply
                     if pair.targets is not None else None),
    }


def _log_decision(client: MlflowClient, cfg: ChurnConfig, run_id: str, as_of: datetime, pair: _Pair,
                  verdict: _Verdict, tmp: Path) -> None:
    """Params, metrics (per-segment too, so the UI compares them across gate runs) and the
    artifacts under ``tmp`` into the decision run."""
    ev = cfg.evaluation
    params = {"challenger_version": pair.challenger.version,
              "champion_version": pair.champion.version if pair.champion else "none",
              "as_of": as_of.isoformat(), "holdout_start": pair.cutoffs[0].isoformat(),
              "holdout_end": pair.cutoffs[-1].isoformat(), "top_k_pct": ev.top_k_pct,
              "min_auc_delta": ev.min_auc_delta, "segment_tolerance": ev.segment_tolerance,
              "recall_tolerance": ev.recall_tolerance, "lift_tolerance": ev.lift_tolerance,
              "min_auc": ev.min_auc, "min_segment_size": ev.min_segment_size,
              "min_segment_churners": ev.min_segment_churners, "segment_alpha": ev.segment_alpha}
    now = int(as_of.timestamp() * 1000)
    logged = {**verdict.metrics, **segment_metric_values(verdict.challenger_segments)}
    if verdict.champion_segments is not None:
        logged.update(segment_metric_values(verdict.champion_segments, "champion_"))
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in logged.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    for sub in ("plots", "segments", "drift"):
        client.log_artifacts(run_id, str(tmp / sub), sub)
    client.log_artifact(run_id, str(tmp / DECISION_FILE))


# ----------------------------------------------------------------------------- entry point
def gate(
    cfg: ChurnConfig,
    as_of: datetime,
    challenger_alias: str = "challenger",
    champion_alias: str = "champion",
    parent_run_id: str | None = None,
    drift_sample_rows: int = DRIFT_SAMPLE_ROWS,
    progress: ProgressArg = None,
) -> GateDecision:
    """Gate the challenger against the champion on the holdout at ``as_of`` (UTC).

    ``challenger_alias`` / ``champion_alias`` are aliases or version numbers. Only the
    champion alias ``"champion"`` may be missing (the first model: absolute floors); any
    other alias the model does not have is a ChurnError naming the model's aliases, raised
    before any run, tag or alias is written;
    ``drift_sample_rows`` bounds the reference and current rows of the drift report (a
    seeded sample; the gate's metrics always use the whole holdout); ``progress`` ticks once
    after each of the :data:`STEPS` stages (:mod:`mlflow_churn.progress`). Returns the
    :class:`GateDecision`; see the module doc for the rules, side effects and idempotence.
    Raises ChurnError when a model, its tags or the holdout are missing.

    A tracking server that fails mid-way ends it with one ChurnError naming the server: the
    decision run is marked FAILED (or journalled when the server is gone), the version's
    ``gate`` verdict and the ``canary`` alias are written last, so they are never half-set.
    """
    as_of = utc(as_of)
    with resolve(progress)("registry gate", STEPS) as tick, \
            fail_fast(cfg, f"gating '{cfg.training.model_name}'"):
        step: Callable[[str], None] = lambda _stage: tick(1)  # noqa: E731
        exp_id = setup_mlflow(cfg)
        client = MlflowClient()
        pair = _resolve_pair(client, cfg, as_of, challenger_alias, champion_alias)
        found = _find_decision(client, pair.key)
        step("resolve versions and holdout")
        if found is not None:
            return found
        scored = _score_holdout(cfg, pair)
        step("build holdout frame and score")
        verdict = _judge(cfg, scored, pair.targets)
        step("metrics, segments and gate rules")
        with tempfile.TemporaryDirectory() as tmp_str:
            tmp = Path(tmp_str)
            drift = _write_evidence(cfg, pair, scored, verdict, drift_sample_rows, tmp, step)
            run_id = _record_decision(client, cfg, exp_id, as_of, (challenger_alias, champion_alias), pair,
                                      scored, verdict, drift, parent_run_id, tmp)
            step("decision run and registry")
    return GateDecision(
        passed=verdict.passed, reasons=verdict.reasons, challenger_version=pair.challenger.version,
        champion_version=pair.champion.version if pair.champion else None, run_id=run_id,
        metrics=verdict.metrics, rules=verdict.rules, holdout_start=pair.cutoffs[0].isoformat(),
        holdout_end=pair.cutoffs[-1].isoformat(), holdout_rows=int(len(scored.frame)), _gate_key=pair.key,
        reused=False, target_segments=list(pair.targets.segments) if pair.targets else [],
        segment_weight=pair.targets.weight if pair.targets else None,
    )


def _record_decision(client: MlflowClient, cfg: ChurnConfig, exp_id: str, as_of: datetime,
                     refs: tuple[str, str], pair: _Pair, scored: _Scored, verdict: _Verdict,
                     drift: dict[str, Any], parent_run_id: str | None, tmp: Path) -> str:
    """The decision run (next to ``parent_run_id`` when given, e.g. the ``mlflow run`` run)
    with its evidence, then the registry action: the evidence is stored before anything acts.
    Explicit client calls (:func:`~mlflow_churn.tracking.client_run`): no fluent active-run
    state (MLFLOW_RUN_ID, threads) involved. Returns the run id."""
    chal_mv, champ_mv, passed = pair.challenger, pair.champion, verdict.passed
    tags = {GATE_KEY_TAG: pair.key, DECISION_KIND_TAG: "gate", GATE_TAG: GateVerdict.of(passed).value,
            "challenger_version": chal_mv.version,
            "champion_version": champ_mv.version if champ_mv else "none",
            "as_of": as_of.isoformat()}
    if pair.targets is not None:
        tags["gate.target_segments"] = ",".join(pair.targets.segments)
        tags["gate.segment_weight"] = f"{pair.targets.weight:g}"
    run_name = f"gate v{chal_mv.version} vs " + (f"v{champ_mv.version}" if champ_mv else "floors")
    with client_run(client, cfg, run_name, experiment_id=None if parent_run_id else exp_id,
                    parent_run_id=parent_run_id, tags=tags, journal=True) as run_id:
        doc = _decision_doc(cfg, as_of, refs, pair, scored, verdict, drift, run_id, parent_run_id)
        (tmp / DECISION_FILE).write_text(dumps(doc))
        _log_decision(client, cfg, run_id, as_of, pair, verdict, tmp)
        _record_verdict(client, cfg, chal_mv.version, passed, verdict.reasons, run_id, champ_mv,
                        verdict.metrics)
    if parent_run_id:
        client.set_tag(parent_run_id, GATE_RUN_TAG, run_id)
        client.set_tag(parent_run_id, GATE_TAG, GateVerdict.of(passed))
        client.log_metric(parent_run_id, "gate_passed", float(passed))
    return run_id


def _record_verdict(client: MlflowClient, cfg: ChurnConfig, version: str, passed: bool, reasons: list[str],
                    run_id: str, champion: ModelVersion | None = None,
                    metrics: Mapping[str, float] | None = None) -> Decision:
    """The gate's verdict on ``version`` of the model: evidence tags for people, then the
    signed gate decision (``churn.sig.gate``: the decision run, the champion it was compared
    with, a digest of ``metrics`` and the SHA-256 of the version's files as the store serves
    them now), then, on a pass, alias ``canary``. The signed decision is what the guard and
    ``churn canary promote`` trust; the tags are for people. Returns the signed decision."""
    name = cfg.training.model_name
    metrics = dict(metrics or {})
    score_psi = metrics.get("score_psi_vs_champion")
    tags = {GATE_RUN_TAG: run_id,
            "drift_report": f"runs:/{run_id}/{DRIFT_HTML}", "drift_json": f"runs:/{run_id}/{DRIFT_JSON}",
            "decision": f"runs:/{run_id}/{DECISION_FILE}",
            "gate_champion_version": str(champion.version) if champion is not None else "",
            "gate_champion_ref": version_ref(champion) if champion is not None else ""}
    if score_psi is not None:
        tags["gate_score_psi"] = f"{score_psi:.6f}"
    score_shift_ = metrics.get("score_shift_vs_champion")
    if score_shift_ is not None and math.isfinite(score_shift_):
        tags["gate_score_shift"] = f"{score_shift_:.6f}"
    if not passed:
        tags["gate_reasons"] = "; ".join(reasons)[:_TAG_LIMIT]
    # the verdict last among the tags, the signed decision after them, the alias last: an
    # interruption never leaves a verdict without its evidence tags, nor `canary` on a version
    # without its signed verdict
    tags[GATE_TAG] = GateVerdict.of(passed).value
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if passed and "gate_reasons" in client.get_model_version(name, version).tags:  # an earlier rejection
        client.delete_model_version_tag(name, version, "gate_reasons")
    signed = record_signed(client, cfg, name, version, SignedKind.GATE, tags[GATE_TAG], champion=champion,
                           run_id=run_id, metrics=metrics, reason="; ".join(reasons),
                           files_sha256=version_files_digest(client, name, version))
    if passed:
        _move_canary(client, cfg, name, str(version))
    return signed


def _move_canary(client: MlflowClient, cfg: ChurnConfig, name: str, version: str) -> bool:
    """Point ``canary`` at the passed ``version`` unless the registry moved past it while the
    gate ran (a gate started before a promotion and finished after it): ``version`` is the
    champion now, or the canary is a newer version. Decided under the transitions' lock, so
    a promote / rollback is wholly before or after. True when moved."""
    with registry_lock(cfg):
        champion, canary = (alias_version(client, name, a) for a in (CHAMPION, CANARY))
        past = []
        if champion is not None and str(champion.version) == version:
            past.append("it is the champion")
        if canary is not None and int(canary.version) > int(version):
            past.append(f"canary is v{canary.version}")
        if past:
            logging.getLogger(__name__).info("gate passed v%s but the registry moved past it (%s): canary "
                                             "not moved", version, ", ".join(past))
            return False
        move_alias(client, name, CANARY, version, cfg.evaluation.mirror_stages)
        return True


#: the gate's name before issue 26 (it shares its name with ``mlflow.evaluate``; the top-level
#: ``mlflow_churn.evaluate`` warns that it is deprecated)
evaluate = gate
