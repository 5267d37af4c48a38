"""The FastAPI app: ``create_app(settings)`` for programs and tests, module-level ``app`` for uvicorn.

    uvicorn api.app:app --host 127.0.0.1 --port 8000 --workers 2     # settings from OODFORGE_* / YAML

Startup loads every detector once (in a thread) and starts one micro-batcher per detector; ``/readyz``
turns 200 when the default detector is loaded. Client mistakes become 4xx with a message that says
what to do; anything else is logged and answered with a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

import oodforge
from api.batching import MicroBatcher
from api.detectors import DetectorTable, UnknownDetector
from api.images import InputError
from api.metrics import MetricsMiddleware, ServerMetrics
from api.routes import router
from api.settings import ServeSettings, inference_threads, load_settings

log = logging.getLogger("oodforge.api")


def _error(status: int, message: str, request: Request) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
    return JSONResponse({"detail": message}, status_code=status)


async def _input_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, InputError)
    return _error(err.status, err.message, request)


async def _unknown_detector(request: Request, err: Exception) -> JSONResponse:
    return _error(404, str(err.args[0]), request)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    return JSONResponse({"detail": "internal server error; the server log has the details"}, status_code=500)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; detectors load when it starts (lifespan), not here."""
    settings = settings or load_settings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(inference_threads(settings))
        table = await run_in_threadpool(DetectorTable.load, settings)
        if not table.detectors:
            log.error(
                "no detector could be loaded from %s: %s", settings.detectors_dir, table.failed or "empty"
            )
        app.state.table = table
        app.state.batchers = {
            name: MicroBatcher(detector, settings.batching, on_batch=metrics.batch_size.labels(name).observe)
            for name, detector in table.detectors.items()
        }
        for batcher in app.state.batchers.values():
            await batcher.start()
        try:
            yield
        finally:
            for batcher in app.state.batchers.values():
                await batcher.stop()

    app = FastAPI(
        title="oodforge",
        version=oodforge.__version__,
        description="Out-of-distribution verdicts for images: POST them to /score.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(UnknownDetector, _unknown_detector)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    return app


app = create_app()
