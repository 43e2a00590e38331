"""Prometheus metrics under TF Serving's names (TF metric paths with '/' turned into ':').

A small thread-safe registry of our own: prometheus_client would rename counters to `..._total`, and the
names must be the ones TF Serving's exporter prints. Every request metric also carries `model_version`,
which TF Serving lacks.
"""

from __future__ import annotations

import bisect
import threading


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else format(float(v), ".10g")


class _Metric:
    def __init__(self, name: str, help_: str, kind: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.kind, self.labels = name, help_, kind, labels
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], object] = {}


class Counter(_Metric):
    def __init__(self, name: str, help_: str, labels: tuple[str, ...]) -> None:
        super().__init__(name, help_, "counter", labels)

    def inc(self, *values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    def __init__(self, name: str, help_: str, labels: tuple[str, ...]) -> None:
        super().__init__(name, help_, labels)
        self.kind = "gauge"

    def set(self, *values: str, value: float) -> None:
        with self._lock:
            self._values[values] = value

    def remove(self, *values: str) -> None:
        with self._lock:
            self._values.pop(values, None)


class Histogram(_Metric):
    def __init__(self, name: str, help_: str, labels: tuple[str, ...], buckets: list[float]) -> None:
        super().__init__(name, help_, "histogram", labels)
        self.buckets = buckets

    def observe(self, *values: str, value: float) -> None:
        with self._lock:
            entry = self._values.get(values)
            if entry is None:
                entry = self._values[values] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            entry[0][bisect.bisect_left(self.buckets, value)] += 1
            entry[1] += value
            entry[2] += 1

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, ([*v[0]], v[1], v[2])) for k, v in self._values.items())
        lines = []
        for key, (counts, total, n) in items:
            cumulative = 0
            for bound, c in zip([*self.buckets, float("inf")], counts, strict=True):
                cumulative += c
                le = "+Inf" if bound == float("inf") else _num(bound)
                le_label = 'le="' + le + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labels, key, le_label)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {n}")
        return lines


def exponential(start: float, factor: float, count: int) -> list[float]:
    return [start * factor**i for i in range(count)]


class Metrics:
    """The metrics the embedded server exports; names follow tensorflow_model_server's."""

    def __init__(self) -> None:
        # Latency in microseconds, buckets as TF Serving's request_latency (10 µs × 1.8^i, 33 buckets).
        us = exponential(10, 1.8, 33)
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ("model_name", "model_version", "status"))
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency", "Distribution of wall time (in microseconds) for "
            "Tensorflow Serving request.", ("model_name", "model_version", "API", "entrypoint"), us)
        self.runtime_latency = Histogram(
            ":tensorflow:serving:runtime_latency", "Distribution of wall time (in microseconds) for "
            "Tensorflow runtime.", ("model_name", "model_version", "API", "runtime"), us)
        self.input_batch_size = Histogram(
            ":tensorflow:serving:batching_session:input_batch_size", "Tracks the batch size distribution on "
            "the inputs by model.", ("model_name", "model_version"), exponential(1, 2, 14))
        self.processed_batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size", "Tracks the batch size distribution "
            "on processing by model.", ("model_name", "model_version"), exponential(1, 2, 14))
        self.padding_size = Histogram(
            ":tensorflow:serving:batching_session:padding_size", "Tracks the padding size distribution on "
            "batches by model.", ("model_name", "model_version"), exponential(1, 2, 14))
        self.queuing_latency = Histogram(
            ":tensorflow:serving:batching_session:queuing_latency", "Tracks the latency to start processing "
            "a batch (in microseconds).", ("model_name", "model_version"), us)
        self.load_attempt_count = Counter(
            ":tensorflow:cc:saved_model:load_attempt_count", "The number of times a SavedModel was "
            "successfully loaded.", ("model_path", "status"))
        self.load_latency = Histogram(
            ":tensorflow:serving:model_load_latency", "Distribution of wall time (in microseconds) to load "
            "a model version (including warm-up).", ("model_name", "model_version"), us)
        self.model_state = Gauge(
            ":tensorflow:serving:model_version_state", "1 for the state each model version is in "
            "(embedded server only).", ("model_name", "model_version", "state"))
        self._all = [self.request_count, self.request_latency, self.runtime_latency, self.input_batch_size,
                     self.processed_batch_size, self.padding_size, self.queuing_latency,
                     self.load_attempt_count, self.load_latency, self.model_state]

    def render(self) -> str:
        out = []
        for m in self._all:
            lines = m.render()
            if lines:
                out.append(f"# HELP {m.name} {m.help}")
                out.append(f"# TYPE {m.name} {m.kind}")
                out.extend(lines)
        return "\n".join(out) + "\n"

    def observe_batch(self, servable: object, sizes: list[int], padded: int, delays: list[float]) -> None:
        name, version = servable.name, str(servable.version)
        total = sum(sizes)
        for s in sizes:
            self.input_batch_size.observe(name, version, value=s)
        self.processed_batch_size.observe(name, version, value=padded)
        if padded > total:
            self.padding_size.observe(name, version, value=padded - total)
        for d in delays:
            self.queuing_latency.observe(name, version, value=d * 1e6)
