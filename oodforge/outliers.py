"""The outlier dataset on disk (DESIGN.md §4): written by synth, read by the trainer.

Directory format::

    outliers/
      images/<id>.png           kept pixel-space outliers
      metadata.jsonl            one JSON object per candidate, sorted by id (Hugging Face imagefolder
                                convention): file_name ("images/<id>.png", null without an image), id,
                                pool ("pixel" | "knn" | "sd"), kept, reason, source_class, seed,
                                sampler, knn_distance, ...
      latents.safetensors       "knn" [N, D] outlier embeddings, "sd" [M, C, h, w] SD latents (kept rows,
                                ordered by id; the ids are in the header metadata "knn_ids" / "sd_ids")
      card.json                 counts generated/kept/rejected per pool + what the generator passed in
      preview.png               a grid of kept images
      parts/                    work files: metadata-<shard>.jsonl journals, <shard>-<pool>-<n>.safetensors

Writing and resuming: each :class:`OutlierWriter` (one per process, ``shard`` = its name) appends to its
own journal ``parts/metadata-<shard>.jsonl`` and writes its own part files, so two processes never write
the same file; ids (file names) are the generator's, so a resumed or re-sharded run overwrites, never
duplicates. A PNG is written atomically (temp file + ``os.replace``) *before* its journal line is
appended and fsynced: a record in a journal means its files are complete, and a PNG without a record is
simply redone. A partial last journal line (process killed mid-write) is dropped on resume.
:meth:`OutlierWriter.finalize` (or :func:`merge_shards` then ``finalize``) merges the journals into
``metadata.jsonl``, the parts into ``latents.safetensors`` and writes ``card.json`` last, all atomically.

Example:
    >>> writer = OutlierWriter(Path("outliers"))
    >>> if "px-000001" not in writer.done_ids():
    ...     writer.add_image({"id": "px-000001", "kept": True, "source_class": 3, ...}, image)
    >>> writer.finalize({"generator": "tiny-sd"})
    >>> ds = OutlierDataset.load(Path("outliers"))
    >>> ds.require("knn", width=32).shape, len(ds.images())
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from oodforge.data.base import FileImageSet

FORMAT_VERSION = 1
METADATA_FILE = "metadata.jsonl"
LATENTS_FILE = "latents.safetensors"
CARD_FILE = "card.json"
PREVIEW_FILE = "preview.png"
IMAGES_DIR = "images"
PARTS_DIR = "parts"
LATENT_NDIM = {"knn": 2, "sd": 4}
KEPT = "kept"
HOLDOUT_FRACTION = 0.2
"""Share of the kept pixel outliers that no method trains on: they are the held-out synthetic outliers
that score selection (``export.score: auto``) compares with ID validation images."""

Pool = Literal["pixel", "knn", "sd"]
LatentPool = Literal["knn", "sd"]
POOLS: tuple[str, ...] = get_args(Pool)
LATENT_POOLS: tuple[str, ...] = get_args(LatentPool)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHARD = re.compile(r"[A-Za-z0-9_]+")
_PART = re.compile(r"(?P<shard>[A-Za-z0-9_]+)-(?P<pool>knn|sd)-(?P<n>\d+)\.safetensors")
_JOURNAL = re.compile(r"metadata-(?P<shard>[A-Za-z0-9_]+)\.jsonl")
_RUN_HINT = "re-run the same synth command to resume and finalize it"


# --------------------------------------------------------------------------- files


def is_holdout(record_id: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    """Whether an outlier belongs to the held-out part, decided by the SHA-256 of its id.

    It is a fixed function of the id, so every run, method and process agrees without any shared state.
    """
    digest = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
    return digest < fraction * 2**64


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(record: dict[str, Any]) -> str:
    try:
        return json.dumps(record, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"outlier record {record.get('id')!r} cannot be written as JSON: {err}") from None


def _read_jsonl(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a last line without its newline (a killed write) is ignored.

    With ``repair`` the file is truncated after its last complete line, so that appends start clean.
    Raises ``ValueError`` naming the line when a complete line is not a JSON object with an ``id``.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        os.truncate(path, end)
    records = []
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} line {lineno} is not valid JSON ({err}); delete that line and resume the run "
                "(its candidate will be generated again)"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError(f"{path} line {lineno} is not a JSON object with a string 'id'")
        records.append(record)
    return records


def _dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """First record of every id, sorted by id."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        seen.setdefault(record["id"], record)
    return [seen[i] for i in sorted(seen)]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(_dumps(r) + "\n" for r in records)
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _image_name(record_id: str) -> str:
    return f"{IMAGES_DIR}/{record_id}.png"


def _prepare(record: dict[str, Any], pool: str) -> dict[str, Any]:
    """Validate a record and return it with ``file_name`` first and ``pool``/``kept``/``reason`` filled in."""
    if not isinstance(record, dict):
        raise TypeError(f"an outlier record must be a dict, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise ValueError(
            f"record id {rid!r} must be a non-empty string of letters, digits, '_', '.', '-' (it names files)"
        )
    rec_pool = record.get("pool", pool)
    if rec_pool != pool:
        raise ValueError(f"record {rid!r} has pool {rec_pool!r} but was written to the {pool!r} pool")
    kept = record.get("kept")
    if not isinstance(kept, bool):
        raise ValueError(f"record {rid!r} needs 'kept': true or false, got {kept!r}")
    file_name = _image_name(rid) if pool == "pixel" and kept else None
    if record.get("file_name", file_name) != file_name:
        raise ValueError(
            f"record {rid!r}: file_name is set by the writer ({file_name!r}), got {record['file_name']!r}"
        )
    reason = record.get("reason", KEPT if kept else "rejected")
    rest = {k: v for k, v in record.items() if k not in ("file_name", "id", "pool", "kept", "reason")}
    return {"file_name": file_name, "id": rid, "pool": pool, "kept": kept, "reason": reason, **rest}


def _parts(root: Path) -> list[tuple[str, str, int, Path]]:
    """``(shard, pool, n, path)`` of every part file, sorted by shard then n."""
    out = []
    for path in (root / PARTS_DIR).glob("*.safetensors"):
        m = _PART.fullmatch(path.name)
        if m:
            out.append((m["shard"], m["pool"], int(m["n"]), path))
    return sorted(out, key=lambda p: (p[0], p[2]))


def _journals(root: Path) -> dict[str, Path]:
    out = {}
    for path in (root / PARTS_DIR).glob("metadata-*.jsonl"):
        m = _JOURNAL.fullmatch(path.name)
        if m:
            out[m["shard"]] = path
    return dict(sorted(out.items()))


def _count(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts = {}
    for pool in POOLS:
        recs = [r for r in records if r.get("pool") == pool]
        kept = sum(1 for r in recs if r.get("kept") is True)
        counts[pool] = {"generated": len(recs), "kept": kept, "rejected": len(recs) - kept}
    return counts


# --------------------------------------------------------------------------- writing


def _merge_records(root: Path, shards: list[str]) -> list[dict[str, Any]]:
    records = _read_jsonl(root / METADATA_FILE)
    for shard in shards:
        journal = root / PARTS_DIR / f"metadata-{shard}.jsonl"
        if not journal.is_file():
            raise FileNotFoundError(
                f"{journal} does not exist: shard {shard!r} wrote nothing; pass only the shards that ran (with "
                "several machines, the output directory must be one that every machine sees, e.g. NFS)"
            )
        records += _read_jsonl(journal)
    records = _dedupe(records)
    _write_jsonl(root / METADATA_FILE, records)
    return records


def merge_shards(root: Path, shards: list[str]) -> None:
    """Merge the journals of ``shards`` (and any existing ``metadata.jsonl``) into ``metadata.jsonl``.

    For multi-process generation: every process writes with ``OutlierWriter(root, shard=str(rank))``;
    after all have finished, one process calls ``merge_shards(root, [...])`` and then
    :meth:`OutlierWriter.finalize`. Records are de-duplicated by id (the first one is kept: the existing
    ``metadata.jsonl``, then the shards in the given order) and sorted by id.

    Raises:
        FileNotFoundError: a named shard has no journal.
    """
    _merge_records(Path(root), [str(s) for s in shards])


class OutlierWriter:
    """Appends outliers to a dataset directory, resuming from what is already on disk.

    Args:
        root: the dataset directory (created if needed).
        shard: this process's name (letters, digits, ``_``); each shard writes only its own journal
            ``parts/metadata-<shard>.jsonl`` and part files ``parts/<shard>-<pool>-<n>.safetensors``.
    """

    def __init__(self, root: Path, shard: str = "0") -> None:
        shard = str(shard)
        if not _SHARD.fullmatch(shard):
            raise ValueError(f"shard name {shard!r} must be letters, digits or '_' (e.g. the process index)")
        self.root, self.shard = Path(root), shard
        (self.root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / PARTS_DIR).mkdir(exist_ok=True)
        self.journal = self.root / PARTS_DIR / f"metadata-{shard}.jsonl"
        done = {r["id"] for r in _read_jsonl(self.journal, repair=True)}
        done |= {r["id"] for r in _read_jsonl(self.root / METADATA_FILE)}
        for other, path in _journals(self.root).items():
            if other != shard:  # another process may be appending: read, never repair
                done |= {r["id"] for r in _read_jsonl(path)}
        self._done = done
        own = [n for s, pool, n, _ in _parts(self.root) if s == shard]
        self._next_part = max(own, default=-1) + 1

    def done_ids(self) -> set[str]:
        """Ids already recorded (kept or rejected) in this directory: skip them when resuming."""
        return set(self._done)

    def records(self) -> list[dict[str, Any]]:
        """The records this shard has written so far (its journal), in write order."""
        return _read_jsonl(self.journal)

    def _append(self, records: list[dict[str, Any]]) -> None:
        text = "".join(_dumps(r) + "\n" for r in records)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self._done.update(r["id"] for r in records)

    def add_image(self, record: dict[str, Any], image: Image.Image | None) -> bool:
        """Record one pixel-pool candidate; ``image`` is written to ``images/<id>.png`` only when kept.

        Returns:
            False (and writes nothing) if the id is already done, True otherwise.

        Raises:
            ValueError: a kept record without an image, a rejected one with an image, or a bad record.
        """
        return self.add_images([record], [image]) == 1

    def add_images(self, records: list[dict[str, Any]], images: list[Image.Image | None]) -> int:
        """Record pixel-pool candidates: like :meth:`add_image` for each, with one journal write for all.

        Every kept image's PNG is written (atomically) before the batch's journal lines are appended, so
        a record on disk still means its file is complete.

        Returns:
            The number of new records written (ids already done are skipped).
        """
        if len(records) != len(images):
            raise ValueError(
                f"{len(records)} records for {len(images)} images; pass one image (or None) each"
            )
        new, seen = [], set()
        for record, image in zip(records, images, strict=True):
            rec = _prepare(record, "pixel")
            if rec["id"] in self._done or rec["id"] in seen:
                continue
            seen.add(rec["id"])
            if rec["kept"] != (image is not None):
                raise ValueError(
                    f"record {rec['id']!r}: pass the image for a kept pixel outlier and None for a rejected one"
                )
            if image is not None and not isinstance(image, Image.Image):
                raise TypeError(
                    f"record {rec['id']!r}: image must be a PIL image, got {type(image).__name__}"
                )
            new.append((rec, image))
        for rec, image in new:
            if image is not None:
                _atomic_write(self.root / rec["file_name"], lambda tmp, im=image: im.save(tmp, format="PNG"))
        if new:
            self._append([rec for rec, _ in new])
        return len(new)

    def add_latents(
        self, pool: LatentPool, ids: list[str], tensors: torch.Tensor, records: list[dict[str, Any]]
    ) -> int:
        """Record candidates of a latent pool: rows of ``tensors`` are the kept ones, ``records`` all of them.

        ``tensors[i]`` belongs to ``ids[i]``; the ids must be exactly those of the kept ``records``
        (rejected candidates have a record but no row). Ids already done are skipped; the rest go to a new
        part file (written atomically) and then to the journal.

        Args:
            pool: ``"knn"`` (rows ``[D]``) or ``"sd"`` (rows ``[C, h, w]``).
            ids: ids of the rows of ``tensors``.
            tensors: ``[len(ids), ...]`` kept outliers.
            records: one record per candidate of this batch, kept or rejected.

        Returns:
            The number of new records written.
        """
        if pool not in LATENT_POOLS:
            raise ValueError(f"latent pool must be one of {LATENT_POOLS}, got {pool!r}")
        if not isinstance(tensors, torch.Tensor) or tensors.ndim != LATENT_NDIM[pool]:
            raise ValueError(
                f"{pool!r} outliers must be a {LATENT_NDIM[pool]}-D tensor, got "
                f"{getattr(tensors, 'shape', type(tensors).__name__)}"
            )
        if len(ids) != len(tensors):
            raise ValueError(f"{len(ids)} ids for {len(tensors)} {pool!r} tensor rows; pass one id per row")
        recs = [_prepare(r, pool) for r in records]
        rec_ids = [r["id"] for r in recs]
        if len(set(rec_ids)) != len(rec_ids) or len(set(ids)) != len(ids):
            raise ValueError(f"duplicate ids in one add_latents({pool!r}) call")
        kept = {r["id"] for r in recs if r["kept"]}
        if set(ids) != kept:
            raise ValueError(
                f"add_latents({pool!r}): the tensor ids must be exactly the kept records' ids; "
                f"rows without a kept record: {sorted(set(ids) - kept)[:5]}, "
                f"kept records without a row: {sorted(kept - set(ids))[:5]}"
            )
        rows = [i for i, rid in enumerate(ids) if rid not in self._done]
        new = [r for r in recs if r["id"] not in self._done]
        if rows:
            part = self.root / PARTS_DIR / f"{self.shard}-{pool}-{self._next_part:05d}.safetensors"
            data = {pool: tensors.detach()[rows].cpu().contiguous()}
            meta = {"ids": json.dumps([ids[i] for i in rows]), "pool": pool, "shard": self.shard}
            _atomic_write(part, lambda tmp: save_file(data, str(tmp), metadata=meta))
            self._next_part += 1
        if new:
            self._append(new)
        return len(new)

    def finalize(self, card: dict[str, Any], preview_size: int = 8) -> dict[str, Any]:
        """Merge everything on disk into the final files; call once all writers of ``root`` have finished.

        Merges every journal under ``parts/`` into ``metadata.jsonl`` (see :func:`merge_shards`), the kept
        latent rows into ``latents.safetensors`` (ordered by id, duplicate ids dropped), removes PNGs without
        a kept record and stale temp files, writes ``preview.png`` (up to ``preview_size²`` kept images,
        ``preview_size`` per row) and finally ``card.json`` = ``card`` + ``format_version`` + ``counts``
        (generated/kept/rejected per pool, from the metadata) + ``latent_shapes``. All writes are atomic.

        Returns:
            The card as written.
        """
        records = _merge_records(self.root, list(_journals(self.root)))
        latents = self._merge_latents(records)
        self._clean_images(records)
        kept_images = [self.root / r["file_name"] for r in records if r["pool"] == "pixel" and r["kept"]]
        preview = self.root / PREVIEW_FILE
        if kept_images:
            grid = preview_grid(kept_images[: preview_size * preview_size], preview_size)
            _atomic_write(preview, lambda tmp: grid.save(tmp, format="PNG"))
        else:
            preview.unlink(missing_ok=True)
        out = {
            **card,
            "format_version": FORMAT_VERSION,
            "counts": _count(records),
            "latent_shapes": {pool: list(t.shape) for pool, t in latents.items()},
            "preview": PREVIEW_FILE if kept_images else None,
        }
        text = json.dumps(out, indent=2, default=_json_default)
        _atomic_write(self.root / CARD_FILE, lambda tmp: tmp.write_text(text))
        return out

    def _merge_latents(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: dict[str, dict[str, torch.Tensor]] = {pool: {} for pool in LATENT_POOLS}
        kept = {pool: {r["id"] for r in records if r["pool"] == pool and r["kept"]} for pool in LATENT_POOLS}
        for _, pool, _, path in _parts(self.root):  # later parts win (a part whose journal write was lost)
            try:
                with safe_open(str(path), framework="pt") as f:
                    part_ids = json.loads(f.metadata()["ids"])
                    tensor = f.get_tensor(pool)
            except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
                raise ValueError(
                    f"part file {path} is unreadable ({err}); delete it and {_RUN_HINT}"
                ) from None
            if len(part_ids) != len(tensor):
                raise ValueError(
                    f"part file {path} has {len(tensor)} rows but {len(part_ids)} ids; delete it"
                )
            for rid, row in zip(part_ids, tensor, strict=True):
                if rid in kept[pool]:
                    rows[pool][rid] = row
        latents, meta = {}, {"format": "pt"}
        for pool in LATENT_POOLS:
            missing = kept[pool] - set(rows[pool])
            if missing:
                raise ValueError(
                    f"{len(missing)} kept {pool!r} records have no tensor in {self.root / PARTS_DIR} "
                    f"(e.g. {sorted(missing)[:3]}); part files were removed — regenerate in a fresh directory"
                )
            ids = sorted(rows[pool])
            meta[f"{pool}_ids"] = json.dumps(ids)
            if ids:
                shapes = {tuple(rows[pool][i].shape) for i in ids}
                if len(shapes) > 1:
                    raise ValueError(
                        f"{pool!r} outliers have different shapes {sorted(shapes)}; one run per dataset"
                    )
                latents[pool] = torch.stack([rows[pool][i] for i in ids]).contiguous()
        _atomic_write(self.root / LATENTS_FILE, lambda tmp: save_file(latents, str(tmp), metadata=meta))
        return latents

    def _clean_images(self, records: list[dict[str, Any]]) -> None:
        wanted = {r["file_name"] for r in records if r["pool"] == "pixel" and r["kept"]}
        for path in (self.root / IMAGES_DIR).iterdir():
            name = f"{IMAGES_DIR}/{path.name}"
            if path.is_file() and name not in wanted:  # orphan PNG (no record) or a killed write's temp file
                path.unlink()
        for path in (self.root / PARTS_DIR).glob(".*.tmp"):
            path.unlink()
        missing = [w for w in wanted if not (self.root / w).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} kept pixel records have no image (e.g. {sorted(missing)[:3]}); "
                "images/ was modified — regenerate in a fresh directory"
            )


def preview_grid(paths: list[Path], per_row: int) -> Image.Image:
    """Tile images (resized to the first one's size) into rows of ``per_row``."""
    with Image.open(paths[0]) as first:
        w, h = first.size
    cols = min(per_row, len(paths))
    grid = Image.new("RGB", (cols * w, math.ceil(len(paths) / cols) * h))
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


# --------------------------------------------------------------------------- reading


def read_metadata(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``card.json`` and every record of ``metadata.jsonl`` of a finished dataset (no latents, no images).

    The cheap part of :meth:`OutlierDataset.load`, for readers that only show the records (``/ui``).

    Raises:
        FileNotFoundError: the directory, its card or its metadata is missing (the message says what to run).
        ValueError: the card or the metadata is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"outlier dataset {root} does not exist; generate it with the synth stage")
    card_file = root / CARD_FILE
    if not card_file.is_file():
        if _journals(root):
            raise FileNotFoundError(
                f"{card_file} is missing: generation of {root} did not finish; {_RUN_HINT}"
            )
        raise FileNotFoundError(f"{card_file} is missing: {root} is not an outlier dataset written by synth")
    try:
        card = json.loads(card_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{card_file} is not valid JSON ({err}); {_RUN_HINT}") from None
    if not isinstance(card, dict):
        raise ValueError(f"{card_file} must hold a JSON object; {_RUN_HINT}")
    if card.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(
            f"{card_file} has format_version {card['format_version']}; upgrade oodforge to read it"
        )
    meta_file = root / METADATA_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} is missing; {_RUN_HINT}")
    data = meta_file.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ValueError(f"{meta_file} ends with a partial line (the copy is incomplete); {_RUN_HINT}")
    records = _read_jsonl(meta_file)
    return card, records


@dataclass
class OutlierDataset:
    """A finished outlier dataset: metadata records, card, latent pools and kept images.

    Attributes:
        root: the directory.
        records: every candidate's record (kept and rejected), sorted by id.
        card: the content of ``card.json``.
        knn: ``[N, D]`` kept outlier embeddings, or None when the pool is absent.
        sd: ``[M, C, h, w]`` kept SD latents, or None when the pool is absent.
        knn_ids: ids of the rows of ``knn`` (sorted).
        sd_ids: ids of the rows of ``sd`` (sorted).
    """

    root: Path
    records: list[dict[str, Any]]
    card: dict[str, Any]
    knn: torch.Tensor | None
    sd: torch.Tensor | None
    knn_ids: list[str]
    sd_ids: list[str]

    @classmethod
    def load(cls, root: Path) -> OutlierDataset:
        """Read a dataset directory written by :class:`OutlierWriter`.

        Raises:
            FileNotFoundError: the directory or one of its files is missing (the message says which and
                what to run).
            ValueError: a file is malformed or the files disagree with each other.
        """
        root = Path(root)
        card, records = read_metadata(root)
        meta_file = root / METADATA_FILE
        latents, ids = _load_latents(root, records)
        for pool in LATENT_POOLS:
            kept = sorted(r["id"] for r in records if r.get("pool") == pool and r.get("kept") is True)
            if kept != ids[pool]:
                raise ValueError(
                    f"{root / LATENTS_FILE} has {len(ids[pool])} {pool!r} rows but {meta_file} has {len(kept)} "
                    f"kept {pool!r} records with other ids; the files are from different runs — {_RUN_HINT}"
                )
        ds = cls(root, records, card, latents.get("knn"), latents.get("sd"), ids["knn"], ids["sd"])
        missing = [p for p in ds._image_paths() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} kept images are missing, e.g. {missing[0]}; {_RUN_HINT}")
        return ds

    def _image_paths(self, part: Literal["all", "train", "holdout"] = "all") -> list[Path]:
        kept = [r for r in self.records if r.get("pool") == "pixel" and r.get("kept")]
        if part != "all":
            kept = [r for r in kept if is_holdout(r["id"]) == (part == "holdout")]
        return [self.root / r["file_name"] for r in kept]

    def kept(self, pool: Pool) -> list[dict[str, Any]]:
        """Records of the kept outliers of ``pool`` (in row order for the latent pools)."""
        return [r for r in self.records if r.get("pool") == pool and r.get("kept") is True]

    def images(self, part: Literal["all", "train", "holdout"] = "all") -> FileImageSet:
        """The kept pixel-space outliers as an image set with label -1.

        Args:
            part: ``train`` (what methods train on), ``holdout`` (the :func:`is_holdout` share, kept for
                score selection) or ``all``.

        Raises:
            ValueError: the dataset has no kept pixel outliers (in that part).
        """
        paths = self._image_paths(part)
        if not paths:
            what = "" if part == "all" else f" in its {part} part"
            raise ValueError(
                f"outlier dataset {self.root} has no kept pixel outliers{what} (counts: "
                f"{self.card.get('counts')}); generate more images with synth or turn off what uses them"
            )
        return FileImageSet(f"outliers-{part}", paths, np.full(len(paths), -1, dtype=np.int64))

    def require(self, pool: str, width: int | None = None) -> torch.Tensor:
        """The tensor of a latent pool, checked to be present, non-empty and ``width`` wide (dim 1).

        Raises:
            ValueError: unknown pool, absent/empty pool, or a width other than ``width``.
        """
        if pool not in LATENT_POOLS:
            hint = "; pixel outliers are images: use .images()" if pool == "pixel" else ""
            raise ValueError(f"latent pool must be one of {LATENT_POOLS}, got {pool!r}{hint}")
        tensor = getattr(self, pool)
        if tensor is None or len(tensor) == 0:
            raise ValueError(
                f"outlier dataset {self.root} has no kept {pool!r} outliers "
                f"(counts: {self.card.get('counts', {}).get(pool)}); generate them with synth "
                f"or turn off the training term that uses them"
            )
        if width is not None and tensor.shape[1] != width:
            raise ValueError(
                f"{pool!r} outliers in {self.root} have width {tensor.shape[1]} (shape {tuple(tensor.shape)}) "
                f"but {width} is expected; regenerate them with the teacher / SD model used for training"
            )
        return tensor


def _load_latents(
    root: Path, records: list[dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    path = root / LATENTS_FILE
    ids: dict[str, list[str]] = {pool: [] for pool in LATENT_POOLS}
    if not path.is_file():
        if any(r.get("pool") in LATENT_POOLS and r.get("kept") is True for r in records):
            raise FileNotFoundError(
                f"{path} is missing but {root / METADATA_FILE} lists kept latents; {_RUN_HINT}"
            )
        return {}, ids
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        for pool in LATENT_POOLS:
            ids[pool] = json.loads(meta.get(f"{pool}_ids", "[]"))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable outlier latents file ({err}); {_RUN_HINT}") from None
    for pool in LATENT_POOLS:
        n = len(tensors[pool]) if pool in tensors else 0
        if n != len(ids[pool]):
            raise ValueError(
                f"{path}: {pool!r} has {n} rows but {len(ids[pool])} ids in its header; {_RUN_HINT}"
            )
    return tensors, ids
