"""The request path's shortcuts give what the long way gave: the prediction log's feature JSON
(plain values straight to json, anything else through jsonable) and the metrics' cached
labelled children."""

from __future__ import annotations

import json
import math

import numpy as np

from mlflow_churn.jsonable import dumps
from mlflow_churn.serving.prediction_log import FeatureSampler
from mlflow_churn.web.metrics import Metrics


def test_feature_json_is_the_converters_text_for_every_kind_of_value() -> None:
    sampler = FeatureSampler()
    cases = [
        {"age": 41.0, "plan": "basic", "tickets": 3, "churned": False, "note": None, "name": "zoë"},
        {"age": math.nan, "plan": "basic"},  # NaN -> null, as jsonable makes it
        {"age": np.float64(2.5), "n": np.int64(4), "inf": math.inf},
        {},
    ]
    for values in cases:
        text = sampler.encode(values)
        assert text == dumps(dict(values), indent=None)
        json.loads(text)  # valid JSON: no NaN / Infinity tokens


def test_metrics_children_are_the_same_whatever_the_label_order() -> None:
    m = Metrics()
    m.inc("churn_x_total", {"route": "champion", "version": "1"})
    m.inc("churn_x_total", {"version": "1", "route": "champion"}, 2)
    m.inc("churn_x_total", {"route": "canary", "version": "2"})
    assert m.counter("churn_x_total", {"route": "champion", "version": "1"}) == 3
    assert m.counter("churn_x_total", {"route": "canary", "version": "2"}) == 1
    m.observe("churn_y_seconds", {"stage": "log"}, 0.002)
    m.observe("churn_y_seconds", {"stage": "log"}, 0.004)
    text = m.render([])
    assert 'churn_y_seconds_count{stage="log"} 2.0' in text
