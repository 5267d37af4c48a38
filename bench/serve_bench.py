"""Serving benchmark -> BENCHMARKS.md: a real server under load vs the same work in-process, in one run.

    .venv/bin/python -m bench.serve_bench --detectors-dir runs --detector oal --no-write   # ~3 min; prints it
    .venv/bin/python -m bench.serve_bench --duration 2 --sustain 3 --concurrency 1,32 --no-write   # smoke

All three measure the same JPEG bytes (``N_BODIES`` 640x480 photos, quality 90: random crops of the
skimage photos, each encoded once) with the same torch thread count, the server's (``torch_threads`` as
:func:`api.settings.resources` resolves it for the server's environment, checked against ``GET
/detectors``):

1. In-process pipeline (the headline's denominator): what a user gets without the server on the same
   cores, ``Detector.predict`` on the encoded bytes in batches of 32 (decode with JPEG draft, pre-process,
   forward, score, one thread of Python).
2. Model alone: ``Detector.predict_pixels`` on already pre-processed batches of 32, and, after the served
   run, of each level's mean server batch (so the model's time per image inside the server, from
   ``/metrics``, is compared at the batch size it really ran).
3. The server: ``python -m api`` (uvicorn with the settings' ``workers``; settings through ``OODFORGE_*``)
   on a free port. For each concurrency level that many asyncio workers (one keep-alive connection each,
   raw HTTP/1.1 with pre-built multipart ``/score`` requests: the lightest load generator) POST back to
   back for ``--duration`` seconds after a warm-up: images/s, p50/p99 latency, errors, mean server batch,
   the ``oodforge_stage_seconds`` of ``/metrics`` (read, decode, preprocess, queue, model, respond) and
   the CPU the server and the client used. The client shares the cores with the server.
4. Sustained load at the largest level for ``--sustain`` seconds: errors and the server's resident memory
   (VmRSS of its process tree: workers and decode processes, from /proc) before and after.

Headline: served / in-process img/s at concurrency 32. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from api.detectors import artifact_dir  # noqa: E402
from api.metrics import STAGES  # noqa: E402
from api.settings import Limits, Resources, load_settings, resources  # noqa: E402
from api.uploads import decode_one  # noqa: E402
from bench.common import BENCHMARKS_MD, machine, write_section  # noqa: E402
from oodforge.detector import Detector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.8  # served / in-process pipeline
GOAL_MODEL_RATIO = 1.5  # model ms/image in the server / model alone at the same batch
GOAL_RSS_MIB = 20.0  # RSS growth over the sustained phase
GOAL_CONCURRENCY = 32
PIPELINE_BATCH = 32
CLIENT_BOUND_CPU = 90  # % of one core: above this the single-process load generator is the bottleneck
N_BODIES = 64  # distinct request bodies cycled through by the workers
BARE_SECONDS = 5.0  # in-process and model-alone figures are steady: at most this long each
SETTINGS_ENV = {  # bench flag -> server setting it sets (other OODFORGE_* variables are inherited, reported)
    "workers": "OODFORGE_WORKERS",
    "threads": "OODFORGE_TORCH_THREADS",
    "decode_processes": "OODFORGE_DECODE_PROCESSES",
    "decode_threads": "OODFORGE_DECODE_THREADS",
}
OWN_ENV = (
    "OODFORGE_DETECTORS_DIR", "OODFORGE_DEFAULT_DETECTOR", "OODFORGE_BATCHING__MAX_BATCH_SIZE",
    "OODFORGE_BATCHING__MAX_WAIT_MS", "OODFORGE_LIMITS__JPEG_DRAFT", *SETTINGS_ENV.values(),
)  # fmt: skip

# ---------------------------------------------------------------- test images


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
PHOTO_SIZE = (640, 480)


def test_photos(n: int = N_BODIES, seed: int = 0) -> list[bytes]:
    """``n`` 640x480 JPEGs (quality 90): random crops (at least half of each side) of skimage photos."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    sources = [getattr(skdata, name)() for name in PHOTOS]
    out = []
    for i in range(n):
        source = sources[i % len(sources)]
        h, w = source.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = (
            Image.fromarray(source[y : y + ch, x : x + cw]).convert("RGB").resize(PHOTO_SIZE, Image.BILINEAR)
        )
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def multipart_bodies(photos: list[bytes], per_request: int, n: int = N_BODIES) -> list[tuple[bytes, str]]:
    """``n`` ready-to-send multipart bodies (and their content type) of ``per_request`` images each."""
    bodies = []
    for b in range(n):
        picks = [(b * per_request + k) % len(photos) for k in range(per_request)]
        files = [("files", (f"photo-{i}.jpg", photos[i], "image/jpeg")) for i in picks]
        request = httpx.Request("POST", "http://bench/score", files=files)
        bodies.append((request.read(), request.headers["content-type"]))
    return bodies


def server_pixels(detector: Detector, photos: list[bytes], jpeg_draft: bool) -> torch.Tensor:
    """The model input of ``photos`` exactly as the server makes it (``decode_one`` with its limits)."""
    limits = Limits(jpeg_draft=jpeg_draft)
    return torch.stack(
        [decode_one((None, data), i, detector, limits).pixels for i, data in enumerate(photos)]
    )


def model_alone(detector: Detector, pixels: torch.Tensor, batch: int, seconds: float) -> float:
    """Images/s of ``Detector.predict_pixels`` alone on already pre-processed batches of ``batch``."""
    cursor = 0

    def one_batch() -> None:
        nonlocal cursor
        rows = [(cursor + k) % len(pixels) for k in range(batch)]
        cursor += batch
        detector.predict_pixels(pixels[rows])

    return _rate(one_batch, batch, seconds)


def in_process(detector: Detector, photos: list[bytes], seconds: float, batch: int = PIPELINE_BATCH) -> float:
    """Images/s of ``Detector.predict`` on the encoded bytes, ``batch`` at a time (decode -> score, in-process)."""
    cursor = 0

    def one_batch() -> None:
        nonlocal cursor
        chunk = [photos[(cursor + k) % len(photos)] for k in range(batch)]
        cursor += batch
        detector.predict(chunk, batch_size=batch)

    return _rate(one_batch, batch, seconds)


def _rate(step: Callable[[], None], per_step: int, seconds: float) -> float:
    """Images/s of ``step()`` (``per_step`` images each) over ``seconds``, after a warm-up of 1 s and 2 steps."""
    warm, warm_until = 0, time.perf_counter() + min(1.0, seconds)
    while warm < 2 or time.perf_counter() < warm_until:
        step()
        warm += 1
    done, start = 0, time.perf_counter()
    while done < 3 or time.perf_counter() - start < seconds:
        step()
        done += 1
    return done * per_step / (time.perf_counter() - start)


def decode_cost(
    detector: Detector, photos: list[bytes], jpeg_draft: bool, rounds: int = 3
) -> tuple[float, float]:
    """Mean ms per image of decode and of pre-processing, one image at a time, this thread only."""
    limits = Limits(jpeg_draft=jpeg_draft)
    decode_s = preprocess_s = 0.0
    for _ in range(rounds):
        for i, data in enumerate(photos):
            image = decode_one((None, data), i, detector, limits)
            decode_s += image.decode_s
            preprocess_s += image.preprocess_s
    n = rounds * len(photos)
    return 1000 * decode_s / n, 1000 * preprocess_s / n


# ---------------------------------------------------------------- the server process


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mib(pids: list[int]) -> float:
    """Sum of VmRSS over ``pids`` (MiB); processes that vanished count as 0."""
    total_kib = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far (seconds)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """The server died or did not become ready; the message holds the end of its output."""


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment the server starts with: this one plus the settings the flags set."""
    env = dict(os.environ)
    env.update(
        {
            "OODFORGE_DETECTORS_DIR": str(args.detectors_dir.resolve()),
            "OODFORGE_DEFAULT_DETECTOR": args.detector,
            "OODFORGE_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size),
            "OODFORGE_BATCHING__MAX_WAIT_MS": str(args.max_wait_ms),
            "OODFORGE_LIMITS__JPEG_DRAFT": "false" if args.no_jpeg_draft else "true",
        }
    )
    for flag, name in SETTINGS_ENV.items():
        if getattr(args, flag) is not None:
            env[name] = str(getattr(args, flag))
    return env


def server_resources(args: argparse.Namespace) -> Resources:
    """The workers, torch threads and decoders the server will resolve (same settings, same cores)."""
    return resources(load_settings(environ=server_env(args)), environ=server_env(args))


class ServerProcess:
    """``python -m api`` (uvicorn with the settings' workers) as a child process; a context manager that
    always stops it."""

    def __init__(self, args: argparse.Namespace, log_path: Path, metrics_dir: Path | None):
        self.args = args
        self.url = f"http://{args.host}:{args.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "api", "--host", args.host, "--port", str(args.port)]
        if args.no_access_log:
            self.command.append("--no-access-log")
        self.env = server_env(args)
        if metrics_dir is not None:  # several workers: /metrics aggregates them through this directory
            self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # the session this script started for the server
                self.proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(the server wrote nothing)"

    def wait_ready(self, timeout: float) -> dict:
        """Poll ``GET /readyz`` until 200; :class:`ServerError` (with the server's output) if it dies or
        is not ready within ``timeout`` seconds."""
        assert self.proc is not None
        deadline, last = time.monotonic() + timeout, "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the server exited with status {self.proc.returncode} before it was ready; its output:\n"
                    f"{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return response.json()
                last = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}"
            time.sleep(0.25)
        raise ServerError(
            f"the server at {self.url} was not ready after {timeout:.0f} s (last /readyz: {last}); "
            f"its output:\n{self.log_tail()}\nraise --startup-timeout if it is only slow"
        )

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)


# ---------------------------------------------------------------- load generation


@dataclass
class LoadResult:
    """What one load level measured (only the requests of the timed window, errors over all)."""

    concurrency: int
    seconds: float
    requests: int  # successful requests that completed inside the window
    images: int
    latencies_ms: np.ndarray  # of the successful requests that started inside the window
    errors: int
    error_samples: list[str] = field(default_factory=list)
    mean_batch: float | None = None
    server_cpu: float = 0.0  # % of one core
    client_cpu: float = 0.0
    stage_ms: dict[str, float] = field(
        default_factory=dict
    )  # server ms per image, by stage (warm-up included)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")


def batch_totals(exposition: str, detector: str) -> tuple[float, float]:
    """``(sum, count)`` of the ``oodforge_batch_size`` histogram of ``detector`` in a /metrics text."""
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(r"^oodforge_batch_size_(sum|count)\{([^}]*)\}\s+(\S+)", re.M)
    for kind, labels, value in pattern.findall(exposition):
        if f'detector="{detector}"' in labels:
            totals[kind] += float(value)
    return totals["sum"], totals["count"]


class RawConnection:
    """One keep-alive HTTP/1.1 connection sending pre-built requests: a load generator far lighter than
    an HTTP client library (httpx used ~4 ms of client CPU per request here, more than the server)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await self.reader.readexactly(int(length.group(1)) if length else 0)
            return int(head[9:12]), body
        except Exception:
            self.close()  # the next request opens a fresh connection
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def raw_requests(bodies: list[tuple[bytes, str]], path: str) -> list[bytes]:
    """Complete HTTP/1.1 requests (head + body) for ``bodies``, built once."""
    return [
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body, ctype in bodies
    ]


def stage_totals(exposition: str) -> dict[str, float]:
    """Seconds summed per stage (``oodforge_stage_seconds_sum``) and ``images`` (images scored)."""
    totals = {stage: 0.0 for stage in STAGES}
    for stage, value in re.findall(r'^oodforge_stage_seconds_sum\{stage="(\w+)"\}\s+(\S+)', exposition, re.M):
        totals[stage] = totals.get(stage, 0.0) + float(value)
    totals["images"] = sum(
        float(v) for v in re.findall(r"^oodforge_images_scored_total\{[^}]*\}\s+(\S+)", exposition, re.M)
    )
    return totals


async def metrics_now(
    client: httpx.AsyncClient, server: ServerProcess
) -> tuple[tuple[float, float], dict[str, float]]:
    text = (await client.get(f"{server.url}/metrics")).text
    return batch_totals(text, server.args.detector), stage_totals(text)


async def run_load(
    client: httpx.AsyncClient,
    server: ServerProcess,
    bodies: list[tuple[bytes, str]],
    per_request: int,
    concurrency: int,
    warmup: float,
    duration: float,
) -> LoadResult:
    """``concurrency`` workers POST /score back to back; the window starts after ``warmup`` seconds."""
    requests = raw_requests(bodies, f"/score?detector={server.args.detector}")
    (batch_sum, batch_count), stages = await metrics_now(client, server)
    start = time.perf_counter()
    window_start, stop = start + warmup, start + warmup + duration
    done: list[tuple[float, float, int]] = []  # (start, end, images) of successful requests
    errors: list[str] = []
    cpu: dict[str, float] = {}

    async def worker(w: int) -> None:
        k = w
        connection = RawConnection(server.args.host, server.args.port)
        while (t0 := time.perf_counter()) < stop:
            if "server" not in cpu and t0 >= window_start:
                cpu["server"], cpu["client"], cpu["t"] = cpu_seconds(server.pids()), time.process_time(), t0
            raw = requests[k % len(requests)]
            k += concurrency
            try:
                status, body = await connection.post(raw)
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:300]!r}")
                elif (n := len(json.loads(body)["results"])) != per_request:
                    errors.append(f"HTTP 200 with {n} results for {per_request}")
                else:
                    done.append((t0, time.perf_counter(), per_request))
            except Exception as err:  # noqa: BLE001 - every failure is a counted error, with its type
                errors.append(f"{type(err).__name__}: {err}")
        connection.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    end = time.perf_counter()
    completed = [n for _, t1, n in done if window_start <= t1 <= stop]
    result = LoadResult(
        concurrency=concurrency,
        seconds=duration,
        requests=len(completed),
        images=sum(completed),
        latencies_ms=np.array([1000 * (t1 - t0) for t0, t1, _ in done if t0 >= window_start]),
        errors=len(errors),
        error_samples=errors[:5],
    )
    if cpu:
        wall = end - cpu["t"]
        result.server_cpu = 100 * (cpu_seconds(server.pids()) - cpu["server"]) / wall
        result.client_cpu = 100 * (time.process_time() - cpu["client"]) / wall
    (batch_sum_after, batch_count_after), stages_after = await metrics_now(client, server)  # warm-up included
    if batch_count_after > batch_count:
        result.mean_batch = (batch_sum_after - batch_sum) / (batch_count_after - batch_count)
    images = stages_after["images"] - stages["images"]
    if images > 0:
        result.stage_ms = {k: 1000 * (stages_after[k] - stages[k]) / images for k in STAGES}
    return result


@dataclass
class ServedRun:
    levels: list[LoadResult]
    sustained: LoadResult | None
    rss_ready: float
    rss_before: float
    rss_after: float
    loaded: list[str]
    serving: dict[str, int]  # GET /detectors "serving": what the server resolved


async def serve_and_load(
    args: argparse.Namespace, server: ServerProcess, photos: list[bytes], rss_ready: float, loaded: list[str]
) -> ServedRun:
    """Every load level, then the sustained load at the largest one, through one httpx client."""
    bodies = multipart_bodies(photos, args.images_per_request)
    top = max(args.concurrency)
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        serving = (await client.get(f"{server.url}/detectors")).json()["serving"]
        print(f"  serving settings (GET /detectors): {serving}", flush=True)
        levels = []
        for c in args.concurrency:
            result = await run_load(
                client, server, bodies, args.images_per_request, c, args.warmup, args.duration
            )
            levels.append(result)
            print(f"  concurrency {c}: {describe(result)}", flush=True)
        sustained, rss_before, rss_after = None, 0.0, 0.0
        if args.sustain > 0:
            rss_before = rss_mib(server.pids())
            sustained = await run_load(
                client, server, bodies, args.images_per_request, top, 0.0, args.sustain
            )
            rss_after = rss_mib(server.pids())
            print(f"  sustained {args.sustain:g} s at {top}: {describe(sustained)}", flush=True)
    return ServedRun(levels, sustained, rss_ready, rss_before, rss_after, loaded, serving)


def describe(r: LoadResult) -> str:
    batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
    text = (
        f"{r.images_per_s:.1f} img/s, {r.requests_per_s:.1f} req/s, p50 {r.pct(50):.1f} ms, "
        f"p99 {r.pct(99):.1f} ms, {r.errors} errors, mean batch {batch}, "
        f"CPU server {r.server_cpu:.0f}% / client {r.client_cpu:.0f}%"
    )
    return text + "".join(f"\n    error: {e}" for e in r.error_samples)


# ---------------------------------------------------------------- report


@dataclass
class Baselines:
    """What ran in this process, with the server's torch threads.

    Attributes:
        threads: torch threads (the server's).
        in_process: img/s of ``Detector.predict`` on the bytes, batches of ``PIPELINE_BATCH``.
        model: img/s of ``predict_pixels`` alone by batch size (``PIPELINE_BATCH`` and each level's mean batch).
        decode_ms: One photo's decode, one thread.
        preprocess_ms: One photo's pre-processing, one thread.
    """

    threads: int
    in_process: float
    model: dict[int, float]
    decode_ms: float
    preprocess_ms: float

    def model_ms(self, batch: int) -> float:
        return 1000.0 / self.model[batch]


def versions() -> str:
    out = []
    for pkg in ("fastapi", "uvicorn", "starlette", "httpx"):  # torch: in machine()
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{pkg} {metadata.version(pkg)}")
    return ", ".join(out)


def served_batch(r: LoadResult) -> int:
    """The level's mean server batch, rounded (at least 1): the batch size the model alone is timed at."""
    return max(1, round(r.mean_batch or 1))


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(
    args: argparse.Namespace, run: ServedRun, base: Baselines, command: str, load_at_start: float
) -> str:
    inherited = sorted(k for k in os.environ if k.startswith("OODFORGE_") and k not in OWN_ENV)
    serving = run.serving
    decoders = (
        f"{serving['decode_processes']} decode process(es) per worker"
        if serving["decode_processes"]
        else f"decoding in {serving['decode_threads']} thread(s) of each worker"
    )
    lines = [
        "## Serving 640x480 JPEG photos: the server vs the same work in-process",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; {versions()}; "
        f"1-minute load average at the start {load_at_start:.2f}"
        + (
            " (**the cores were shared with other jobs: figures are noisy, lower bounds**)"
            if load_at_start > 1
            else ""
        )
        + ".",
        f"Command: `{command}`.",
        "",
        f"Server: `python -m api` (uvicorn{' --no-access-log' if args.no_access_log else ', access log on'}), "
        f"detector `{args.detector}` from `{args.detectors_dir}` (loaded: {', '.join(run.loaded)}); as "
        f"`GET /detectors` reports it: {serving['workers']} worker(s) on {serving['cores']} core(s), "
        f"{serving['torch_threads']} torch thread(s) per worker, {decoders}; micro-batching "
        f"`max_batch_size={args.max_batch_size}`, `max_wait_ms={args.max_wait_ms:g}`; "
        f"`limits.jpeg_draft={'false' if args.no_jpeg_draft else 'true'}`"
        + (f"; inherited environment: {', '.join(inherited)}" if inherited else "")
        + ".",
        f"Load: N asyncio workers, one keep-alive HTTP/1.1 connection each, POST multipart `/score` with "
        f"{args.images_per_request} image(s) per request back to back ({N_BODIES} distinct 640x480 JPEGs, "
        f"quality 90, crops of skimage's {', '.join(PHOTOS)}), {args.duration:g} s per level after a "
        f"{args.warmup:g} s warm-up. **The load generator runs on the same cores as the server** (CPU "
        "column: % of one core used by the server's processes / by the client).",
        f"In-process pipeline (same run, same bytes, {base.threads} torch thread(s) as the server): "
        f"`Detector.predict(bytes, batch_size={PIPELINE_BATCH})` on {PIPELINE_BATCH} photos at a time = "
        f"**{base.in_process:.1f} img/s**. Model alone (`predict_pixels` on pre-processed batches of "
        f"{PIPELINE_BATCH}): {base.model[PIPELINE_BATCH]:.1f} img/s. One photo's decode {base.decode_ms:.2f} ms "
        f"+ pre-processing {base.preprocess_ms:.2f} ms (one thread).",
        "",
        "| concurrency | served img/s | p50 ms | p99 ms | errors | mean server batch | CPU % server / client "
        "| served / in-process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run.levels:
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
        lines.append(
            f"| {r.concurrency} | {r.images_per_s:.1f} | {r.pct(50):.1f} | {r.pct(99):.1f} | {r.errors} | "
            f"{batch} | {r.server_cpu:.0f} / {r.client_cpu:.0f} | {r.images_per_s / base.in_process:.2f}x |"
        )
    busy = [r.concurrency for r in run.levels if r.client_cpu >= CLIENT_BOUND_CPU]
    if busy:
        lines += [
            "",
            f"At concurrency {', '.join(map(str, busy))} the load generator used >= {CLIENT_BOUND_CPU}% of a "
            "core: there the client, not only the server, limits the served figures.",
        ]
    lines += [
        "",
        "Where the server's time goes, ms per image (`oodforge_stage_seconds` of `/metrics`, warm-up "
        "included): read = body + multipart parse, decode = JPEG -> RGB, preprocess = resize + normalise "
        "(both in the decode processes or threads), queue = wait for a batch, model = forward + score "
        "(per batch / its images); model alone = `predict_pixels` in this process on batches of the "
        "level's mean server batch, same torch threads.",
        "",
        "| concurrency | " + " | ".join(STAGES) + " | model alone (batch) | model server / alone |",
        "|---:|" + "---:|" * (len(STAGES) + 2),
    ]
    for r in run.levels:
        if r.stage_ms:
            cells = " | ".join(f"{r.stage_ms[k]:.2f}" for k in STAGES)
            alone = base.model_ms(served_batch(r))
            lines.append(
                f"| {r.concurrency} | {cells} | {alone:.2f} ({served_batch(r)}) | "
                f"{r.stage_ms['model'] / alone:.2f}x |"
            )
    s = run.sustained
    if s is not None:
        growth = run.rss_after - run.rss_before
        lines += [
            "",
            f"Sustained: {args.sustain:g} s at concurrency {s.concurrency}: {s.requests} requests, "
            f"{s.images_per_s:.1f} img/s, p50 {s.pct(50):.1f} ms, p99 {s.pct(99):.1f} ms, {s.errors} errors, "
            f"mean server batch {s.mean_batch or 0:.1f}. Server RSS (process tree, VmRSS): "
            f"{run.rss_before:.0f} MiB before, {run.rss_after:.0f} MiB after ({growth:+.1f} MiB; "
            f"{run.rss_ready:.0f} MiB right after start-up).",
        ]
    lines += ["", *goals(args, run, base)]
    return "\n".join(lines)


def goals(args: argparse.Namespace, run: ServedRun, base: Baselines) -> list[str]:
    """The must-show lines: served / in-process, model time in the server, errors and RSS growth."""
    goal = next((r for r in run.levels if r.concurrency == GOAL_CONCURRENCY), None)
    if goal is None:
        return [f"Goals: not measured (concurrency {GOAL_CONCURRENCY} was not among the levels)."]
    ratio = goal.images_per_s / base.in_process
    out = [
        f"- Served / in-process pipeline >= {GOAL_RATIO} at concurrency {GOAL_CONCURRENCY}: "
        f"{verdict(ratio >= GOAL_RATIO)} ({ratio:.2f}x: {goal.images_per_s:.1f} vs {base.in_process:.1f} img/s)."
    ]
    if goal.stage_ms:
        model = goal.stage_ms["model"] / base.model_ms(served_batch(goal))
        out.append(
            f"- Model time per image in the server within {GOAL_MODEL_RATIO}x of the model alone (same batch "
            f"{served_batch(goal)}): {verdict(model <= GOAL_MODEL_RATIO)} ({model:.2f}x)."
        )
    failed = sum(r.errors for r in run.levels) + (run.sustained.errors if run.sustained else 0)
    out.append(f"- 0 errors: {verdict(failed == 0)} ({failed}).")
    if run.sustained is not None:
        growth = run.rss_after - run.rss_before
        long_enough = args.sustain >= 60
        out.append(
            f"- RSS growth <= {GOAL_RSS_MIB:g} MiB over 60 s sustained: "
            + (verdict(growth <= GOAL_RSS_MIB) if long_enough else "not measured (shorter run)")
            + f" ({growth:+.1f} MiB over {args.sustain:g} s)."
        )
    return out


# ---------------------------------------------------------------- main


def concurrency_levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--concurrency takes comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency needs positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--detectors-dir", type=Path, default=Path("runs"), help="the server's detectors_dir (runs)"
    )
    p.add_argument("--detector", default="oal", help="detector to measure (oal)")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="server port (a free one)")
    p.add_argument("--workers", type=int, default=None, help="server workers (its default: from the cores)")
    p.add_argument("--threads", type=int, default=None, help="server torch_threads (its default)")
    p.add_argument("--decode-processes", type=int, default=None, help="server decode_processes (its default)")
    p.add_argument("--decode-threads", type=int, default=None, help="server decode_threads (its default)")
    p.add_argument("--concurrency", type=concurrency_levels, default="1,8,32", help="levels (1,8,32)")
    p.add_argument("--duration", type=float, default=15.0, help="timed seconds per level (15)")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each level (2)")
    p.add_argument(
        "--sustain", type=float, default=60.0, help="seconds at the largest level; 0 skips it (60)"
    )
    p.add_argument("--images-per-request", type=int, default=1, help="images in each request (1)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server batching.max_batch_size (32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching.max_wait_ms (5)")
    p.add_argument(
        "--no-jpeg-draft", action="store_true", help="server limits.jpeg_draft=false (full decodes)"
    )
    p.add_argument("--no-access-log", action="store_true", help="no uvicorn access log")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /readyz (120)")
    p.add_argument(
        "--out", type=Path, default=BENCHMARKS_MD, help="file that gets the section (BENCHMARKS.md)"
    )
    p.add_argument("--no-write", action="store_true", help="only print the section")
    args = p.parse_args(argv)
    if args.images_per_request < 1 or args.duration <= 0 or (args.workers is not None and args.workers < 1):
        p.error("--images-per-request, --workers and --duration must be positive")
    args.port = args.port or free_port(args.host)
    return args


def measure_served(args: argparse.Namespace, photos: list[bytes], workers: int) -> ServedRun:
    """Start the server, load it level by level, stop it; the server's log tail is printed on errors."""
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        metrics_dir = Path(tmp, "prometheus") if workers > 1 else None
        if metrics_dir is not None:
            metrics_dir.mkdir()
        with ServerProcess(args, Path(tmp, "server.log"), metrics_dir) as server:
            print(f"server: {shlex.join(server.command)}", flush=True)
            ready = server.wait_ready(args.startup_timeout)
            time.sleep(0.5)
            rss_ready = rss_mib(server.pids())
            print(f"  ready, detectors {ready.get('detectors')}, RSS {rss_ready:.0f} MiB", flush=True)
            run = asyncio.run(
                serve_and_load(args, server, photos, rss_ready, list(ready.get("detectors", [])))
            )
            if any(r.errors for r in [*run.levels, run.sustained] if r is not None):
                print(f"server output (last lines):\n{server.log_tail()}", file=sys.stderr)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ".venv/bin/python -m bench.serve_bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    path = artifact_dir(args.detectors_dir.resolve() / args.detector)
    if path is None:
        print(
            f"no detector artifact at {args.detectors_dir / args.detector} (train one: make demo)",
            file=sys.stderr,
        )
        return 2
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        print(
            f"warning: the 1-minute load average is {load_at_start:.2f}: something else is (or just was) "
            "using the CPU; the figures can be far off",
            file=sys.stderr,
        )
    use = server_resources(args)
    torch.set_num_threads(use.torch_threads)
    photos = test_photos()
    seconds = min(args.duration, BARE_SECONDS)
    detector = Detector.load(path)
    print(f"in-process, {use.torch_threads} torch thread(s) (the server's), {path}:", flush=True)
    decode_ms, preprocess_ms = decode_cost(detector, photos, not args.no_jpeg_draft)
    print(f"  decode {decode_ms:.2f} ms + pre-process {preprocess_ms:.2f} ms per photo", flush=True)
    pipeline = in_process(detector, photos, seconds)
    print(f"  Detector.predict(bytes), batches of {PIPELINE_BATCH}: {pipeline:.1f} img/s", flush=True)
    pixels = server_pixels(detector, photos, not args.no_jpeg_draft)
    model = {PIPELINE_BATCH: model_alone(detector, pixels, PIPELINE_BATCH, seconds)}
    print(f"  model alone, batches of {PIPELINE_BATCH}: {model[PIPELINE_BATCH]:.1f} img/s", flush=True)

    try:
        run = measure_served(args, photos, use.workers)
    except ServerError as err:
        print(err, file=sys.stderr)
        return 2
    if run.serving["torch_threads"] != use.torch_threads:
        print(f"warning: the server uses {run.serving['torch_threads']} torch threads", file=sys.stderr)
    for r in run.levels:  # the model alone at the batch the server formed
        batch = served_batch(r)
        if batch not in model:
            model[batch] = model_alone(detector, pixels, batch, seconds)
            print(f"  model alone, batches of {batch}: {model[batch]:.1f} img/s", flush=True)
    base = Baselines(use.torch_threads, pipeline, model, decode_ms, preprocess_ms)
    failed = sum(r.errors for r in run.levels) + (run.sustained.errors if run.sustained else 0)

    body = report(args, run, base, command, load_at_start)
    print("\n" + body)
    if not args.no_write:
        write_section("serve-bench-jpeg", body, args.out)
        print(f"\nwrote the serve-bench-jpeg section of {args.out}")
    if failed:
        print(f"\n{failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
