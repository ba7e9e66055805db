"""A minimal thread-safe Prometheus registry for the scoring service: counters, latency
histograms (seconds) and gauges, rendered in the text exposition format 0.0.4."""

from __future__ import annotations

import threading
from collections import defaultdict

#: upper bounds (seconds) of the latency histogram buckets
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters, histograms and (at render time) gauges; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._hist: dict[tuple[str, tuple], list] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        """Set the ``# HELP`` text and ``# TYPE`` (counter | histogram | gauge) of ``name``."""
        self._help[name] = (kind, text)

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        """Add ``value`` to the counter ``name{labels}``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value

    def observe(self, name: str, labels: dict[str, str], seconds: float) -> None:
        """Count one observation of ``seconds`` in the histogram ``name{labels}``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hist.get(key)
            if h is None:
                h = self._hist[key] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
            for i, edge in enumerate(LATENCY_BUCKETS):
                if seconds <= edge:
                    h[0][i] += 1
            h[1] += seconds
            h[2] += 1

    @staticmethod
    def _fmt(labels: tuple | list) -> str:
        if not labels:
            return ""
        body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                        for k, v in labels)
        return "{" + body + "}"

    def counter(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of the counter ``name{labels}`` (0 when never incremented)."""
        with self._lock:
            return self._counters.get((name, tuple(sorted((labels or {}).items()))), 0.0)

    def render(self, gauges: list[tuple[str, dict[str, str], float]]) -> str:
        """Prometheus text of every counter and histogram plus ``gauges`` (name, labels, value)."""
        lines: list[str] = []
        seen: set[str] = set()

        def head(name: str) -> None:
            if name not in seen and name in self._help:
                kind, text = self._help[name]
                lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
            seen.add(name)

        with self._lock:
            counters = sorted(self._counters.items())
            hists = sorted((k, (list(v[0]), v[1], v[2])) for k, v in self._hist.items())
        for (name, labels), value in counters:
            head(name)
            lines.append(f"{name}{self._fmt(labels)} {value:g}")
        for (name, labels), (buckets, total, count) in hists:
            head(name)
            for edge, n in zip(LATENCY_BUCKETS, buckets, strict=True):
                lines.append(f"{name}_bucket{self._fmt([*labels, ('le', f'{edge:g}')])} {n}")
            lines.append(f"{name}_bucket{self._fmt([*labels, ('le', '+Inf')])} {count}")
            lines.append(f"{name}_sum{self._fmt(labels)} {total:.6f}")
            lines.append(f"{name}_count{self._fmt(labels)} {count}")
        for name, labels, value in gauges:
            head(name)
            lines.append(f"{name}{self._fmt(sorted(labels.items()))} {value:g}")
        return "\n".join(lines) + "\n"
