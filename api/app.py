"""The FastAPI app: ``create_app(settings)`` for programs and tests, module-level ``app`` for uvicorn.

    python -m api --host 127.0.0.1 --port 8000          # uvicorn with settings.workers worker processes
    uvicorn api.app:app --workers 2                     # or uvicorn itself (set OODFORGE_WORKERS=2 too)

Startup resolves how this worker uses the cores (:func:`api.settings.resources`: workers, torch threads,
decode processes; logged, and shown by ``GET /detectors``), loads every detector once (in a thread),
starts one micro-batcher per detector and the decode processes (or threads); ``/readyz`` turns 200 when
the default detector is loaded. Client mistakes
become 4xx with a message that says what to do — ``{"detail": "..."}`` on the oodforge API,
``{"error": "..."}`` under ``/v2`` (the Open Inference Protocol's form); anything else is logged and
answered with a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import oodforge
from api import ui, v2
from api.batching import MicroBatcher
from api.detectors import DetectorTable, UnknownDetector
from api.images import InputError
from api.metrics import MetricsMiddleware, ServerMetrics
from api.pipeline import Decoder
from api.routes import router
from api.settings import ServeSettings, load_settings, resources

log = logging.getLogger("oodforge.api")


def _is_v2(request: Request) -> bool:
    path = request.url.path
    return path == v2.router.prefix or path.startswith(v2.router.prefix + "/")


def _error(
    status: int, message: str, request: Request, headers: dict[str, str] | None = None
) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
    key = "error" if _is_v2(request) else "detail"
    return JSONResponse({key: message}, status_code=status, headers=headers)


async def _input_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, InputError)
    return _error(err.status, err.message, request)


async def _unknown_detector(request: Request, err: Exception) -> JSONResponse:
    return _error(404, str(err.args[0]), request)


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, StarletteHTTPException)
    if not _is_v2(request):
        return await http_exception_handler(request, err)
    message = str(err.detail)
    if err.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = (
            f"{message}: {request.method} {request.url.path}; this server implements GET /v2, "
            "/v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{version}][/ready] and "
            "POST /v2/models/{name}[/versions/{version}]/infer"
        )
    return _error(err.status_code, message, request, headers=getattr(err, "headers", None))


async def _validation_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, RequestValidationError)
    if not _is_v2(request):
        return await request_validation_exception_handler(request, err)
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:3])
    return _error(422, f"the request does not match the protocol ({where})", request)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
    key = "error" if _is_v2(request) else "detail"
    return JSONResponse({key: "internal server error; the server log has the details"}, status_code=500)


def _log_to_stderr() -> None:
    """Make the ``oodforge.api`` INFO lines (start-up settings, loaded detectors) visible beside uvicorn's."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; detectors load when it starts (lifespan), not here."""
    settings = settings or load_settings()
    _log_to_stderr()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        use = resources(settings)
        torch.set_num_threads(use.torch_threads)
        log.info(
            "serving with %d worker(s) on %d core(s): %d torch thread(s) per worker, %s",
            use.workers,
            use.cores,
            use.torch_threads,
            f"{use.decode_processes} decode process(es) per worker"
            if use.decode_processes
            else f"decoding in {use.decode_threads} thread(s) of the worker",
        )
        app.state.resources = use
        table = await run_in_threadpool(DetectorTable.load, settings)
        if not table.detectors:
            log.error(
                "no detector could be loaded from %s: %s", settings.detectors_dir, table.failed or "empty"
            )
        app.state.table = table
        app.state.decoder = Decoder(
            use.decode_threads, use.decode_processes, metrics, settings.decode_inline_bytes
        )
        await app.state.decoder.start()
        app.state.batchers = {
            name: MicroBatcher(
                detector,
                settings.batching,
                on_batch=metrics.batch_size.labels(name).observe,
                on_stage=metrics.observe_stage,
            )
            for name, detector in table.detectors.items()
        }
        for batcher in app.state.batchers.values():
            await batcher.start()
        try:
            yield
        finally:
            for batcher in app.state.batchers.values():
                await batcher.stop()
            app.state.decoder.close()

    app = FastAPI(
        title="oodforge",
        version=oodforge.__version__,
        description="Out-of-distribution verdicts for images: POST them to /score, or to "
        "/v2/models/{name}/infer (Open Inference Protocol v2, e.g. tritonclient.http).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(UnknownDetector, _unknown_detector)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    app.include_router(v2.router)
    ui.install(app)
    return app


app = create_app()
