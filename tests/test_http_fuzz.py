"""Schemathesis against each app's OpenAPI over a real socket.

For every operation of the scoring service, the feature API and the webhook receiver,
a bounded number of generated requests, schema-conforming and not, each sent with no
token, a wrong token and the right one: no 5xx, every error a JSON ``detail``, no
exception text in any body; and every answer is what the OpenAPI documents (schemathesis's
conformance checks: a documented status, a documented content type, a body that validates
against that status's schema).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving_support import BATCH_AS_OF, ServerThread, serving_config, two_versions, wait_ready

from mlflow_churn.config import ChurnConfig, load_config

EXAMPLES = 20  # per operation and generation mode
EXCEPTION_TEXT = re.compile(r"Traceback \(most recent|File \"|\b\w+(Error|Exception): ")
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _check(label: str, headers: dict[str, str], res) -> None:
    where = f"{label} headers={sorted(headers)} -> {res.status_code}: {res.text[:300]}"
    assert res.status_code < 500, where
    assert not EXCEPTION_TEXT.search(res.text), where
    if res.status_code >= 400:
        ctype = res.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        assert (ctype if isinstance(ctype, str) else ctype[0]).startswith("application/json"), where
        assert isinstance(res.json().get("detail"), str), where


def _run(op, mode: GenerationMode, base_url: str, header_sets: list[dict[str, str]], examples: int) -> int:
    """``examples`` generated cases of ``op``, each sent once per header set; requests sent."""
    label, sent = f"{op.method.upper()} {op.path} ({mode})", [0]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        for headers in header_sets:
            res = case.call(base_url=base_url, headers=headers, timeout=30)
            _check(label, headers, res)
            case.validate_response(res, checks=CONFORMANCE, headers=headers)
            sent[0] += 1

    try:
        run()
    except Unsatisfiable:  # nothing of this operation can be made invalid (e.g. GET /health)
        assert mode == GenerationMode.NEGATIVE, label
    return sent[0]


def _fuzz(base_url: str, header_sets: Iterable[dict[str, str]], examples: int = EXAMPLES) -> dict[str, int]:
    """Every operation, both generation modes; requests sent per operation. Fails on a bad answer."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        counts[f"{op.method.upper()} {op.path}"] = sum(
            _run(op, mode, base_url, list(header_sets), examples)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
    return counts


@pytest.mark.slow  # ~30-40 s on a busy 2-core machine (two trained versions, ~500 requests)
def test_fuzz_scoring_service(config: ChurnConfig, register_version) -> None:
    two_versions(config, register_version)
    cfg = serving_config(config, canary_fraction=0.5, admin_token="adm-token", reload_seconds=60)
    with ServerThread(create_scoring(cfg)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        counts = _fuzz(srv.url, ({}, {"Authorization": "Bearer wrong"},
                                 {"Authorization": "Bearer adm-token"}), examples=10)
    for op in ("POST /predict", "POST /admin/promote", "POST /admin/rollback", "POST /admin/reload",
               "GET /admin/status", "GET /metrics", "GET /health", "GET /ready"):
        assert counts.get(op, 0) >= 3, counts


def create_scoring(cfg: ChurnConfig):
    from mlflow_churn.serving.app import create_app

    return create_app(cfg)


def test_fuzz_feature_api(workspace: Path, small_data: Path) -> None:
    from mlflow_churn.features.api import create_app
    from mlflow_churn.features.materialize import materialize

    (workspace / "data").symlink_to(small_data, target_is_directory=True)
    cfg = load_config(workspace=workspace, environ={}, overrides={"features.api_token": "feat-token"})
    materialize(cfg, BATCH_AS_OF)
    fresh = BATCH_AS_OF + timedelta(hours=1)  # /health is 503 by design once the batch is stale
    with ServerThread(create_app(cfg, clock=lambda: fresh)) as srv:
        counts = _fuzz(srv.url, ({}, {"Authorization": "Bearer feat-token"}), examples=40)
    assert {"GET /features", "GET /health", "GET /metrics"} <= set(counts), counts
    stale = BATCH_AS_OF + timedelta(days=30)  # the 503 of a stale batch is documented too
    with ServerThread(create_app(cfg, clock=lambda: stale)) as srv:
        case = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")["/health"]["GET"].Case()
        res = case.call(base_url=srv.url, timeout=30)
        assert res.status_code == 503 and res.json()["status"] == "stale", res.text
        assert isinstance(res.json()["detail"], str) and "stale" in res.json()["detail"], res.text
        case.validate_response(res, checks=CONFORMANCE)


def test_fuzz_webhook_receiver(config: ChurnConfig) -> None:
    from mlflow_churn.hooks.app import create_app

    cfg = load_config(workspace=config.workspace, environ={}, overrides={"hooks.secret": "hook-secret"})
    with ServerThread(create_app(cfg, gate=lambda job: "run-id")) as srv:
        counts = _fuzz(srv.url, ({}, {"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Timestamp": "1",
                                      "X-MLflow-Delivery-Id": "d"}))
    assert {"POST /webhook", "GET /health"} <= set(counts), counts


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_schema_routes_are_open(config: ChurnConfig, path: str) -> None:
    cfg = serving_config(config, admin_token="a", api_token="b", reload_seconds=60)
    with ServerThread(create_scoring(cfg)) as srv:
        assert httpx.get(srv.url + path, timeout=10).status_code == 200
