"""Prometheus metrics of the HTTP apps (scoring service, webhook receiver) on
``prometheus_client``: one :class:`~prometheus_client.CollectorRegistry` per app (never the
process-global one), so two apps in one process (tests, embedding) keep their own counts.

:class:`Metrics` keeps the small API the service uses (``describe``, ``inc``, ``observe``,
``counter``, ``render(gauges)``); metric names, label names and buckets are the ones the
dashboards already use. Counters and histograms are created at their first use, with the
label names of that use (sorted); gauges are the values passed to :meth:`render`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: upper bounds (seconds) of the latency histogram buckets
#: labelled children kept by :meth:`Metrics._metric` at most (label values are bounded: routes,
#: versions, statuses; past this a child is looked up each time, as before)
_MAX_CHILDREN = 10_000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# no `<name>_created` series: the exposition stays the one the dashboards were built on
prometheus_client.disable_created_metrics()


class Metrics:
    """Counters, histograms and (at render time) gauges; every method is thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._metrics: dict[str, tuple[Any, tuple[str, ...]]] = {}
        #: (name, *label items in the caller's order) -> the labelled child (skips
        #: prometheus_client's per-call label validation on the request path)
        self._children: dict[tuple, Any] = {}
        self._gauges: list[tuple[str, dict[str, str], float]] = []
        self.registry.register(_Gauges(self))

    def describe(self, name: str, kind: str, text: str) -> None:
        """Set the ``# HELP`` text and ``# TYPE`` (counter | histogram | gauge) of ``name``."""
        self._help[name] = (kind, text)

    def _metric(self, name: str, kind: str, labels: dict[str, str]) -> Any:
        key = (name, *labels.items())  # the child of these label values, made once
        child = self._children.get(key)
        if child is not None:
            return child
        child = self._labelled(name, kind, labels)
        with self._lock:
            if len(self._children) < _MAX_CHILDREN:
                self._children[key] = child
        return child

    def _labelled(self, name: str, kind: str, labels: dict[str, str]) -> Any:
        names = tuple(sorted(labels))
        with self._lock:
            got = self._metrics.get(name)
            if got is None:
                text = self._help.get(name, (kind, name))[1]
                if kind == "counter":
                    metric: Any = Counter(name, text, names, registry=self.registry)
                else:
                    metric = Histogram(name, text, names, buckets=self.buckets, registry=self.registry)
                got = self._metrics[name] = (metric, names)
        metric, known = got
        if known != names:
            raise ValueError(f"metric {name} has labels {known}, not {names}")
        return metric.labels(**labels) if names else metric

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        """Add ``value`` to the counter ``name{labels}``."""
        self._metric(name, "counter", labels).inc(value)

    def observe(self, name: str, labels: dict[str, str], seconds: float) -> None:
        """Count one observation of ``seconds`` in the histogram ``name{labels}``."""
        self._metric(name, "histogram", labels).observe(seconds)

    def counter(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of the counter ``name{labels}`` (0 when never incremented)."""
        sample = name if name.endswith("_total") else f"{name}_total"
        return self.registry.get_sample_value(sample, labels or {}) or 0.0

    def render(self, gauges: list[tuple[str, dict[str, str], float]]) -> str:
        """Prometheus text (format 0.0.4) of every counter and histogram plus the values read
        at scrape time, ``gauges`` (name, labels, value): a gauge, or a counter when ``name``
        was described as one (a count kept elsewhere, e.g. cache hits)."""
        with self._render_lock:
            self._gauges = list(gauges)
            try:
                return generate_latest(self.registry).decode()
            finally:
                self._gauges = []


class _Gauges:
    """Collector of the scrape-time values handed to :meth:`Metrics.render`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, labels, value in self.metrics._gauges:
            names = sorted(labels)
            family = families.get(name)
            if family is None:
                kind, text = self.metrics._help.get(name, ("gauge", name))
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(name, text, labels=names)
            family.add_metric([labels[k] for k in names], value)
        yield from families.values()
