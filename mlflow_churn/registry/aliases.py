"""Registry aliases: the promotion mechanism (challenger -> canary -> champion).

Optionally mirrored onto the legacy stages (canary -> Staging, champion -> Production,
previous-champion -> Archived) for deployments that still load
``models:/<name>/Production``.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import is_missing
from mlflow_churn.registry.claims import Claim, claiming, write_tag
from mlflow_churn.registry.history import default_actor, record_project_move, writer_of

CHALLENGER = "challenger"
CANARY = "canary"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
STAGE_OF = {CANARY: "Staging", CHAMPION: "Production", PREVIOUS_CHAMPION: "Archived"}


def model_uri(name: str, alias: str) -> str:
    """``models:/<name>@<alias>``."""
    return f"models:/{name}@{alias}"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or None when the alias (or the model) does not exist.
    Any other failure (the registry down, a 5xx) propagates: it is never "no such alias"."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not is_missing(exc, or_invalid=True):
            raise
        return None


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """Every alias of model ``name`` -> version number as text (the registry may hand out
    ints; empty when the model is unknown)."""
    try:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if not is_missing(exc):  # an outage is not "no aliases"
            raise
        return {}


def move_alias(client: MlflowClient, name: str, alias: str, version: str | int,
               mirror_stages: bool = False, *, actor: str | None = None, reason: str = "",
               evidence_run_id: str | None = None) -> None:
    """Point ``alias`` at ``version``. With ``mirror_stages`` the version also enters the
    alias's legacy stage, and the version the alias leaves drops out of Staging / Production
    (to ``None``), so those stages hold at most the one version their alias points at
    (Archived keeps every retired champion).

    Every alias move of this project goes through here (and :func:`remove_alias`), which
    sees that the alias history (:mod:`mlflow_churn.registry.history`) gets the move exactly
    once from its one writer: recorded here under the history lock on a store with neither
    guard nor receiver; else only claimed (``actor``, default the OS user; ``reason``;
    ``evidence_run_id``, the decision run behind it) to the guard in request headers or to
    the receiver in a model tag (:mod:`mlflow_churn.registry.claims`). Setting an alias to
    the version it already points at is not a move and is not recorded."""
    previous = alias_version(client, name, alias)
    _set_alias(client, name, alias, str(version), actor=actor, reason=reason, evidence_run_id=evidence_run_id)
    if mirror_stages and alias in STAGE_OF:
        stage = STAGE_OF[alias]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, str(version), stage)
            left = previous is not None and previous.version != str(version)
            if left and stage != "Archived" and previous.current_stage == stage:
                client.transition_model_version_stage(name, previous.version, "None")


def _set_alias(client: MlflowClient, name: str, alias: str, version: str | None, *, actor: str | None,
               reason: str, evidence_run_id: str | None) -> None:
    """Set (``version``) or delete (None) ``alias``, by the history's writer's rules (see
    :func:`move_alias`)."""
    claim = Claim(actor or default_actor(), reason, evidence_run_id or "")

    def apply() -> None:
        with claiming(claim):
            if version is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, version)

    writer = writer_of(client, name)
    if writer == "project":
        record_project_move(client, name, alias, version, apply, actor=claim.actor, reason=reason,
                            evidence_run_id=evidence_run_id)
        return
    if writer == "receiver":
        write_tag(client, name, alias, version, claim, datetime.now(UTC))
    apply()


def remove_alias(client: MlflowClient, name: str, alias: str, mirror_stages: bool = False, *,
                 actor: str | None = None, reason: str = "",
                 evidence_run_id: str | None = None) -> str | None:
    """Delete ``alias``; return the version it pointed at (None if it was not set). Recorded
    in the alias history as :func:`move_alias`."""
    mv = alias_version(client, name, alias)
    if mv is None:
        return None
    _set_alias(client, name, alias, None, actor=actor, reason=reason, evidence_run_id=evidence_run_id)
    if mirror_stages and alias in STAGE_OF:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, mv.version, "None")
    return str(mv.version)
