"""Make MLflow's UI open an experiment on its runs (model training), not in GenAI mode.

What MLflow 3.17's UI reads to choose an experiment's view (its built JS,
``mlflow/server/js/build/static/js/``):

- ``main.*.js``, the ``WorkflowTypeProvider`` context: one GLOBAL workflow type, ``genai`` or
  ``machine_learning``: the ``?workflowType=`` query parameter of the (hash) URL when it is one
  of the two, else the browser's ``localStorage["mlflow.workflowType_v1"]`` (a JSON string,
  written only when the user flips the "GenAI / Model training" switch), else ``genai``;
- ``main.*.js``, ``useExperimentKind`` (module 31080, ``Fi``): when the feature flag
  ``shouldEnableWorkflowBasedNavigation`` (module 89511, ``Z0``: hard-coded ``() => !0`` in the
  build) is on, the experiment's kind is derived from that global type; the experiment tag
  ``mlflow.experimentKind`` is read only when the flag is off. So in 3.17 the tag does not
  choose the view;
- ``experimentPage.*.js`` (module 24546): opening ``#/experiments/<id>`` redirects to the
  ``runs`` tab for ``machine_learning`` and to ``overview`` / ``traces`` for ``genai``, and
  keeps ``workflowType`` in the URL. The experiment list links to ``#/experiments/<id>``
  without it, so a fresh browser profile always lands in GenAI mode.

Nothing the server sends (``/ajax-api/3.0/mlflow/server-info``, experiment tags) changes that
choice. The one server-side lever is the page itself: :func:`open_on_runs` makes the server's
``index.html`` carry a small script that, before the UI starts, stores ``machine_learning`` in
``localStorage["mlflow.workflowType_v1"]`` when the browser has no choice stored yet. A user
who flips the switch to GenAI keeps that choice. ``mlflow server --app-name churn-guard`` (the
guard, :func:`mlflow_churn.registry.guard.create_app`) installs it; a plain ``mlflow server``
cannot be steered, so the project still tags its experiments ``mlflow.experimentKind`` (what
the UI reads when the flag is off) and links with :func:`runs_url`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

_log = logging.getLogger(__name__)

#: the UI's ``useLocalStorage({key: "mlflow.workflowType", version: 1})`` item
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
MODEL_TRAINING = "machine_learning"
#: Flask endpoint of MLflow's ``index.html`` route (``mlflow.server.serve``)
INDEX_ENDPOINT = "serve"
SCRIPT = (
    "<script>/* mlflow-churn: open experiments on their runs unless this browser chose a view */"
    f'try{{if(window.localStorage.getItem("{WORKFLOW_STORAGE_KEY}")===null)'
    f'window.localStorage.setItem("{WORKFLOW_STORAGE_KEY}",JSON.stringify("{MODEL_TRAINING}"))}}'
    "catch(e){}</script>"
)


def with_model_training_default(html: str) -> str:
    """``html`` (MLflow's ``index.html``) with :data:`SCRIPT` first in ``<head>``, before the
    UI's own (deferred) script; unchanged when it is there already or has no ``<head>``."""
    if SCRIPT in html or "<head>" not in html:
        return html
    return html.replace("<head>", "<head>" + SCRIPT, 1)


def open_on_runs(flask_app: Any) -> bool:
    """Serve MLflow's UI page from ``flask_app`` (MLflow's server app) with the model-training
    default (see the module doc). True when installed; False (logged) when the app has no
    index route to wrap (another MLflow layout: the UI keeps its own default)."""
    from flask import Response

    original = flask_app.view_functions.get(INDEX_ENDPOINT)
    if original is None:
        _log.warning("mlflow-churn: MLflow's server app has no '%s' route; the UI keeps its GenAI default",
                     INDEX_ENDPOINT)
        return False
    if getattr(original, "_churn_open_on_runs", False):
        return True
    index = os.path.join(flask_app.static_folder or "", "index.html")

    def serve(*args: Any, **kwargs: Any) -> Any:
        try:
            with open(index, encoding="utf-8") as fh:
                html = fh.read()
        except OSError:  # no built UI: MLflow's own answer explains it
            return original(*args, **kwargs)
        resp = Response(with_model_training_default(html), mimetype="text/html")
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    serve._churn_open_on_runs = True  # type: ignore[attr-defined]
    flask_app.view_functions[INDEX_ENDPOINT] = serve
    return True


def runs_url(base_url: str, experiment_id: str) -> str:
    """The UI address of experiment ``experiment_id``'s runs that opens in model training mode
    on any MLflow 3 server, a plain one too (``?workflowType=machine_learning``; the parameter
    holds for that page only: the experiment list links without it)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType={MODEL_TRAINING}"


__all__ = ["MODEL_TRAINING", "SCRIPT", "WORKFLOW_STORAGE_KEY", "open_on_runs", "runs_url",
           "with_model_training_default"]
