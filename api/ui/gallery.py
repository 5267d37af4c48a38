"""The outlier datasets ``/ui`` shows: found by a request's ``dir`` or a detector's provenance, read safely.

A ``dir`` is accepted only when it is an outlier dataset written by synth (``card.json`` +
``metadata.jsonl``, :func:`oodforge.outliers.read_metadata`); its records are cached by the files'
modification times. The only files ever served from it are the images its metadata lists
(``file_name`` of a kept pixel record), resolved and checked to lie inside the dataset directory, so
no request can read any other file.

Example:
    >>> dataset = open_dataset("runs/outliers")
    >>> page = dataset.page(Filters(kept="rejected", source_class="3"), page=1, per_page=48)
    >>> dataset.image_path("px-0000012")
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from api.images import InputError
from oodforge.outliers import CARD_FILE, IMAGES_DIR, METADATA_FILE, read_metadata

Kept = Literal["all", "kept", "rejected"]
CACHE_SIZE = 8
SHOWN_FIELDS = ("id", "pool", "kept", "reason", "source_class", "knn_distance", "seed", "file_name")


@dataclass(frozen=True)
class Filters:
    """Which records a gallery page shows: kept / rejected / all, one source class, one pool."""

    kept: Kept = "all"
    source_class: str | None = None
    pool: str | None = None

    def match(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` passes every filter."""
        if self.kept != "all" and bool(record.get("kept")) != (self.kept == "kept"):
            return False
        if self.source_class is not None and str(record.get("source_class")) != self.source_class:
            return False
        return self.pool is None or record.get("pool") == self.pool


@dataclass
class GalleryDataset:
    """One outlier dataset's card and records, indexed by id."""

    root: Path
    card: dict[str, Any]
    records: list[dict[str, Any]]

    def __post_init__(self) -> None:
        self.by_id = {r["id"]: r for r in self.records}

    def classes(self) -> list[str]:
        """The distinct source classes, as strings, in natural order (numbers numerically)."""
        values = {str(r["source_class"]) for r in self.records if r.get("source_class") is not None}
        return sorted(values, key=_natural)

    def pools(self) -> list[str]:
        """The pools that have records, in file order of first appearance."""
        return list(dict.fromkeys(str(r.get("pool")) for r in self.records))

    def page(self, filters: Filters, page: int, per_page: int) -> dict[str, Any]:
        """One page of the records that pass ``filters``, with totals (``page`` counts from 1)."""
        matching = [r for r in self.records if filters.match(r)]
        pages = max(1, math.ceil(len(matching) / per_page))
        page = min(max(page, 1), pages)
        chosen = matching[(page - 1) * per_page : page * per_page]
        return {
            "total": len(matching),
            "page": page,
            "pages": pages,
            "per_page": per_page,
            "records": [self.view(r) for r in chosen],
        }

    def view(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as the gallery shows it: the main fields, ``has_image``, and the rest under ``extra``."""
        shown = {key: record.get(key) for key in SHOWN_FIELDS}
        shown["has_image"] = self.image_path(record["id"]) is not None
        shown["extra"] = {k: v for k, v in record.items() if k not in SHOWN_FIELDS}
        return shown

    def image_path(self, record_id: str) -> Path | None:
        """The image file of ``record_id`` if its metadata lists one that exists inside the dataset."""
        record = self.by_id.get(record_id)
        name = record.get("file_name") if record else None
        if not isinstance(name, str) or not name.startswith(f"{IMAGES_DIR}/"):
            return None
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def summary(self) -> dict[str, Any]:
        """What the gallery's header shows: the card (without the full config), the classes and pools."""
        card = {k: v for k, v in self.card.items() if k != "config"}
        return {"path": str(self.root), "card": card, "classes": self.classes(), "pools": self.pools()}


def _natural(value: str) -> tuple[int, int, str]:
    number = value.removeprefix("-")
    return (0, int(value), "") if number.isdigit() else (1, 0, value)


_CACHE: dict[tuple[str, int, int, int], GalleryDataset] = {}
_CACHE_LOCK = threading.Lock()  # requests open datasets in worker threads


def _stamp(root: Path) -> tuple[str, int, int, int]:
    meta, card = os.stat(root / METADATA_FILE), os.stat(root / CARD_FILE)
    return (str(root), meta.st_mtime_ns, meta.st_size, card.st_mtime_ns)


def not_a_dataset(directory: str, why: str) -> InputError:
    """The 404 for a ``dir`` that is not an outlier dataset (what was wrong, and what to pass)."""
    return InputError(
        404,
        f"{directory!r} is not an outlier dataset ({why}); pass dir=<a directory written by synth, "
        f"holding {CARD_FILE} and {METADATA_FILE}>",
    )


def open_dataset(directory: str) -> GalleryDataset:
    """The outlier dataset at ``directory`` (relative paths are taken from the server's working directory).

    Raises:
        InputError: 404 when it is not a finished outlier dataset (the message says why).
    """
    if not directory or "\x00" in directory:
        raise not_a_dataset(directory, "no directory given")
    try:
        root = Path(directory).resolve()
        if not (root / CARD_FILE).is_file() or not (root / METADATA_FILE).is_file():
            raise not_a_dataset(directory, f"no {CARD_FILE} and {METADATA_FILE} there")
        key = _stamp(root)
    except OSError as err:  # a name too long, a directory it may not read, ...
        raise not_a_dataset(directory, err.strerror or type(err).__name__) from None
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    try:
        card, records = read_metadata(root)
    except (FileNotFoundError, ValueError) as err:
        raise not_a_dataset(directory, str(err)) from None
    dataset = GalleryDataset(root, card, records)
    with _CACHE_LOCK:
        while len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = dataset
    return dataset


def _values(tree: Any, key: str) -> Iterator[Any]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _values(item, key)


def provenance_datasets(training: dict[str, Any]) -> list[dict[str, Any]]:
    """The outlier datasets a detector's training summary names (every ``outliers`` string in it).

    Each is ``{"dir": ..., "available": bool, "why": str | None}``: whether this server can show it
    (relative paths are the training command's, taken here from the server's working directory).
    """
    found = []
    for value in dict.fromkeys(v for v in _values(training, "outliers") if isinstance(v, str) and v):
        try:
            open_dataset(value)
            found.append({"dir": value, "available": True, "why": None})
        except InputError as err:
            found.append({"dir": value, "available": False, "why": err.message})
    return found
