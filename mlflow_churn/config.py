"""One typed configuration for the whole loop, with its defaults documented here.

Sources, later ones win:

1. the defaults below;
2. a YAML file: ``--config PATH`` or ``CHURN_CONFIG``, else ``churn.yaml`` in the
   working directory when it exists;
3. environment variables ``CHURN_<SECTION>__<KEY>`` (e.g. ``CHURN_TRAINING__WINDOW_DAYS=14``),
   plus ``CHURN_WORKSPACE`` and ``CHURN_TRACKING_URI``;
4. explicit overrides (CLI flags, MLproject parameters).

The MLflow tracking URI is ``MLFLOW_TRACKING_URI`` when set (as everywhere in MLflow),
else ``tracking_uri`` from the sources above, else ``sqlite:///<workspace>/mlflow.db``.
Unknown keys and bad values fail at load time with the dotted key named.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlflow_churn.errors import ConfigError

ENV_PREFIX = "CHURN_"
DEFAULT_WORKSPACE = Path("churn-workspace")
SCENARIOS = ("stable", "usage_shift", "segment_shift", "concept_drift", "gradual", "data_outage")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SimulationConfig(_Section):
    """Defaults of ``churn simulate`` (every one can be overridden on the command line)."""

    customers: int = Field(5000, ge=1, description="customers at the start of the simulation")
    days: int = Field(120, ge=1, description="simulated days of daily activity")
    start: date = Field(date(2026, 1, 1), description="first simulated day (UTC)")
    scenario: Literal[SCENARIOS] = "stable"  # type: ignore[valid-type]
    seed: int = Field(42, ge=0)
    onset_day: int | None = Field(
        None, ge=0, description="day index where the scenario starts drifting; None = days // 2"
    )
    segment_column: str = Field("region", description="column of the segment that shifts")
    segment_value: str = Field("pacific", description="value of the segment that shifts")


class FeaturesConfig(_Section):
    """Feature store: online backend, freshness SLA and label horizon."""

    online_backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("churn", description="key prefix of every Redis key we write")
    feature_set: str = Field("churn_default", description="feature set the model trains on")
    label_horizon_days: int = Field(30, ge=1, description="churn within this many days = 1")
    freshness_sla_hours: float = Field(26.0, gt=0, description="newest batch older = stale")
    max_ids: int = Field(1000, ge=1, description="most ids one GET /features may ask for")


class TrainingConfig(_Section):
    """Training window, tuning budget and registration."""

    model_name: str = "churn-model"
    experiment: str = "churn"
    window_days: int = Field(30, ge=1, description="production window ending at as_of (days)")
    history_days: int = Field(0, ge=0, description="extra rolling history before the window")
    history_weight: float = Field(0.5, ge=0, le=1, description="sample weight of history rows")
    cutoff_every_days: int = Field(7, ge=1, description="spacing of training cutoffs (days)")
    validation_fraction: float = Field(0.25, gt=0, lt=1, description="newest share for validation")
    n_trials: int = Field(20, ge=1)
    timeout_seconds: float | None = Field(None, gt=0)
    seed: int = 42


class EvaluationConfig(_Section):
    """Business metrics and the champion/challenger gate."""

    top_k_pct: float = Field(10.0, gt=0, le=100, description="share of customers targeted (%)")
    monthly_revenue: float = Field(60.0, ge=0, description="revenue per customer per month")
    offer_cost: float = Field(10.0, ge=0, description="cost of one retention offer")
    save_rate: float = Field(0.3, ge=0, le=1, description="share of targeted churners kept")
    segments: list[str] = Field(default_factory=lambda: ["plan", "region", "contract"])
    min_auc_delta: float = Field(0.0, ge=0, description="challenger AUC must beat by this")
    segment_tolerance: float = Field(0.02, ge=0, description="max per-segment AUC loss")
    min_auc: float = Field(0.7, ge=0, le=1, description="absolute floor with no champion")


class ChurnConfig(_Section):
    """The whole configuration."""

    workspace: Path = Field(DEFAULT_WORKSPACE, description="data, online store, MLflow store")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (see module doc)")
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @property
    def data_dir(self) -> Path:
        """Where the raw tables (Parquet) live."""
        return self.workspace / "data"

    @property
    def mlflow_tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` if set, else the configured one, else the workspace's."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{self.workspace.resolve() / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        """Artifact root for experiments we create in the default store."""
        return self.workspace.resolve() / "mlartifacts"


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    known = set(_known_keys(ChurnConfig))
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "CHURN_CONFIG":
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        if dotted not in known:
            raise ConfigError(
                f"unknown environment variable {name} (config key '{dotted}'); "
                f"known keys: {', '.join(sorted(known))}"
            )
        value: Any = raw
        if raw.startswith("[") or raw.startswith("{"):
            value = yaml.safe_load(raw)
        _set_dotted(tree, dotted, value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {data!r}")
    return data


def _validate(tree: dict[str, Any], source: str) -> ChurnConfig:
    try:
        return ChurnConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"unknown config key '{key}' in {source}; known keys: "
                f"{', '.join(_known_keys(ChurnConfig))}"
            ) from None
        raise ConfigError(
            f"bad value for config key '{key}' in {source}: {err['msg']} "
            f"(got {err.get('input')!r})"
        ) from None


def load_config(
    path: str | Path | None = None,
    workspace: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ChurnConfig:
    """Load the configuration from defaults, YAML, ``CHURN_*`` variables and overrides.

    ``overrides`` maps dotted keys (``"training.window_days"``) to values; ``None``
    values are ignored so CLI options left unset keep the configured value.
    """
    env = dict(os.environ if environ is None else environ)
    tree: dict[str, Any] = {}
    sources = ["defaults"]
    cfg_path = Path(path) if path else (Path(env["CHURN_CONFIG"]) if env.get("CHURN_CONFIG") else None)
    if cfg_path is None and Path("churn.yaml").is_file():
        cfg_path = Path("churn.yaml")
    if cfg_path is not None:
        if not cfg_path.is_file():
            raise ConfigError(f"config file {cfg_path} does not exist; check --config / CHURN_CONFIG")
        tree = _read_yaml(cfg_path)
        sources.append(str(cfg_path))
        _validate(tree, str(cfg_path))
    env_tree = _env_overrides(env)
    if env_tree:
        tree = _merge(tree, env_tree)
        sources.append("CHURN_* environment")
    flat = dict(overrides or {})
    if workspace not in (None, ""):
        flat["workspace"] = workspace
    for dotted, value in flat.items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    return _validate(tree, " + ".join(sources + (["overrides"] if flat else [])))
