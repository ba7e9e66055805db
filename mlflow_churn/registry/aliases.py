"""Registry aliases: the promotion mechanism (challenger -> canary -> champion).

Optionally mirrored onto the legacy stages (canary -> Staging, champion -> Production,
previous-champion -> Archived) for deployments that still load
``models:/<name>/Production``.
"""

from __future__ import annotations

import warnings

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHALLENGER = "challenger"
CANARY = "canary"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
STAGE_OF = {CANARY: "Staging", CHAMPION: "Production", PREVIOUS_CHAMPION: "Archived"}


def model_uri(name: str, alias: str) -> str:
    """``models:/<name>@<alias>``."""
    return f"models:/{name}@{alias}"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """Every alias of model ``name`` -> version number (empty when the model is unknown)."""
    try:
        return dict(client.get_registered_model(name).aliases)
    except MlflowException:
        return {}


def move_alias(client: MlflowClient, name: str, alias: str, version: str | int,
               mirror_stages: bool = False) -> None:
    """Point ``alias`` at ``version``. With ``mirror_stages`` the version also enters the
    alias's legacy stage, and the version the alias leaves drops out of Staging / Production
    (to ``None``), so those stages hold at most the one version their alias points at
    (Archived keeps every retired champion)."""
    previous = alias_version(client, name, alias) if mirror_stages and alias in STAGE_OF else None
    client.set_registered_model_alias(name, alias, str(version))
    if mirror_stages and alias in STAGE_OF:
        stage = STAGE_OF[alias]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, str(version), stage)
            left = previous is not None and previous.version != str(version)
            if left and stage != "Archived" and previous.current_stage == stage:
                client.transition_model_version_stage(name, previous.version, "None")


def remove_alias(client: MlflowClient, name: str, alias: str, mirror_stages: bool = False) -> str | None:
    """Delete ``alias``; return the version it pointed at (None if it was not set)."""
    mv = alias_version(client, name, alias)
    if mv is None:
        return None
    client.delete_registered_model_alias(name, alias)
    if mirror_stages and alias in STAGE_OF:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, mv.version, "None")
    return mv.version
