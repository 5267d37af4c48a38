"""`python -m trainer.pipeline` on image folders the project has never seen, timed, then served -> BENCHMARKS.md.

The data is made here from scikit-learn's 8x8 handwritten digits (UCI, 1,797 images; not the MNIST sample
that mnist-open is built from): ID = digits 0-6 as an image folder with class names a user might write
(one with a space, one with non-ASCII letters), ~150 images per class, grey PNGs upscaled to 32x32 with
a tenth of them at 40x40 (mixed sizes) and two unreadable files; test OOD = digits 7-9 (near) and crops
of scikit-image's brick/grass/gravel textures plus uniform noise (far). Then the one command:

    python -m trainer.pipeline --data ID --ood digits-7-9=DIR:near --ood textures=DIR:far \\
        --ood noise=DIR:far --out runs/user-digits

(the embedded generator is fitted for this data within the pipeline's default 10-minute budget), the
pipeline's own serve line (uvicorn with OODFORGE_DETECTORS_DIR) and one POST /score of an ID and a noise
image. Writes the ``pipeline-user-data`` section of BENCHMARKS.md.

    .venv/bin/python bench/pipeline_user_data.py [--work /tmp/oodforge-user-data] [--out runs/user-digits]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "número seis"]
PER_CLASS = 150


def _digit(image8: np.ndarray, side: int) -> Image.Image:
    """An 8x8 sklearn digit (0..16) as a grey PNG-ready image of ``side`` pixels."""
    grey = Image.fromarray((image8 * (255 / 16)).astype(np.uint8), mode="L")
    return grey.resize((side, side), Image.Resampling.BICUBIC)


def make_data(work: Path) -> dict[str, Path]:
    """ID folder + three OOD folders under ``work`` (made once)."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    if (work / "done").is_file():
        return {k: Path(v) for k, v in json.loads((work / "done").read_text()).items()}
    shutil.rmtree(work, ignore_errors=True)
    digits = load_digits()
    rng = np.random.default_rng(0)
    root = {"id": work / "id", "near": work / "ood-digits-7-9", "textures": work / "ood-textures", "noise": work / "ood-noise"}
    for c, name in enumerate(NAMES):
        (root["id"] / name).mkdir(parents=True)
        idx = np.flatnonzero(digits.target == c)[:PER_CLASS]
        for i, j in enumerate(idx):
            side = 40 if i % 10 == 0 else 32
            _digit(digits.images[j], side).save(root["id"] / name / f"{name[:3]}-{i:03d}.png")
    (root["id"] / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root["id"] / "four" / "notes.txt.png").write_bytes(b"")
    root["near"].mkdir(parents=True)
    for i, j in enumerate(np.flatnonzero(digits.target >= 7)[:150]):
        _digit(digits.images[j], 32).save(root["near"] / f"d{i:03d}.png")
    root["textures"].mkdir(parents=True)
    for i in range(120):
        tex = getattr(skdata, ("brick", "grass", "gravel")[i % 3])()
        y, x = rng.integers(0, tex.shape[0] - 64), rng.integers(0, tex.shape[1] - 64)
        Image.fromarray(tex[y : y + 64, x : x + 64]).convert("L").resize((32, 32)).save(root["textures"] / f"t{i:03d}.png")
    root["noise"].mkdir(parents=True)
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(root["noise"] / f"n{i:03d}.png")
    (work / "done").write_text(json.dumps({k: str(v) for k, v in root.items()}))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(out: Path, images: list[Path]) -> list[dict]:
    """Start uvicorn as the pipeline's serve line says, POST the images to /score, stop it."""
    port = _free_port()
    env = {**os.environ, "OODFORGE_DETECTORS_DIR": str(out), "OODFORGE_DEFAULT_DETECTOR": "oal"}
    uvicorn = Path(sys.executable).with_name("uvicorn")
    proc = subprocess.Popen([str(uvicorn), "api.app:app", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        boundary = "oodforgebench"
        body = b""
        for path in images:
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
                     "Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + b"\r\n"  # fmt: skip
        body += f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/score?detector=oal", data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())["results"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/oodforge-user-data"))
    parser.add_argument("--out", type=Path, default=Path("runs/user-digits"))
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    root = make_data(args.work)
    command = [sys.executable, "-m", "trainer.pipeline", "--data", str(root["id"]),
               "--ood", f"digits-7-9={root['near']}:near", "--ood", f"textures={root['textures']}:far",
               "--ood", f"noise={root['noise']}:far", "--out", str(args.out)]  # fmt: skip
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    log = args.out.with_suffix(".log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"the pipeline failed ({code}); log: {log}")
    text = log.read_text()
    stage_line = next((x for x in text.splitlines() if x.startswith("pipeline: stage times")), "")
    probe = [next((root["id"] / "two").glob("*.png")), next(root["noise"].glob("*.png"))]
    served = serve_once(args.out, probe)
    verdicts = ", ".join(f"`{r['filename']}` is_ood={r['is_ood']} score={r['score']:.3f}" for r in served)
    report = (args.out / "report.md").read_text().split("\n", 1)[1].replace("\n# ", "\n### ")
    print(f"{wall:.0f} s; {stage_line}\n{verdicts}")
    if args.no_write:
        return 0
    display = " ".join(c if c != sys.executable else "python" for c in command).replace(str(args.work), "DATA")
    write_section(
        "pipeline-user-data",
        f"""## The pipeline on image folders it has never seen (issue 16)

Measured {today()} on {machine()}; `.venv/bin/python bench/pipeline_user_data.py`. Data made by the
script from scikit-learn's 8x8 digits (not the MNIST sample of mnist-open): ID = 7 classes named
{", ".join(f"`{n}`" for n in NAMES)}, {PER_CLASS} grey PNGs each (32x32, a tenth 40x40), plus two unreadable
files; test OOD = digits 7-9 (near), texture crops and noise (far). One command:

    {display}

**{wall / 60:.1f} min** wall time for the whole chain (CE, embedded generator fitted for this data, teacher,
outliers, OAL, report) on 2 cores; {stage_line.removeprefix("pipeline: ")}. Its serve line, run as printed,
answered `POST /score`: {verdicts}.

The pipeline's report (`{args.out}/report.md`):

{report}
""",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
