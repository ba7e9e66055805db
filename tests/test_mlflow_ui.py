"""The MLflow UI opens the project's experiments on their runs (issue 22, item 4).

MLflow 3.17's UI picks an experiment's view from a per-browser workflow type (URL parameter,
else local storage, else GenAI), not from the ``mlflow.experimentKind`` tag: see
:mod:`mlflow_churn.web.mlflow_ui`. Fast: the page rewrite, the kind tag on every experiment
the project makes (``churn``, alias history, an experiment made elsewhere that a project run
writes into). Browser (``-m chromium``): a fresh Chromium profile opens ``churn`` from the
experiment list of ``mlflow server --app-name churn-guard`` and sees the runs table.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_churn.registry.history import HISTORY_EXPERIMENT, record_move
from mlflow_churn.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, client_run, ensure_experiment
from mlflow_churn.web.mlflow_ui import (
    SCRIPT,
    WORKFLOW_STORAGE_KEY,
    open_on_runs,
    runs_url,
    with_model_training_default,
)


def _mlflow_index() -> Path:
    import mlflow.server

    return Path(mlflow.server.__file__).parent / "js" / "build" / "index.html"


# ------------------------------------------------------------------ the page
def test_index_gets_the_default_before_the_ui_script() -> None:
    html = _mlflow_index().read_text()
    out = with_model_training_default(html)
    assert out.count(SCRIPT) == 1
    assert out.index(SCRIPT) < out.index("static/js/main.")  # stored before the UI reads it
    assert f'"{WORKFLOW_STORAGE_KEY}"' in SCRIPT and "===null" in SCRIPT  # a choice already made stays
    assert with_model_training_default(out) == out
    assert with_model_training_default("<html>no head</html>") == "<html>no head</html>"


def test_open_on_runs_wraps_the_index_route_only(tmp_path: Path) -> None:
    from flask import Flask, send_from_directory

    app = Flask("ui-test", static_folder=str(_mlflow_index().parent))

    @app.route("/")
    def serve():
        return send_from_directory(app.static_folder, "index.html")

    @app.route("/health")
    def health():
        return "OK"

    assert open_on_runs(app) and open_on_runs(app)  # twice: still one wrapper
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.get_data(as_text=True).count(SCRIPT) == 1
    assert client.get("/health").get_data(as_text=True) == "OK"
    assert not open_on_runs(Flask("no-index"))


def test_runs_url() -> None:
    assert runs_url("http://127.0.0.1:5000/", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"


# ------------------------------------------------------------------ the kind tag on every experiment
def test_every_experiment_the_project_makes_carries_the_kind(config) -> None:
    uri = config.mlflow_tracking_uri
    config.workspace.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri, uri)
    # ensure_experiment: created with extra tags; an existing one gets what it lacks
    exp = ensure_experiment(client, config, "with-note", tags={"mlflow.note.content": "hello"})
    tags = client.get_experiment(exp).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND and tags["mlflow.note.content"] == "hello"
    bare = client.create_experiment("bare")
    assert ensure_experiment(client, None, "bare") == bare
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # the alias history experiment
    record_move(client, "ui-model", "champion", None, "1", position=1, seq=1, actor="test", reason="ui")
    history = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    assert history.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "mlflow.note.content" in history.tags
    # an experiment made elsewhere (as the guard makes the audit experiment through the
    # server's store) gets the tag from the first project run written into it
    audit = client.create_experiment("made-by-the-server-store")
    with client_run(client, config, "audit-like", experiment_id=audit):
        pass
    assert client.get_experiment(audit).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


# ------------------------------------------------------------------ a person in a fresh browser
@pytest.mark.chromium
@pytest.mark.slow
def test_fresh_browser_opens_churn_on_its_runs(browser, tmp_path: Path, workspace: Path) -> None:
    from guard_support import guard_config, guard_server, new_version, set_alias
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from mlflow_churn.tracking import setup_mlflow

    with guard_server(tmp_path / "srv") as server:
        cfg = guard_config(workspace, server)
        client = MlflowClient(server.url, server.url)
        exp_id = setup_mlflow(cfg)
        assert cfg.training.experiment == "churn"
        with client_run(client, cfg, "train-ui-check", experiment_id=exp_id) as run_id:
            client.log_metric(run_id, "val_auc", 0.7)
        # a refused move: the guard writes its audit run into registry.audit_experiment
        version = new_version(client, cfg)
        assert set_alias(server, cfg.training.model_name, "champion", version).status_code != 200
        audit = client.get_experiment_by_name(cfg.registry.audit_experiment)
        assert audit is not None and audit.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
        with urllib.request.urlopen(f"{server.url}/", timeout=30) as page:  # noqa: S310 (our child)
            assert SCRIPT in page.read().decode()

        wait = WebDriverWait(browser, 90)
        browser.get(f"{server.url}/#/experiments")
        wait.until(ec.element_to_be_clickable((By.LINK_TEXT, "churn"))).click()
        wait.until(lambda d: f"/experiments/{exp_id}/" in d.current_url)
        body = (By.TAG_NAME, "body")
        wait.until(ec.text_to_be_present_in_element(body, "train-ui-check"))
        browser.save_screenshot(str(tmp_path / "churn-opened.png"))
        url = browser.current_url
        assert f"/experiments/{exp_id}/runs" in url, url
        assert "workflowType=machine_learning" in url and "genai" not in url, url
        assert "Run Name" in browser.find_element(*body).text  # the runs table's header
