"""mlflow-churn: guardrails for a customer-churn model in production, centred on MLflow.

The loop's verbs are importable from here, each a core function with explicit arguments
(the configuration, ``as_of``, paths or URIs) that returns a dataclass and prints nothing;
the ``churn`` commands call the same functions (docs/api.md)::

    import mlflow_churn as mc

    cfg = mc.load_config(workspace="ws")
    mc.simulate(mc.SimulationSpec(customers=20_000, days=120), cfg.data_dir)
    as_of = mc.latest_as_of(cfg.data_dir)
    mc.materialize(cfg, as_of)
    version = mc.train(cfg, as_of).version
    decision = mc.gate(cfg, as_of)
    mc.promote(cfg, reason="canary looked good")
    mc.monitor(cfg, as_of)
    mc.retrain(cfg, as_of)
    mc.score(cfg, as_of)

The packages, bottom layer first (docs/architecture.md): :mod:`.stats`, :mod:`.data`,
:mod:`.features`, :mod:`.registry`, :mod:`.training`, :mod:`.evaluation`, :mod:`.serving`,
:mod:`.monitoring`; the shells on top (``churn`` CLI, MLproject entry points, HTTP apps,
:mod:`.hooks`). Each package's ``__all__`` is its public API; the names here are imported
on first use, so ``import mlflow_churn`` stays light. ``mlflow_churn.evaluate`` is the
gate's old name (it shares its name with ``mlflow.evaluate``): deprecated, use ``gate``.
"""

from mlflow_churn.lazy import lazy_exports

_EXPORTS = {
    "ChurnConfig": "mlflow_churn.config",
    "load_config": "mlflow_churn.config",
    "ChurnError": "mlflow_churn.errors",
    # the loop's verbs and their results, in the loop's order
    "simulate": "mlflow_churn.data.simulator",
    "SimulationSpec": "mlflow_churn.data.simulator",
    "SimulationResult": "mlflow_churn.data.simulator",
    "latest_as_of": "mlflow_churn.data.bounds",
    "materialize": "mlflow_churn.features.materialize",
    "BatchInfo": "mlflow_churn.features.online",
    "train": "mlflow_churn.training.train",
    "TrainResult": "mlflow_churn.training.train",
    "gate": "mlflow_churn.evaluation.evaluate",
    "GateDecision": "mlflow_churn.evaluation.evaluate",
    "monitor": "mlflow_churn.monitoring.monitor",
    "MonitorResult": "mlflow_churn.monitoring.runs",
    "retrain": "mlflow_churn.monitoring.retrain",
    "RetrainResult": "mlflow_churn.monitoring.retrain",
    "promote": "mlflow_churn.serving.transitions",
    "rollback": "mlflow_churn.serving.transitions",
    "TransitionResult": "mlflow_churn.serving.transitions",
    "score": "mlflow_churn.serving.batch:score_batch",
    "ScoreResult": "mlflow_churn.serving.batch",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, deprecated={"evaluate": "gate"})
