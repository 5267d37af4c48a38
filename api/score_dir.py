"""Score a folder tree offline: ``python -m api.score_dir DIR --detector PATH --out results.jsonl``.

Every file under ``DIR`` (recursively, hidden files and the output itself left out; ``--ext`` narrows
it) is decoded exactly as the server decodes an upload (:func:`oodforge.images.decode_image` with the
detector's background and the same JPEG draft setting as :meth:`Detector.decode`: every image mode,
EXIF orientation), pre-processed and scored in batches through ``Detector.predict_pixels``. Only the
pixel limit differs: ``--max-pixels`` (default 8192 x 8192) instead of the server's per-request one. Each batch's lines are appended to the output with one ``write`` call, so
a killed run leaves whole batches behind; a second run skips every file already in the output (a torn
last line is cut off first) and scores only the rest, so each file ends up in the output exactly once.

One JSON object per line::

    {"path": "cats/01.jpg", "score": 7.1, "is_ood": false, "label": "3", "confidence": 0.98}
    {"path": "notes.txt", "error": "notes.txt is not a recognised image; ...", "status": 415}

``path`` is relative to ``DIR``; ``label``/``confidence`` are null for detectors without labels. An
unreadable file (not an image, corrupt, truncated, too large, unreadable on disk) gets an ``error``
record with the reason and never stops the run. ``--workers N`` scores the batches in N processes (each
loads the detector once, with ``cores / N`` torch threads); the main process writes the one output.

At the end a summary: files scored, skipped (already in the output), unreadable (with their reasons),
the OOD fraction, seconds and images/s. Exit status 0, or 1 when the output holds no scored image
(an empty folder, or nothing in it could be decoded); 2 for a wrong ``DIR`` or ``--detector``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from api.detectors import artifact_dir
from oodforge.detector import ArtifactError, Detector
from oodforge.images import ImageError, decode_image
from oodforge.progress import progress

Record = dict[str, Any]
SHOWN_ERRORS = 20  # unreadable files listed in the summary (all of them are in the output)
MAX_PIXELS = 8192 * 8192


# ---------------------------------------------------------------- files


def find_files(root: Path, exclude: Sequence[Path] = (), extensions: Sequence[str] = ()) -> list[str]:
    """Every non-hidden file under ``root`` as a sorted POSIX path relative to it.

    Args:
        root: The folder tree.
        exclude: Files to leave out (the output and its temporary files when they sit inside ``root``).
        extensions: Keep only these suffixes (``["png", ".JPG"]``; case-insensitive); empty keeps all.
    """
    skip = {p.resolve() for p in exclude}
    wanted = {"." + e.lower().lstrip(".") for e in extensions}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder, name)
            if name.startswith(".") or (wanted and path.suffix.lower() not in wanted):
                continue
            if path.resolve() in skip:
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def read_done(out: Path) -> tuple[set[str], int]:
    """The paths already in ``out`` and how many of them were scored (not errors).

    A last line cut off by a kill (no newline, or not JSON) is removed from the file, so that appending
    goes on from the last whole record.
    """
    if not out.exists():
        return set(), 0
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    done, scored = set(), 0
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line in the middle (a concurrent writer?): its file is scored again
        if isinstance(record, dict) and isinstance(record.get("path"), str):
            done.add(record["path"])
            scored += "error" not in record
    return done, scored


def append_records(out: Path, records: list[Record]) -> None:
    """Append ``records`` as JSON lines with a single ``write`` (a kill leaves whole batches)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# ---------------------------------------------------------------- scoring


class Scorer:
    """A loaded detector that turns a batch of files into records."""

    def __init__(self, detector_path: Path, draft: bool = True, max_pixels: int = MAX_PIXELS) -> None:
        """Load the detector (any kind) from an artifact directory."""
        self.detector = Detector.load(detector_path)
        self.draft = self.detector.input_shape[-1] if draft else None  # as Detector.decode
        self.max_pixels = max_pixels

    def decode(self, root: Path, rel: str) -> Image.Image:
        """The file's RGB image, decoded as the server does (:class:`ImageError` / ``OSError`` otherwise)."""
        background = self.detector.spec.input.background
        data = (root / rel).read_bytes()
        return decode_image(data, rel, max_pixels=self.max_pixels, background=background, draft=self.draft)

    def score(self, root: Path, paths: Sequence[str]) -> list[Record]:
        """One record per path, in order: a score, or the reason the file could not be scored."""
        records: list[Record | None] = []
        pixels, rows = [], []
        for rel in paths:
            try:
                pixels.append(self.detector.preprocess(self.decode(root, rel)))
                rows.append(len(records))
                records.append(None)
            except ImageError as err:
                records.append({"path": rel, "error": err.message, "status": err.status})
            except OSError as err:
                records.append({"path": rel, "error": f"{rel} cannot be read ({err.strerror or err})"})
        if pixels:
            prediction = self.detector.predict_pixels(torch.stack(pixels))
            labels, confidences = prediction.label_names(), prediction.confidence_values()
            for k, row in enumerate(rows):
                records[row] = {
                    "path": paths[row],
                    "score": float(prediction.scores[k]),
                    "is_ood": bool(prediction.is_ood[k]),
                    "label": labels[k],
                    "confidence": confidences[k],
                }
        return [r for r in records if r is not None]


_SCORER: Scorer | None = None


def _init_worker(detector_path: Path, draft: bool, max_pixels: int, threads: int) -> None:
    global _SCORER
    torch.set_num_threads(threads)
    _SCORER = Scorer(detector_path, draft, max_pixels)


def _score_in_worker(root: Path, paths: list[str]) -> list[Record]:
    assert _SCORER is not None, "the worker was not initialised"
    return _SCORER.score(root, paths)


# ---------------------------------------------------------------- the run


@dataclass
class Summary:
    """What one run did (``skipped``: files already in the output before it started)."""

    scored: int = 0
    ood: int = 0
    unreadable: int = 0
    skipped: int = 0
    seconds: float = 0.0
    scored_in_output: int = 0
    errors: list[Record] = field(default_factory=list)
    interrupted: bool = False

    def add(self, records: list[Record]) -> None:
        """Count a batch of output records as scored (OOD or not) or unreadable."""
        for record in records:
            if "error" in record:
                self.unreadable += 1
                self.errors.append(record)
            else:
                self.scored += 1
                self.ood += bool(record["is_ood"])

    def text(self, out: Path) -> str:
        """A human-readable report of the run, with the first unreadable files and a resume hint."""
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        fraction = f"{self.ood / self.scored:.1%}" if self.scored else "n/a"
        lines = [
            f"scored {self.scored} images ({self.ood} OOD, fraction {fraction}), skipped {self.skipped} "
            f"already in {out}, unreadable {self.unreadable}; {self.seconds:.1f} s, {rate:.1f} images/s",
        ]
        for record in self.errors[:SHOWN_ERRORS]:
            lines.append(f"  unreadable: {record['path']}: {record['error']}")
        if len(self.errors) > SHOWN_ERRORS:
            lines.append(
                f'  ... and {len(self.errors) - SHOWN_ERRORS} more (the lines with "error" in {out})'
            )
        if self.interrupted:
            lines.append(f"interrupted: run the same command again to score the rest (it resumes from {out})")
        return "\n".join(lines)


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def score_dir(
    root: Path,
    detector_path: Path,
    out: Path,
    *,
    batch_size: int = 64,
    workers: int = 1,
    extensions: Sequence[str] = (),
    draft: bool = True,
    max_pixels: int = MAX_PIXELS,
    show_progress: bool = True,
) -> Summary:
    """Score every file under ``root`` not yet in ``out``, appending one record per file (module docstring)."""
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    done, _ = read_done(out)
    files = find_files(root, exclude=[out], extensions=extensions)
    todo = [f for f in files if f not in done]
    summary = Summary(skipped=len(files) - len(todo))
    bar = progress(total=len(todo), unit="img", desc=f"score {root}", disable=not (show_progress and todo))
    batches = list(_batches(todo, batch_size))
    try:
        if workers <= 1 or len(batches) <= 1:
            scorer = Scorer(detector_path, draft, max_pixels) if batches else None
            for batch in batches:
                assert scorer is not None
                records = scorer.score(root, batch)
                append_records(out, records)
                summary.add(records)
                bar.update(len(batch))
        else:
            init = (detector_path, draft, max_pixels, max(1, (os.cpu_count() or 1) // workers))
            _score_in_pool(root, out, batches, workers, init, summary, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.scored_in_output = read_done(out)[1]
    return summary


def _score_in_pool(
    root: Path,
    out: Path,
    batches: list[list[str]],
    workers: int,
    init: tuple[Any, ...],
    summary: Summary,
    bar: Any,
) -> None:
    context = multiprocessing.get_context("spawn")  # torch is not fork-safe once its threads started
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init) as pool:
        pending: list[Future[list[Record]]] = []
        queue = iter(batches)
        in_flight = 2 * workers  # enough to keep every worker busy, without queueing the whole tree
        try:
            for batch in queue:
                pending.append(pool.submit(_score_in_worker, root, batch))
                if len(pending) >= in_flight:
                    _drain(pending, out, summary, bar, first_only=True)
            _drain(pending, out, summary, bar)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _drain(
    pending: list[Future[list[Record]]], out: Path, summary: Summary, bar: Any, first_only: bool = False
) -> None:
    while pending:
        records = pending.pop(0).result()
        append_records(out, records)
        summary.add(records)
        bar.update(len(records))
        if first_only:
            return


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line of ``python -m api.score_dir``."""
    p = argparse.ArgumentParser(prog="python -m api.score_dir", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder tree of images")
    p.add_argument(
        "--detector", type=Path, required=True, help="detector artifact (or training run) directory"
    )
    p.add_argument("--out", type=Path, required=True, help="JSONL output; an existing one is resumed")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.add_argument("--ext", default="", help="only these extensions, comma-separated (default: every file)")
    p.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help=f"largest width x height ({MAX_PIXELS})"
    )
    p.add_argument(
        "--no-jpeg-draft",
        action="store_true",
        help="decode every JPEG pixel (the server's limits.jpeg_draft=false)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1 or args.max_pixels < 1:
        p.error("--batch-size, --workers and --max-pixels must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Score a folder of images into JSONL and print a summary.

    Returns:
        The exit status: 0 when the output holds scored images, 1 when it holds none, 2 on bad input,
        130 when interrupted.
    """
    args = parse_args(argv)
    if not args.dir.is_dir():
        print(f"{args.dir} is not a directory; pass the folder of images to score", file=sys.stderr)
        return 2
    path = artifact_dir(args.detector)
    if path is None:
        print(
            f"no detector artifact at {args.detector} (expected detector.json there or in its detector/)",
            file=sys.stderr,
        )
        return 2
    try:
        summary = score_dir(
            args.dir,
            path,
            args.out,
            batch_size=args.batch_size,
            workers=args.workers,
            extensions=[e for e in args.ext.split(",") if e.strip()],
            draft=not args.no_jpeg_draft,
            max_pixels=args.max_pixels,
            show_progress=not args.no_progress,
        )
    except ArtifactError as err:
        print(f"cannot load the detector: {err}", file=sys.stderr)
        return 2
    print(summary.text(args.out))
    if summary.interrupted:
        return 130
    return 0 if summary.scored_in_output else 1


if __name__ == "__main__":
    sys.exit(main())
