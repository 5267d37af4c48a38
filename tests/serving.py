"""A real uvicorn process serving tiny detectors on localhost, for the API tests."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detectors_dir(root: Path, artifacts: dict[str, Path]) -> Path:
    """A directory laid out like ``runs/``: ``NAME/detector/`` for each artifact (copied)."""
    for name, path in artifacts.items():
        shutil.copytree(path, root / name / "detector")
    return root


@contextmanager
def running_server(env: dict[str, str], log: Path, workers: int = 1, timeout: float = 90) -> Iterator[Server]:
    """Start ``uvicorn api.app:app`` with ``env`` (OODFORGE_* settings); stop it on exit."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OODFORGE_")}
    full_env.update(env)
    full_env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)] if workers > 1 else []
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(url=f"http://127.0.0.1:{port}", log=log, process=process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout} s:\n{server.log_text()}")
            time.sleep(0.25)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def png_bytes(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def digit_like(seed: int, size: int = 28) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def run_batcher(detector, jobs: list, max_batch_size: int) -> tuple[list, list[int]]:
    """Submit ``jobs`` (pixel tensors) to one ``MicroBatcher`` at once; its results and batch sizes."""
    import asyncio

    from api.batching import MicroBatcher
    from api.settings import Batching

    sizes: list[int] = []

    async def main() -> list:
        batcher = MicroBatcher(
            detector, Batching(max_batch_size=max_batch_size, max_wait_ms=200), on_batch=sizes.append
        )
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(p) for p in jobs))
        finally:
            await batcher.stop()

    return asyncio.run(main()), sizes
