"""What the three HTTP apps (scoring service, feature API, webhook receiver) share.

- :mod:`~mlflow_churn.web.errors`: the one error-to-JSON path (``{"detail": ...}``, 4xx
  naming the field, 503 without internals) and the guard middleware that also enforces
  the request body limit (413) before any handler, signature or JSON work;
- :mod:`~mlflow_churn.web.auth`: bearer tokens (constant-time compare), the generated
  admin token file, the "no open port on the network" rule;
- :mod:`~mlflow_churn.web.limits`: the connection edges every app is served with (request
  head size and header count limits, a read timeout for slow clients, the port bound first so
  a port in use is one line, no query strings in access logs);
- :mod:`~mlflow_churn.web.breaker`: a circuit breaker that answers at once while a
  dependency (Redis) is down and probes it in the background;
- :mod:`~mlflow_churn.web.metrics`: Prometheus metrics on ``prometheus_client``, one
  registry per app;
- :mod:`~mlflow_churn.web.mlflow_ui`: MLflow's own server app (the guard plugin) serves its
  UI page so that experiments open on their runs, not in GenAI mode.

A leaf: it imports nothing of the project but :mod:`mlflow_churn.errors` (and
:mod:`mlflow_churn.lazy` for these exports).
"""

from mlflow_churn.lazy import lazy_exports

_EXPORTS = {
    "HttpError": "mlflow_churn.web.errors",
    "error_response": "mlflow_churn.web.errors",
    "install": "mlflow_churn.web.errors",
    "check_bearer": "mlflow_churn.web.auth",
    "check_exposure": "mlflow_churn.web.auth",
    "token_file": "mlflow_churn.web.auth",
    "CircuitBreaker": "mlflow_churn.web.breaker",
    "Unavailable": "mlflow_churn.web.breaker",
    "Metrics": "mlflow_churn.web.metrics",
    "HttpLimits": "mlflow_churn.web.limits",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
