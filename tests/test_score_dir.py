"""``python -m api.score_dir``: a folder tree scored offline, unreadable files reported, resumable, multi-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import ROOT, digit_like, png_bytes

from api.score_dir import main, read_done, score_dir
from oodforge.detector import Detector


def make_tree(root: Path, n: int = 12) -> dict[str, bytes]:
    """``n`` images spread over nested folders (PNG, JPEG, grey, RGBA), a corrupt PNG and a text file."""
    files: dict[str, bytes] = {}
    for i in range(n):
        folder = ["", "a/", "a/b/", "c/"][i % 4]
        image = digit_like(i, 28 + i)
        if i % 3 == 1:
            files[f"{folder}img{i}.jpg"] = png_bytes(image, "JPEG")
        elif i % 3 == 2:
            files[f"{folder}img{i}.png"] = png_bytes(image.convert("LA"))
        else:
            files[f"{folder}img{i}.png"] = png_bytes(image)
    files["a/b/corrupt.png"] = png_bytes(digit_like(99))[:90]
    files["c/readme.txt"] = b"not an image"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".hidden.png").write_bytes(files["img0.png"])  # hidden files are left out
    return files


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    return root, make_tree(root)


def test_every_file_gets_one_record_and_images_score_as_predict(ood_assets, tree, tmp_path, capsys):
    root, files = tree
    out = tmp_path / "out" / "results.jsonl"
    assert main([str(root), "--detector", str(ood_assets.ce), "--out", str(out), "--batch-size", "4"]) == 0
    by_path = {r["path"]: r for r in records(out)}
    assert sorted(by_path) == sorted(files)
    detector = Detector.load(ood_assets.ce)
    images = sorted(p for p in files if not p.endswith((".txt", "corrupt.png")))
    expected = detector.predict([files[p] for p in images])
    assert [by_path[p]["score"] for p in images] == expected.scores.tolist()
    assert [by_path[p]["label"] for p in images] == expected.label_names()
    assert [by_path[p]["is_ood"] for p in images] == expected.is_ood.tolist()
    assert by_path["a/b/corrupt.png"]["status"] == 400 and "truncated" in by_path["a/b/corrupt.png"]["error"]
    assert (
        by_path["c/readme.txt"]["status"] == 415
        and "not a recognised image" in by_path["c/readme.txt"]["error"]
    )
    summary = capsys.readouterr().out
    ood = int(expected.is_ood.sum())
    assert f"scored {len(images)} images ({ood} OOD" in summary and "unreadable 2" in summary
    assert "unreadable: c/readme.txt" in summary and "images/s" in summary


def test_a_second_run_resumes_after_a_torn_write(ood_assets, tree, tmp_path):
    root, files = tree
    out = tmp_path / "results.jsonl"
    first = score_dir(root, ood_assets.ce, out, batch_size=3, show_progress=False)
    assert first.scored + first.unreadable == len(files)
    lines = out.read_text().splitlines(keepends=True)
    kept = lines[:5]
    out.write_text("".join(kept) + lines[5][: len(lines[5]) // 2])  # a kill mid-write leaves half a line
    second = score_dir(root, ood_assets.ce, out, batch_size=3, show_progress=False)
    assert second.skipped == 5 and second.scored + second.unreadable == len(files) - 5
    paths = [r["path"] for r in records(out)]
    assert sorted(paths) == sorted(files)  # every file exactly once
    assert records(out)[:5] == [json.loads(line) for line in kept]
    again = score_dir(root, ood_assets.ce, out, show_progress=False)
    assert again.skipped == len(files) and again.scored == again.unreadable == 0


def test_a_killed_run_resumes_and_scores_every_file_exactly_once(ood_assets, tmp_path):
    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    for i in range(600):
        folder = root / f"part{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "api.score_dir", str(root), "--detector", str(ood_assets.ce)]
    command += ["--out", str(out), "--batch-size", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.stat().st_size > 2000:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done, _ = read_done(out)
    assert 0 < len(done) < 600, "the run finished before it was killed; nothing to resume"
    assert main([str(root), "--detector", str(ood_assets.ce), "--out", str(out), "--no-progress"]) == 0
    paths = [r["path"] for r in records(out)]
    assert len(paths) == len(set(paths)) == 600 and all("score" in r for r in records(out))


def test_several_workers_write_the_same_records(ood_assets, tree, tmp_path):
    root, files = tree
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    score_dir(root, ood_assets.ce, one, batch_size=2, show_progress=False)
    summary = score_dir(root, ood_assets.ce, two, batch_size=2, workers=2, show_progress=False)
    assert summary.scored + summary.unreadable == len(files)
    assert sorted(records(one), key=lambda r: r["path"]) == sorted(records(two), key=lambda r: r["path"])


def test_nothing_scorable_is_exit_1_and_a_wrong_detector_exit_2(ood_assets, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("text")
    out = tmp_path / "r.jsonl"
    assert main([str(junk), "--detector", str(ood_assets.ce), "--out", str(out), "--no-progress"]) == 1
    assert records(out)[0]["path"] == "a.txt" and "error" in records(out)[0]
    assert main([str(junk), "--detector", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main([str(tmp_path / "missing"), "--detector", str(ood_assets.ce), "--out", str(out)]) == 2


def test_the_output_inside_the_tree_is_not_scored(ood_assets, tree):
    root, files = tree
    out = root / "results.jsonl"
    score_dir(root, ood_assets.ce, out, show_progress=False)
    score_dir(root, ood_assets.ce, out, show_progress=False)
    assert sorted(r["path"] for r in records(out)) == sorted(files)
