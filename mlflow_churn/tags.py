"""Every MLflow tag name the package writes or reads, defined once.

Run tags, model-version tags and registered-model tags alike: a module that writes or reads
a tag imports its name from here, so a rename is one edit and a reader can list them all
(``tests/test_architecture.py`` fails on a ``"churn.<...>"`` tag literal anywhere else).
The values some of these tags hold are vocabularies of their own (StrEnums:
:class:`mlflow_churn.registry.vocab.GateVerdict` for :data:`GATE_TAG`,
:class:`mlflow_churn.registry.vocab.CanaryVerdict` for :data:`CANARY_DECISION_TAG`).

This module imports nothing: every layer may use it.
"""

from __future__ import annotations

# -- tags of our own namespace (``churn.``) -------------------------------------------------
#: run tag: why a run left RUNNING by a dead process or an outage was marked FAILED on replay
FAILED_TAG = "churn.failed"
#: run tag: the pending-run journal's entry that covers the run (journalled before the run is made)
JOURNAL_ENTRY_TAG = "churn.journal_entry"
#: run tag: which decision a run records (``gate``, ``retrain``)
DECISION_KIND_TAG = "churn.decision"
#: training-run tags of a targeted retrain (the gate reads them from the version's source run)
TARGETS_TAG = "churn.target_segments"
SEGMENT_WEIGHT_TAG = "churn.segment_weight"
#: registered-model tag by which the webhook receiver says it writes that model's history
HISTORY_WRITER_TAG = "churn.history_writer"
#: registered-model tag prefix of the recent claims about one alias (``churn.claim.<alias>``)
CLAIM_PREFIX = "churn.claim."
#: model-version tag prefix of the signed decisions (``churn.sig.<kind>``)
SIG_PREFIX = "churn.sig."
#: canary-version tag: the percent of customers its rollout routes to it now
ROLLOUT_WEIGHT_TAG = "churn.rollout.weight"
#: canary-version tag: the rollout controller's state (JSON)
ROLLOUT_STATE_TAG = "churn.rollout.state"

# -- run-tag prefixes of the loop's steps ----------------------------------------------------
#: tags of a monitoring run (``monitor.model_name``, ``monitor.as_of``, ``monitor.action``, ...)
MONITOR_PREFIX = "monitor."
#: tags of a retrain run (``retrain.model_name``, ``retrain.action``, ...)
RETRAIN_PREFIX = "retrain."

# -- model-version tags of the promotion rules (people read them; the guard trusts signatures) --
#: a person's reason to promote without the rules (basic-auth: override users only)
OVERRIDE_TAG = "promotion_override"
#: written by the guard only: who set the override
OVERRIDE_BY_TAG = "promotion_override_by"
#: written by the guard only: the champion reference when the override was set
OVERRIDE_AGAINST_TAG = "promotion_override_against"
#: who approved (basic-auth: approvers only, their own name)
APPROVAL_TAG = "approved_by"
#: the gate's decision: ``passed`` | ``rejected`` (run tag of the gate run too)
GATE_TAG = "gate"
#: the gate's decision run (version tag; also on the parent run of a gate)
GATE_RUN_TAG = "gate_run_id"
#: gate-run tag: the challenger / champion pair the gate compared
GATE_KEY_TAG = "gate_key"
#: the latest canary verdict: ``promote`` | ``rollback`` | ``wait``
CANARY_DECISION_TAG = "canary_decision"
#: the canary-evaluate run of that verdict
CANARY_RUN_TAG = "canary_run_id"
#: as_of of that evaluation (UTC ISO 8601)
CANARY_AT_TAG = "canary_evaluated_at"
#: model-version tag: when a version trained on a performance drop is due for its refresh
REFRESH_TAG = "refresh_due"
#: model-version tag: the training run of the version (its profile and baselines live there)
TRAIN_RUN_TAG = "train_run_id"

# -- MLflow's own tags we read or write ------------------------------------------------------
#: run tag listing the model versions logged from a run (mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS)
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
#: experiment tag choosing the view the MLflow UI opens an experiment in
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
