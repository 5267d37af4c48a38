"""The outlier dataset on disk: atomic writes, resume after a kill, shards, and the reader's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.outliers import OutlierDataset, OutlierWriter, merge_shards

N_PIXEL, N_LATENT, BATCH, D = 12, 12, 4, 6
SAMPLER = {"k": 5, "select": 3, "n_candidates": 10, "sigma": 0.07, "keep_per_point": 2}


def image(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8))


def kept(i: int) -> bool:
    return i % 3 != 0


def record(rid: str, i: int, pool: str) -> dict:
    return {
        "id": rid,
        "pool": pool,
        "kept": kept(i),
        "source_class": i % 2,
        "seed": i,
        "sampler": SAMPLER,
        "knn_distance": np.float32(0.5 + i / 100),
        "reason": "kept" if kept(i) else f"near_id: knn distance 0.{i:03d} < threshold 0.500",
    }


def latent(pool: str, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(D, generator=g) if pool == "knn" else torch.randn(4, 2, 2, generator=g)


def generate(writer: OutlierWriter, pixel: range, latent_batches: range, pools=("knn", "sd")) -> None:
    """What the synth loop does: skip done ids, write the rest."""
    done = writer.done_ids()
    for i in pixel:
        rid = f"px-{i:04d}"
        if rid not in done:
            assert writer.add_image(record(rid, i, "pixel"), image(i) if kept(i) else None)
    for pool in pools:
        for b in latent_batches:
            idx = range(b * BATCH, (b + 1) * BATCH)
            recs = [record(f"{pool}-{i:04d}", i, pool) for i in idx]
            ids = [r["id"] for r in recs if r["kept"]]
            rows = [latent(pool, i) for i in idx if kept(i)]
            writer.add_latents(pool, ids, torch.stack(rows), recs)


def expected(pool: str) -> torch.Tensor:
    return torch.stack([latent(pool, i) for i in range(N_LATENT) if kept(i)])  # ids sort like i


def check_complete(root: Path) -> OutlierDataset:
    lines = (root / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("file_name" in r for r in records)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_PIXEL + 2 * N_LATENT
    kept_files = {r["file_name"] for r in records if r["kept"] and r["pool"] == "pixel"}
    assert {f"images/{p.name}" for p in (root / "images").iterdir()} == kept_files
    assert all(r["file_name"] is None for r in records if r["pool"] != "pixel" or not r["kept"])
    ds = OutlierDataset.load(root)
    torch.testing.assert_close(ds.require("knn", width=D), expected("knn"), rtol=0, atol=0)
    torch.testing.assert_close(ds.require("sd", width=4), expected("sd"), rtol=0, atol=0)
    assert ds.knn_ids == [f"knn-{i:04d}" for i in range(N_LATENT) if kept(i)]
    images = ds.images()
    assert len(images) == len(kept_files) and set(images.labels.tolist()) == {-1}
    first = next(i for i in range(N_PIXEL) if kept(i))
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(image(first)))
    n_kept = sum(kept(i) for i in range(N_PIXEL))
    assert ds.card["counts"]["pixel"] == {"generated": N_PIXEL, "kept": n_kept, "rejected": N_PIXEL - n_kept}
    return ds


def test_resume_after_kill_gives_each_id_once(tmp_path: Path) -> None:
    root = tmp_path / "out"
    w = OutlierWriter(root)
    generate(w, range(6), range(1))
    # a kill while writing: latents of batch 1 went to a part file but their journal lines did not ...
    journal = root / "parts" / "metadata-0.jsonl"
    before = journal.read_bytes()
    generate(w, range(0), range(1, 2), pools=("knn",))
    journal.write_bytes(before)
    # ... then a half-written journal line, an orphan PNG (written, no record) and a temp file
    with journal.open("ab") as f:
        f.write(b'{"file_name": "images/px-0007.png", "id": "px-00')
    (root / "images" / "px-0007.png").write_bytes(b"not a png")
    (root / "images" / ".px-0008.png.123.abc.tmp").write_bytes(b"junk")

    w2 = OutlierWriter(root)
    assert journal.read_bytes() == before  # partial line dropped, so appends start on a fresh line
    done = w2.done_ids()
    assert done == {f"px-{i:04d}" for i in range(6)} | {
        f"{p}-{i:04d}" for p in ("knn", "sd") for i in range(4)
    }
    assert not w2.add_image(record("px-0001", 1, "pixel"), image(1))  # done: ignored, not duplicated
    generate(w2, range(N_PIXEL), range(N_LATENT // BATCH))
    generate(w2, range(N_PIXEL), range(N_LATENT // BATCH))  # a second resume changes nothing
    card = w2.finalize({"generator": "tiny", "filter": {"threshold": 0.5}})
    assert card["generator"] == "tiny" and card["latent_shapes"] == {"knn": [8, D], "sd": [8, 4, 2, 2]}
    assert (root / "preview.png").is_file() and (root / "card.json").is_file()
    check_complete(root)
    with Image.open(root / "images" / "px-0007.png") as im:  # the orphan was redone
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(image(7)))


def test_two_shards_merge_into_one_dataset(tmp_path: Path) -> None:
    root = tmp_path / "out"
    w0, w1 = OutlierWriter(root, shard="0"), OutlierWriter(root, shard="1")
    generate(w0, range(0, N_PIXEL, 2), range(0, 3, 2))
    generate(w1, range(1, N_PIXEL, 2), range(1, 3, 2))
    generate(w1, range(2, 3), range(0))  # both shards produced px-0002: kept once
    parts = sorted(p.name for p in (root / "parts").iterdir())
    assert parts == [
        "0-knn-00000.safetensors",
        "0-knn-00001.safetensors",
        "0-sd-00002.safetensors",
        "0-sd-00003.safetensors",
        "1-knn-00000.safetensors",
        "1-sd-00001.safetensors",
        "metadata-0.jsonl",
        "metadata-1.jsonl",
    ]
    with pytest.raises(FileNotFoundError, match="shard '2' wrote nothing"):
        merge_shards(root, ["0", "1", "2"])
    merge_shards(root, ["0", "1"])
    assert len((root / "metadata.jsonl").read_text().splitlines()) == N_PIXEL + 2 * N_LATENT
    OutlierWriter(root, shard="0").finalize({"generator": "tiny"})
    check_complete(root)


def test_writer_rejects_bad_records(tmp_path: Path) -> None:
    w = OutlierWriter(tmp_path / "out")
    with pytest.raises(ValueError, match="pass the image"):
        w.add_image(record("px-0001", 1, "pixel"), None)
    with pytest.raises(ValueError, match="must be a non-empty string"):
        w.add_image({"id": "../escape", "kept": True}, image(0))
    with pytest.raises(ValueError, match="exactly the kept records"):
        w.add_latents("knn", ["knn-0000"], torch.zeros(1, D), [record("knn-0000", 0, "knn")])
    with pytest.raises(ValueError, match="2-D"):
        w.add_latents("knn", ["knn-0001"], torch.zeros(1, 2, 3), [record("knn-0001", 1, "knn")])
    with pytest.raises(ValueError, match="must be letters"):
        OutlierWriter(tmp_path / "out", shard="a/b")
    assert w.done_ids() == set()


def test_reader_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OutlierDataset.load(tmp_path / "missing")
    root = tmp_path / "out"
    w = OutlierWriter(root)
    generate(w, range(4), range(0))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        OutlierDataset.load(root)
    card = w.finalize({})
    assert card["counts"]["knn"] == {"generated": 0, "kept": 0, "rejected": 0}
    ds = OutlierDataset.load(root)
    assert ds.knn is None and ds.sd is None and len(ds.images()) == 2
    with pytest.raises(ValueError, match="no kept 'sd' outliers"):
        ds.require("sd")
    with pytest.raises(ValueError, match="use .images()"):
        ds.require("pixel")

    root2 = tmp_path / "out2"
    w2 = OutlierWriter(root2)
    generate(w2, range(0), range(1), pools=("knn",))
    w2.finalize({})
    ds2 = OutlierDataset.load(root2)
    with pytest.raises(ValueError, match="width 6 .* but 32 is expected"):
        ds2.require("knn", width=32)
    with pytest.raises(ValueError, match="no kept pixel outliers"):
        ds2.images()
    meta = root2 / "metadata.jsonl"
    meta.write_text(meta.read_text() + "{broken\n")
    with pytest.raises(ValueError, match="line 5 is not valid JSON"):
        OutlierDataset.load(root2)
    lines = meta.read_text().splitlines(keepends=True)
    meta.write_text(lines[0] + "".join(lines[2:4]))  # knn-0001 (kept) lost its record
    with pytest.raises(ValueError, match="different runs"):
        OutlierDataset.load(root2)
