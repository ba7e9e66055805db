"""The one way this package registers a model version (train, retrain, compress, tests).

:func:`register_model_version` works against a tracking server as well as a local store:
MLflow 3 logs a model as a LoggedModel (``models:/m-<id>``), and ``mlflow server`` refuses
``create_model_version`` with such a source unless ``model_id`` names that LoggedModel
(``INVALID_PARAMETER_VALUE: ... The model_id request parameter must identify the resource
that contains the source``); the SQLite store does not check. The helper passes it, taken
from the ``ModelInfo`` that ``log_model`` returned or parsed from the URI.

Nothing half-written:

- the version is created in ONE request with its tags and description, so it exists
  complete or not at all;
- then the LoggedModel gets MLflow's ``mlflow.modelVersions`` link tag (as
  ``mlflow.register_model`` does) and ``alias`` moves to the version; when either fails, the
  alias goes back to where it was and the version is deleted again (and the registered model
  too when this call created it and it is left empty);
- :func:`registered_version` does the same for a failure of the caller's block that follows
  the registration (training logs more evidence after it);
- when the server is gone and the clean-up cannot be made, it is journalled (see
  :mod:`mlflow_churn.tracking`) and replayed by the next command against that server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_churn.errors import is_missing
from mlflow_churn.registry.aliases import alias_version, move_alias
from mlflow_churn.tags import MODEL_VERSIONS_TAG
from mlflow_churn.tracking import current_failure, one_attempt, server_failure

MODEL_DESCRIPTION = "Churn model: P(churn) within the label horizon."


def model_id_of(model: Any) -> str | None:
    """The LoggedModel id of ``model``: a ``ModelInfo`` (``.model_id``) or a URI
    ``models:/m-<id>`` (None for ``runs:/...``, a registry URI or a path)."""
    model_id = getattr(model, "model_id", None)
    if model_id:
        return str(model_id)
    uri = str(getattr(model, "model_uri", model))
    if uri.startswith("models:/m-"):
        return uri[len("models:/"):].split("/", 1)[0]
    return None


def _source(model: Any) -> str:
    return str(getattr(model, "model_uri", model))


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Add (name, version) to the LoggedModel's ``mlflow.modelVersions`` tag, as
    ``mlflow.register_model`` does (the UI's link from the model to its versions), unless it
    is there already (``mlflow server`` adds it itself; the embedded store does not)."""
    model = client.get_logged_model(model_id)
    links = json.loads(model.tags.get(MODEL_VERSIONS_TAG) or "[]")
    if any(link.get("name") == name and str(link.get("version")) == str(version) for link in links):
        return
    links.append({"name": name, "version": str(version)})
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(links)})


@contextmanager
def _undo_on_error(client: MlflowClient, name: str, mv: ModelVersion, alias: str | None,
                   previous: str | None, created_model: bool, mirror_stages: bool) -> Iterator[None]:
    """On an error in the block: alias back to ``previous`` (when it points at ``mv``), the
    version deleted, an empty registered model this call created deleted; then re-raise."""
    try:
        yield
    except BaseException as exc:
        _undo(client, name, mv, alias, previous, created_model, mirror_stages,
              server_failed=isinstance(exc, Exception) and server_failure(exc) is not None)
        raise


def _undo(client: MlflowClient, name: str, mv: ModelVersion, alias: str | None, previous: str | None,
          created_model: bool, mirror_stages: bool, server_failed: bool) -> None:
    failure = current_failure()
    version = str(mv.version)

    def steps(c: MlflowClient) -> None:
        if alias and previous and previous != version:
            current = alias_version(c, name, alias)
            if current is not None and str(current.version) == version:
                move_alias(c, name, alias, previous, mirror_stages)
        c.delete_model_version(name, version)  # drops any alias still on it
        if created_model and not c.search_model_versions(f"name = '{name}'"):
            c.delete_registered_model(name)

    try:
        # the server failed once already: one quick attempt per request, no retries
        steps(one_attempt(client) if server_failed else client)
        if failure is not None:
            failure.note(f"version {version} of '{name}' deleted again"
                         + (f", alias {alias} back on version {previous}" if alias and previous else ""))
    except Exception as exc:
        if server_failure(exc) is None or failure is None:
            raise
        failure.defer("delete_version", name=name, version=version, alias=alias, previous=previous)
        failure.note(f"deleting the unfinished version {version} of '{name}' is left for the next churn "
                     "command against this server")


def register_model_version(client: MlflowClient, name: str, model: Any, *, run_id: str | None = None,
                           tags: dict[str, str] | None = None, description: str | None = None,
                           alias: str | None = None, mirror_stages: bool = False) -> ModelVersion:
    """Register ``model`` (the ``ModelInfo`` of ``log_model``, or a model URI) as a new
    version of ``name`` with ``tags`` and ``description`` in one request (the registered
    model is created when missing), link the LoggedModel to it, and point ``alias`` (if any)
    at it. On any failure after the version exists it is deleted again and the alias goes
    back (see the module doc). Returns the version as read back."""
    mv, _ = _register(client, name, model, run_id=run_id, tags=tags, description=description,
                               alias=alias, mirror_stages=mirror_stages)
    return mv


def _register(client: MlflowClient, name: str, model: Any, *, run_id: str | None, tags: dict[str, str] | None,
              description: str | None, alias: str | None,
              mirror_stages: bool) -> tuple[ModelVersion, tuple[Any, ...]]:
    created_model = False
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not is_missing(exc):  # an outage, a refusal: not "the model does not exist yet"
            raise
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
        created_model = True
    model_id = model_id_of(model)
    mv = client.create_model_version(name, _source(model), run_id=run_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()},
                                     description=description, model_id=model_id)
    previous_mv = alias_version(client, name, alias) if alias else None
    previous = str(previous_mv.version) if previous_mv is not None else None
    undo_args = (client, name, mv, alias, previous, created_model, mirror_stages)
    with _undo_on_error(*undo_args):
        if model_id:
            _link_logged_model(client, model_id, name, str(mv.version))
        if alias:
            move_alias(client, name, alias, mv.version, mirror_stages)
        mv = client.get_model_version(name, str(mv.version))
    return mv, undo_args


@contextmanager
def registered_version(client: MlflowClient, name: str, model: Any, run_id: str | None = None,
                       tags: dict[str, str] | None = None, *, description: str | None = None,
                       alias: str | None = None, mirror_stages: bool = False) -> Iterator[ModelVersion]:
    """:func:`register_model_version`, then the caller's block; when the block fails, the
    registration is undone (alias back, version deleted, an empty registered model this call
    created deleted) before the error goes on."""
    mv, undo_args = _register(client, name, model, run_id=run_id, tags=tags, description=description,
                              alias=alias, mirror_stages=mirror_stages)
    with _undo_on_error(*undo_args):
        yield mv


__all__ = ["model_id_of", "register_model_version", "registered_version"]
