"""``python -m synth generate``: synthesise an outlier dataset (DESIGN.md §2, §5).

1. embed the ID train split with the text-aligned teacher (corrupt images are skipped, counted, named);
2. per class, kNN boundary sampling on the normalised embeddings, ID-near filtering, rescaling to
   ‖T(y)‖ -> the ``knn`` pool;
3. SD decoding of those vectors by token substitution -> the ``sd`` latent pool and decoded images;
4. the teacher embeds the images; the ID-near filter keeps the pixel outliers.

Resumable (ids and seeds are a function of the candidate index; done ids are skipped) and shardable:
under ``accelerate launch`` each process takes every ``num_processes``-th candidate and the main
process merges the shards once every process is done. With several machines (``--num_machines``) the
index is the global rank and ``--out`` must be one directory that every machine sees (a shared
filesystem); the result depends on the number of processes, not on how they are placed on machines.
"""

from __future__ import annotations

import logging
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from oodforge.artifacts import library_versions
from oodforge.config import StrictModel
from oodforge.data import DataConfig, ImageSet, load_benchmark
from oodforge.detector import ClassifierDetector
from oodforge.outliers import OutlierWriter, merge_shards
from oodforge.progress import progress
from synth.background import Background
from synth.filter import filter_near, id_threshold
from synth.generator import Generator, GeneratorConfig, to_images
from synth.reference import ReferenceConfig, make_reference
from synth.sampler import SamplerParams, boundary_sample, rescale

log = logging.getLogger("synth.generate")
SHARD_WAIT = timedelta(hours=24)
"""How long the first rank to finish waits for the others before the merge (torch's default is 30 min,
less than the spread between ranks of a long multi-machine run)."""


class FilterConfig(StrictModel):
    """The ID-near filter: neighbour rank ``k`` and the ``quantile`` of ID kNN distances that sets τ_ID."""

    k: int = Field(50, ge=1)
    quantile: float = Field(0.95, gt=0, lt=1)


class CountsConfig(StrictModel):
    """How many outliers to make: knn samples per class, kept pixel outliers, and the decoding limits."""

    knn_per_class: int = Field(
        200, ge=1, description="boundary samples drawn per class (knn pool candidates)"
    )
    pixel: int = Field(1000, ge=0, description="kept pixel outliers wanted (sd latents: one per candidate)")
    batch_size: int = Field(32, ge=1)
    max_candidates_factor: float = Field(4.0, ge=1, description="give up after pixel x factor candidates")


class SynthConfig(StrictModel):
    """``configs/synth/*.yaml`` for ``generate``."""

    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: Path = Path("runs/teacher/detector")
    generator: GeneratorConfig = GeneratorConfig()
    sampler: SamplerParams = SamplerParams()
    filter: FilterConfig = FilterConfig()
    counts: CountsConfig = CountsConfig()
    reference: ReferenceConfig = ReferenceConfig()
    ivf_above: int = 200_000


@torch.no_grad()
def embed_images(
    teacher: ClassifierDetector, images: ImageSet, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher embeddings of an image set; unreadable images are skipped, counted and named in the log."""
    feats, labels, bad = [], [], []
    batch, batch_labels = [], []

    def flush() -> None:
        if batch:
            _, f = teacher.forward_batch(torch.stack(batch))
            feats.append(f.numpy())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for i in progress(range(len(images)), desc="embed ID train"):
        try:
            image, label = images[i]
            batch.append(teacher.preprocess(image))
            batch_labels.append(label)
        except OSError as err:
            bad.append(str(err))
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    if bad:
        log.warning("skipped %d unreadable ID image(s): %s", len(bad), "; ".join(bad[:5]))
    if not feats:
        raise ValueError(f"no readable images in {images.name}")
    return np.concatenate(feats).astype(np.float32), np.asarray(labels, dtype=np.int64)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_pool(
    cfg: SynthConfig,
    writer: OutlierWriter,
    z: np.ndarray,
    y: np.ndarray,
    bank: np.ndarray,
    tau: float,
    anchors: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """Boundary-sample every class, filter, write the ``knn`` pool; returns kept vectors per class."""
    kept: dict[int, torch.Tensor] = {}
    done = writer.done_ids()
    for c in range(len(anchors)):
        rng = np.random.default_rng([cfg.seed, c])
        out = boundary_sample(_normalise(z[y == c]), cfg.counts.knn_per_class, cfg.sampler, rng)
        verdict = filter_near(out.samples, bank, cfg.filter.k, tau)
        if not verdict.keep.any():  # a weak teacher or a tiny class: keep the farthest rather than none
            farthest = np.argsort(-verdict.distance, kind="stable")[: max(1, len(verdict.keep) // 10)]
            verdict.keep[farthest] = True
            for i in farthest:
                verdict.reason[i] = "kept: farthest 10% of a class whose every sample was ID-near"
            log.warning(
                "class %d: every boundary sample was ID-near (filter quantile %.2f); kept the farthest %d. A "
                "better teacher, a lower filter.quantile or a larger sampler.sigma gives real boundary outliers",
                c,
                cfg.filter.quantile,
                len(farthest),
            )
        vectors = torch.from_numpy(rescale(out.samples, float(anchors[c].norm())))
        ids = [f"knn-{c:03d}-{i:05d}" for i in range(len(vectors))]
        records = [
            {"id": ids[i], "kept": bool(verdict.keep[i]), "reason": verdict.reason[i], "source_class": c,
             "seed": cfg.seed, "sampler": out.params.model_dump(), "knn_distance": float(verdict.distance[i]),
             "boundary_distance": float(out.boundary_distance[i])}
            for i in range(len(ids))
        ]  # fmt: skip
        keep = torch.from_numpy(verdict.keep)
        kept[c] = vectors[keep]
        if not all(i in done for i in ids):
            writer.add_latents(
                "knn", [i for i, k in zip(ids, verdict.keep, strict=True) if k], vectors[keep], records
            )
    return kept


def pixel_pools(
    cfg: SynthConfig, writer: OutlierWriter, generator: Generator, teacher: ClassifierDetector, bank: np.ndarray,
    tau: float, vectors: dict[int, torch.Tensor], rank: int, world: int,
) -> None:  # fmt: skip
    """Decode outlier vectors with SD: ``sd`` latents for every candidate, filtered images as pixel outliers.

    This process's candidates are ``j = rank + world * i`` for ``i = 0, 1, ...``; candidate ``j``'s class,
    vector and seed depend only on ``j``. They are decoded in fixed blocks of ``counts.batch_size``
    consecutive ``i`` (a block with any candidate not on disk is decoded whole), so every batch holds
    ``batch_size`` candidates and a resumed run decodes exactly the batches an uninterrupted one would:
    the same results, bit for bit, on the same device. Candidates are recorded in order until ``target``
    are kept; the images stay on the generator's device for the teacher, and a background thread writes
    while the next block is generated.
    """
    n_classes = len(vectors)
    target = cfg.counts.pixel // world + (1 if rank < cfg.counts.pixel % world else 0)
    done = writer.done_ids()
    kept = sum(1 for r in writer.records() if r["pool"] == "pixel" and r["kept"])
    limit = math.ceil(target * cfg.counts.max_candidates_factor)
    bar = progress(total=target, initial=min(kept, target), desc=f"pixel outliers [{rank}]")
    rejected = 0
    i = 0
    with Background() as background:
        while kept < target and i < limit:
            block = [rank + world * k for k in range(i, min(i + cfg.counts.batch_size, limit))]
            i += len(block)
            if all(f"px-{j:07d}" in done for j in block):
                continue
            classes = [j % n_classes for j in block]
            vecs = torch.stack(
                [vectors[c][(j // n_classes) % len(vectors[c])] for j, c in zip(block, classes, strict=True)]
            )
            seeds = [cfg.seed * 1_000_003 + j for j in block]
            latents, pixels = generator.sample_pixels(classes, seeds, vecs)
            _, feats = teacher.forward_batch(teacher.preprocess.tensor(pixels))
            verdict = filter_near(feats.numpy(), bank, cfg.filter.k, tau)
            rows = []  # block positions to record: the new candidates, in order, until target are kept
            for b, j in enumerate(block):
                if kept >= target:
                    break
                if f"px-{j:07d}" not in done:
                    rows.append(b)
                    kept += bool(verdict.keep[b])
            keep = verdict.keep[rows]
            rejected += int((~keep).sum())
            kept_rows = [b for b in rows if verdict.keep[b]]
            background.submit(
                _write_block, writer, [block[b] for b in rows], [classes[b] for b in rows], [seeds[b] for b in rows],
                latents[rows], pixels[kept_rows].cpu(), keep, verdict.distance[rows], [verdict.reason[b] for b in rows],
            )  # fmt: skip
            bar.update(int(keep.sum()))
            bar.set_postfix(kept=kept, rejected=rejected)
    bar.close()
    if kept < target:
        log.warning("process %d kept only %d of %d pixel outliers after %d candidates", rank, kept, target, i)


def _write_block(
    writer: OutlierWriter, ids: list[int], classes: list[int], seeds: list[int], latents: torch.Tensor,
    kept_pixels: torch.Tensor, keep: np.ndarray, distance: np.ndarray, reasons: list[str],
) -> None:  # fmt: skip
    """Write one decoded block: ``sd`` latents of every candidate, then the pixel records and kept PNGs."""
    sd_records = [
        {"id": f"sd-{j:07d}", "kept": True, "reason": "kept", "source_class": c, "seed": s}
        for j, c, s in zip(ids, classes, seeds, strict=True)
    ]
    writer.add_latents("sd", [r["id"] for r in sd_records], latents, sd_records)
    images = iter(to_images(kept_pixels))
    records, pictures = [], []
    for n, (j, c, s) in enumerate(zip(ids, classes, seeds, strict=True)):
        ok = bool(keep[n])
        records.append({"id": f"px-{j:07d}", "kept": ok, "reason": reasons[n], "source_class": c, "seed": s,
                        "knn_distance": float(distance[n]), "sd_id": f"sd-{j:07d}"})  # fmt: skip
        pictures.append(next(images) if ok else None)
    writer.add_images(records, pictures)


def generate(cfg: SynthConfig, out: Path) -> dict:
    """Run the whole synthesis into ``out``; returns the card (main process) or {} (others)."""
    from accelerate import PartialState

    # CPU-only hosts (or fewer GPUs than processes) shard over gloo; rank and world are global (every machine)
    state = PartialState(cpu=_shard_on_cpu(), timeout=SHARD_WAIT)
    rank, world = state.process_index, state.num_processes
    started = time.perf_counter()
    if not (cfg.teacher / "detector.json").is_file():
        raise FileNotFoundError(
            f"teacher detector {cfg.teacher} does not exist; train it with "
            "`accelerate launch trainer/train_oal.py --config configs/train/teacher.yaml`"
        )
    teacher = ClassifierDetector.load(cfg.teacher, device=str(state.device))
    bench = load_benchmark(cfg.data)
    if teacher.class_names != bench.class_names:
        raise ValueError(f"teacher classes {teacher.class_names} differ from the data's {bench.class_names}")
    generator = Generator.load(cfg.generator, bench.class_names)
    anchors = generator.anchors()
    z, y = embed_images(teacher, bench.train)
    if z.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"teacher embeddings are {z.shape[1]}-d but the generator's tokens are {anchors.shape[1]}-d; "
            f"train the teacher against this generator ({cfg.generator.pretrained})"
        )
    bank = _normalise(z)
    tau = id_threshold(bank, cfg.filter.k, cfg.filter.quantile)
    writer = OutlierWriter(out, shard=str(rank))
    vectors = knn_pool(cfg, writer, z, y, bank, tau, anchors) if rank == 0 else None
    if world > 1:  # every process decodes the same kept vectors: recompute them without writing
        vectors = vectors or knn_pool(cfg, _NullWriter(), z, y, bank, tau, anchors)
    pixel_pools(cfg, writer, generator, teacher, bank, tau, vectors, rank, world)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    if world > 1:  # a rank whose share of counts.pixel is 0 (pixel < world) wrote no shard
        merge_shards(out, [str(r) for r in range(world) if r < max(1, cfg.counts.pixel)])
    card = {
        "generator": {"pretrained": cfg.generator.pretrained, "revision": cfg.generator.revision,
                      "steps": cfg.generator.steps, "guidance_scale": cfg.generator.guidance_scale},
        "teacher": str(cfg.teacher),
        "id_reference": {"benchmark": cfg.data.benchmark, "split": "train", "n": int(len(z))},
        "filter": {"k": cfg.filter.k, "quantile": cfg.filter.quantile, "threshold": tau},
        "config": cfg.model_dump(mode="json"),
        "processes": world,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": library_versions(),
    }  # fmt: skip
    card = OutlierWriter(out, shard=str(rank)).finalize(card)
    make_reference(cfg, out, generator)  # generated ID + VAE round trips (skipped when already there)
    return card


def _shard_on_cpu() -> bool:
    """CPU processes (gloo) without CUDA, under ``accelerate launch --cpu``, or with fewer GPUs than processes."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if forced or not torch.cuda.is_available():
        return True
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > torch.cuda.device_count():
        log.warning("%d processes on %d GPU(s): generating on the CPU", local, torch.cuda.device_count())
        return True
    return False


class _NullWriter:
    """Stands in for a writer when a non-main process only needs the kept knn vectors."""

    def done_ids(self) -> set[str]:
        return set()

    def add_latents(self, *args: Any, **kwargs: Any) -> int:
        return 0


def main_generate(cfg: SynthConfig, out: Path) -> int:
    """Run ``generate``: synthesise the outlier dataset into ``out`` and print its counts; returns 0."""
    card = generate(cfg, out)
    if card:
        counts = card.get("counts", {})
        print(f"outlier dataset: {out}  counts: {counts}  ({card['wall_seconds']:.0f} s)")
        print(f"preview: {out / 'preview.png'}")
    return 0
