"""Prometheus metrics of the server, and the ASGI middleware that counts every request.

Exposed at ``GET /metrics``: requests (by path template, method, status), request latency histogram,
images scored, OOD verdicts, errors by status, batch sizes, and where a scoring request's time goes
(``oodforge_stage_seconds`` by stage: ``read`` the body and parse it, ``decode`` bytes to RGB,
``preprocess`` resize and normalise, ``queue`` wait for a batch, ``model`` the forward pass and score of
a batch, ``respond`` build the answer; decode and preprocess are summed over a request's images). Each app has its own registry (tests
create several); with ``PROMETHEUS_MULTIPROC_DIR`` set (several uvicorn workers), ``/metrics``
aggregates every worker through prometheus_client's multiprocess collector.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
STAGES = ("read", "decode", "preprocess", "queue", "model", "respond")


class ServerMetrics:
    """The counters and histograms of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "oodforge_requests", "HTTP requests", ["method", "path", "status"], registry=r
        )
        self.latency = Histogram(
            "oodforge_request_latency_seconds",
            "Request latency",
            ["method", "path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "oodforge_errors", "Responses with status >= 400", ["path", "status"], registry=r
        )
        self.images = Counter("oodforge_images_scored", "Images scored", ["detector"], registry=r)
        self.verdicts = Counter("oodforge_verdicts", "OOD verdicts", ["detector", "verdict"], registry=r)
        self.batch_size = Histogram(
            "oodforge_batch_size",
            "Images per model forward pass",
            ["detector"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "oodforge_stage_seconds",
            "Seconds a scoring request spends per stage (model: per batch)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self._stages = {name: self.stage.labels(name) for name in STAGES}

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (one of :data:`STAGES`)."""
        self._stages[stage].observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (aggregated over worker processes in multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def observe_verdicts(self, detector: str, is_ood: Any) -> None:
        """Count one request's images and their OOD / ID verdicts for ``detector``."""
        n_ood = int(sum(bool(v) for v in is_ood))
        self.images.labels(detector).inc(len(is_ood))
        self.verdicts.labels(detector, "ood").inc(n_ood)
        self.verdicts.labels(detector, "id").inc(len(is_ood) - n_ood)


class MetricsMiddleware:
    """Times and counts every HTTP request, labelled by its route template (``/detectors/{name}``)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on to the app, recording an HTTP request's count, latency and error status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(path, str(status)).inc()
