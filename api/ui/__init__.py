"""``/ui``: a page to look at the served detectors and their outlier datasets (plain HTML + JS, no build).

Pages (static files of this package, holding no data, open like ``/docs``):

- ``GET /ui``: pick a detector, read its card, drop images: each one is posted to ``POST /score`` (the
  API itself, so uploads get exactly its decoding, limits and errors) and drawn on the histogram of the
  ID scores its threshold was calibrated on.
- ``GET /ui/outliers?dir=DIR``: a gallery of an outlier dataset, paged, filtered by kept / rejected,
  source class and pool; without ``dir`` it lists the datasets the detectors' provenance names.

Data endpoints (``/ui/api/...``) need the API key exactly as the API does (:mod:`api.auth`); the page
asks for the key when the server answers 401 and sends it as ``Authorization: Bearer``, also for the
gallery's images (fetched, not linked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api.auth import require_api_key
from api.images import InputError
from api.routes import detector_info
from api.ui.gallery import Filters, Kept, open_dataset, provenance_datasets

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/ui": "index.html", "/ui/outliers": "outliers.html"}
MAX_PER_PAGE = 200
NO_HISTOGRAM = (
    "no histogram in this artifact: it was exported before detector.json kept the calibration scores' "
    "histogram; re-export the detector (trainer/train.py) to get one"
)

router = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/ui/api", dependencies=[Depends(require_api_key)], tags=["ui"])


def _page(file: str) -> Any:
    async def serve() -> FileResponse:
        return FileResponse(STATIC / file, media_type="text/html", headers={"Cache-Control": "no-cache"})

    serve.__doc__ = f"The page {file} (static; its data comes from /ui/api)."
    return serve


for _path, _file in PAGES.items():
    router.add_api_route(_path, _page(_file), methods=["GET"])


@api.get("/detectors/{name}")
async def ui_detector(request: Request, name: str) -> dict[str, Any]:
    """The detector card: ``GET /detectors/{name}`` plus pre-processing, provenance, histogram, datasets."""
    table = request.app.state.table
    name, detector = table.get(name)
    spec = detector.spec
    histogram = spec.calibration.histogram
    datasets = await run_in_threadpool(provenance_datasets, spec.provenance.training)
    return {
        "info": detector_info(name, detector, table.default).model_dump(mode="json"),
        "preprocess": spec.preprocess.model_dump(mode="json"),
        "provenance": spec.provenance.model_dump(mode="json"),
        "histogram": histogram.model_dump() if histogram else None,
        "no_histogram": None if histogram else NO_HISTOGRAM,
        "outliers": datasets,
    }


@api.get("/datasets")
async def ui_datasets(request: Request) -> list[dict[str, Any]]:
    """The outlier datasets named in any served detector's provenance, with the detectors naming them."""
    named: dict[str, dict[str, Any]] = {}
    for name, detector in sorted(request.app.state.table.detectors.items()):
        for found in await run_in_threadpool(provenance_datasets, detector.spec.provenance.training):
            named.setdefault(found["dir"], {**found, "detectors": []})["detectors"].append(name)
    return list(named.values())


@api.get("/outliers")
async def ui_outliers(
    directory: Annotated[
        str, Query(alias="dir", description="an outlier dataset directory (card.json + metadata.jsonl)")
    ],
    kept: Kept = "all",
    source_class: str | None = None,
    pool: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = 48,
) -> dict[str, Any]:
    """One page of a dataset's records (each with its filter decision and reason) and the dataset's card."""
    dataset = await run_in_threadpool(open_dataset, directory)
    filters = Filters(kept=kept, source_class=source_class or None, pool=pool or None)
    return {"dir": directory, **dataset.summary(), **dataset.page(filters, page, per_page)}


@api.get("/outliers/image")
async def ui_outlier_image(
    directory: Annotated[str, Query(alias="dir", description="the outlier dataset directory")],
    record_id: Annotated[str, Query(alias="id", description="the record id (metadata.jsonl)")],
) -> FileResponse:
    """The image of one record: only a file its metadata lists, inside the dataset directory."""
    dataset = await run_in_threadpool(open_dataset, directory)
    path = dataset.image_path(record_id)
    if path is None:
        known = record_id in dataset.by_id
        why = "this record has no image (rejected, or a latent outlier)" if known else "no such record"
        raise InputError(404, f"no image for record {record_id!r} in {directory!r}: {why}")
    return FileResponse(path, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})


router.include_router(api)


def install(app: FastAPI) -> None:
    """Add the ``/ui`` pages, their data endpoints and static files to ``app``."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
