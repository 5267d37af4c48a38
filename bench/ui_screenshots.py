"""Screenshots of ``/ui`` for the docs: docs/ui.png (verdicts on a detector's histogram) and docs/ui-gallery.png.

    .venv/bin/python -m bench.ui_screenshots --detector oodforge/assets/detectors/mnist-open/oal \
        --outliers runs/outliers --out docs

Serves ``--detector`` (under the name ``oal``) with a real uvicorn on 127.0.0.1, in a scratch working
directory where ``runs/outliers`` is a copy of ``--outliers`` (so the detector's provenance, which names
``runs/outliers``, links to its gallery), opens the page in headless Chromium (Debian's chromium +
chromedriver, Selenium), uploads mnist-open test images (ID digits 0-5, near-OOD digits 6-9, far-OOD
photo crops and noise) through the page's file input and saves both pages as palette PNGs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import httpx
from PIL import Image

SHOTS = (("ui.png", "/ui?detector=oal"), ("ui-gallery.png", "/ui/outliers?dir=runs/outliers&per_page=21"))


def upload_images(out: Path) -> list[Path]:
    from oodforge.data.base import DataConfig
    from oodforge.data.benchmarks import load_benchmark

    bench = load_benchmark(DataConfig(benchmark="mnist-open", seed=0))
    first = {int(label): i for i, label in reversed(list(enumerate(bench.test.labels)))}
    picks = [("id-digit", bench.test, first[d]) for d in (1, 3, 5)]
    near = bench.ood["digits-6-9"].images
    picks += [("near-digit", near, i) for i in (0, 3)]
    picks += [("photo", bench.ood["photos"].images, 0), ("noise", bench.ood["noise"].images, 0)]
    paths = []
    for k, (kind, images, i) in enumerate(picks):
        image, label = images[i]
        path = out / f"{k + 1}-{kind}{'-' + str(label) if label >= 0 else ''}.png"  # near: label -1
        image.save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detector", type=Path, default=Path("oodforge/assets/detectors/mnist-open/oal"))
    parser.add_argument("--outliers", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = parser.parse_args()
    import socket

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    from api.app import create_app
    from api.settings import ServeSettings

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        shutil.copytree(args.detector, work / "detectors" / "oal")
        shutil.copytree(args.outliers, work / "runs" / "outliers")
        images = upload_images(work)
        os.chdir(work)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(ServeSettings(detectors_dir=work / "detectors"))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        while not server.started:
            time.sleep(0.05)
        assert httpx.get(f"{url}/readyz").status_code == 200
        options = webdriver.ChromeOptions()
        options.binary_location = args.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(args.chromedriver))
        try:
            for name, path in SHOTS:
                driver.get(url + path)
                wait = WebDriverWait(driver, 20)
                if name == "ui.png":
                    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#card dd"))
                    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
                    wait.until(
                        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#histogram g.mark")) == len(images)
                    )
                else:
                    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .tile"))
                    time.sleep(1.0)  # the tiles' images load one by one
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1280, min(height + 140, 1600))
                time.sleep(0.3)
                shot = Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB")
                shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out / name, optimize=True)
                print(
                    f"{out / name}: {shot.size[0]}x{shot.size[1]}, {(out / name).stat().st_size // 1024} KiB"
                )
                driver.set_window_size(1280, 900)
        finally:
            driver.quit()
            server.should_exit = True


if __name__ == "__main__":
    main()
