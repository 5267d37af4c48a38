"""Serving benchmark -> BENCHMARKS.md: a real uvicorn server under load vs the bare model.

    .venv/bin/python -m bench.serve_bench --no-write            # ~4 min on 2 cores; prints the section
    .venv/bin/python -m bench.serve_bench --duration 2 --sustain 3 --concurrency 1,8 --no-write   # smoke

1. Test images: 640x480 JPEG photos (quality 90), random crops of the skimage photos (astronaut, coffee,
   chelsea, rocket, ...) resized to 640x480, each encoded once; ``N_BODIES`` distinct ones.
2. Bare baseline, in this process before the server starts: the same photos decoded and pre-processed
   once, exactly as the server does (``limits.jpeg_draft`` included), then ``Detector.predict_pixels``
   on batches of the size the server can form at that level (the model alone; no decode, no HTTP).
   Also measured: decode and pre-processing alone, one image at a time on one thread.
3. Starts ``python -m uvicorn api.app:app`` on a free port (settings through ``OODFORGE_*``), waits for
   ``/readyz``, and always stops it at the end.
4. For each concurrency level: that many asyncio workers (one keep-alive connection each, raw HTTP/1.1
   with pre-built requests, the lightest load generator) POST ``/score`` back to back (multipart
   ``files``, bodies encoded once) for ``--duration`` seconds after a warm-up; images/s, requests/s,
   p50/p99 latency, errors, the server's mean batch size and where its time went (the
   ``oodforge_stage_seconds`` histograms of ``/metrics``: read, decode, preprocess, queue, model,
   respond), and how much CPU the server and the client used. The client shares the machine's cores
   with the server, so served figures include the load generator's own cost.
5. Sustained load at the largest level for ``--sustain`` seconds: zero errors expected; the server's
   resident memory (VmRSS of its process tree, from /proc) before and after.

Exit status 1 if any request failed.
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
from api.settings import Limits  # noqa: E402
from api.uploads import decode_one  # noqa: E402
from bench.common import BENCHMARKS_MD, machine, write_section  # noqa: E402
from oodforge.detector import Detector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.8
GOAL_CONCURRENCY = 32
CLIENT_BOUND_CPU = 90  # % of one core: above this the single-process load generator is the bottleneck
N_BODIES = 64  # distinct request bodies cycled through by the workers
BARE_SECONDS = 5.0  # the bare model's throughput is steady: at most this long per batch size and thread count
OWN_ENV = (  # the server settings this script sets; other OODFORGE_* variables are inherited (and reported)
    "OODFORGE_DETECTORS_DIR", "OODFORGE_DEFAULT_DETECTOR", "OODFORGE_BATCHING__MAX_BATCH_SIZE",
    "OODFORGE_BATCHING__MAX_WAIT_MS", "OODFORGE_TORCH_THREADS", "OODFORGE_LIMITS__JPEG_DRAFT",
    "OODFORGE_DECODE_THREADS",
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


def bare_throughput(detector: Detector, pixels: torch.Tensor, batch: int, seconds: float) -> float:
    """Images/s of ``Detector.predict_pixels`` alone on already pre-processed batches of ``batch``."""
    cursor = 0

    def one_batch() -> None:
        nonlocal cursor
        rows = [(cursor + k) % len(pixels) for k in range(batch)]
        cursor += batch
        detector.predict_pixels(pixels[rows])

    warm, warm_until = 0, time.perf_counter() + min(1.0, seconds)
    while warm < 2 or time.perf_counter() < warm_until:  # warm-up: 2 batches and 1 s at least
        one_batch()
        warm += 1
    done, start = 0, time.perf_counter()
    while done < 3 or time.perf_counter() - start < seconds:
        one_batch()
        done += 1
    return done * batch / (time.perf_counter() - start)


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


class ServerProcess:
    """``python -m uvicorn api.app:app`` as a child process; a context manager that always stops it."""

    def __init__(self, args: argparse.Namespace, log_path: Path, metrics_dir: Path | None):
        self.args = args
        self.url = f"http://{args.host}:{args.port}"
        self.log_path = log_path
        self.command = [
            sys.executable, "-m", "uvicorn", "api.app:app",
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
        ]  # fmt: skip
        if args.no_access_log:
            self.command.append("--no-access-log")
        self.env = dict(os.environ)
        self.env.update(
            {
                "OODFORGE_DETECTORS_DIR": str(args.detectors_dir.resolve()),
                "OODFORGE_DEFAULT_DETECTOR": args.detector,
                "OODFORGE_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size),
                "OODFORGE_BATCHING__MAX_WAIT_MS": str(args.max_wait_ms),
                "OODFORGE_LIMITS__JPEG_DRAFT": "false" if args.no_jpeg_draft else "true",
            }
        )
        if args.threads:
            self.env["OODFORGE_TORCH_THREADS"] = str(args.threads)
        if args.decode_threads:
            self.env["OODFORGE_DECODE_THREADS"] = str(args.decode_threads)
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


async def serve_and_load(
    args: argparse.Namespace, server: ServerProcess, photos: list[bytes], rss_ready: float, loaded: list[str]
) -> ServedRun:
    """Every load level, then the sustained load at the largest one, through one httpx client."""
    bodies = multipart_bodies(photos, args.images_per_request)
    top = max(args.concurrency)
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
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
    return ServedRun(levels, sustained, rss_ready, rss_before, rss_after, loaded)


def describe(r: LoadResult) -> str:
    batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
    text = (
        f"{r.images_per_s:.1f} img/s, {r.requests_per_s:.1f} req/s, p50 {r.pct(50):.1f} ms, "
        f"p99 {r.pct(99):.1f} ms, {r.errors} errors, mean batch {batch}, "
        f"CPU server {r.server_cpu:.0f}% / client {r.client_cpu:.0f}%"
    )
    return text + "".join(f"\n    error: {e}" for e in r.error_samples)


# ---------------------------------------------------------------- report


def versions() -> str:
    out = []
    for pkg in ("fastapi", "uvicorn", "starlette", "httpx"):  # torch: in machine()
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{pkg} {metadata.version(pkg)}")
    return ", ".join(out)


def bare_batch(c: int, args: argparse.Namespace) -> int:
    """The largest batch the server can form at concurrency ``c``."""
    return min(c * args.images_per_request, args.max_batch_size)


def report(
    args: argparse.Namespace,
    run: ServedRun,
    bare: dict[int, float],
    bare_threads: dict[int, int],
    costs: tuple[float, float],
    command: str,
    load_at_start: float,
) -> str:
    threads = args.threads or f"torch default ({torch.get_num_threads()} in this process)"
    inherited = sorted(k for k in os.environ if k.startswith("OODFORGE_") and k not in OWN_ENV)
    lines = [
        "## Serving: HTTP throughput and latency on 640x480 JPEG photos vs the bare model",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; {versions()}; "
        f"1-minute load average at the start {load_at_start:.2f}.",
        f"Command: `{command}`.",
        "",
        f"Server: `python -m uvicorn api.app:app --workers {args.workers}`"
        + (" --no-access-log" if args.no_access_log else " (access log on)")
        + f", detector `{args.detector}` from `{args.detectors_dir}` (loaded: {', '.join(run.loaded)}), "
        f"micro-batching `max_batch_size={args.max_batch_size}`, `max_wait_ms={args.max_wait_ms:g}`, "
        f"`limits.jpeg_draft={'false' if args.no_jpeg_draft else 'true'}`, torch threads: {threads}, "
        f"decode threads: {args.decode_threads or 'default (cores / workers)'}"
        + (f"; inherited environment: {', '.join(inherited)}" if inherited else "")
        + ".",
        f"Load: N concurrent asyncio workers, one keep-alive HTTP/1.1 connection each (raw pre-built requests), "
        f"each POSTing multipart `/score` with "
        f"{args.images_per_request} image(s) per request ({N_BODIES} distinct 640x480 JPEG photos, quality 90, "
        f"random crops of skimage's {', '.join(PHOTOS)}; bodies encoded once) back to back for "
        f"{args.duration:g} s after a {args.warmup:g} s warm-up. "
        f"**The load generator runs on the same {os.cpu_count()} cores as the server**: served figures "
        "include its CPU cost (CPU column: % of one core used by the server / by the client; mean server "
        "batch: images per forward pass, from `/metrics`, warm-up included).",
        "Bare: in the benchmark process, before the server starts: the same photos decoded and "
        "pre-processed once as the server does, then `Detector.predict_pixels` (forward + score) alone on "
        "batches of min(concurrency x images/request, max_batch_size), the largest batch the server can form, "
        f"for {min(args.duration, BARE_SECONDS):g} s "
        + (
            f"with {args.threads} torch thread(s) (--threads, as the server)"
            if args.threads
            else "with torch's default threads and with one thread, the faster counted"
        )
        + " (bare column: img/s (batch, torch threads)); no decode, no HTTP. "
        f"For scale: decoding one photo takes {costs[0]:.2f} ms and pre-processing it {costs[1]:.2f} ms on one "
        "thread of this process (the server's settings).",
        "",
        "| concurrency | served img/s | req/s | p50 ms | p99 ms | errors | mean server batch "
        "| CPU % server / client | bare img/s (batch) | served/bare |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run.levels:
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else "-"
        b = bare[r.concurrency]
        lines.append(
            f"| {r.concurrency} | {r.images_per_s:.1f} | {r.requests_per_s:.1f} | {r.pct(50):.1f} | "
            f"{r.pct(99):.1f} | {r.errors} | {batch} | {r.server_cpu:.0f} / {r.client_cpu:.0f} | "
            f"{b:.1f} ({bare_batch(r.concurrency, args)}, {bare_threads[r.concurrency]}t) | "
            f"{r.images_per_s / b:.2f}x |"
        )
    lines.append("")
    busy = [r.concurrency for r in run.levels if r.client_cpu >= CLIENT_BOUND_CPU]
    if busy:
        lines += [
            f"At concurrency {', '.join(map(str, busy))} the load generator (one Python process) used "
            f">= {CLIENT_BOUND_CPU}% of a core: there the client, not only the server, limits the served figures.",
            "",
        ]
    goal = next((r for r in run.levels if r.concurrency == GOAL_CONCURRENCY), None)
    if goal is None:
        lines.append(
            f"Goal (served >= {GOAL_RATIO} x bare at concurrency {GOAL_CONCURRENCY}): not measured, "
            f"concurrency {GOAL_CONCURRENCY} was not among the levels."
        )
    else:
        ratio = goal.images_per_s / bare[GOAL_CONCURRENCY]
        verdict = "**met**" if ratio >= GOAL_RATIO else "**not met**"
        lines.append(
            f"Goal (served >= {GOAL_RATIO} x bare at concurrency {GOAL_CONCURRENCY}): {verdict} ({ratio:.2f}x)."
        )
    lines += [
        "",
        "Where the server's time goes, in ms per image (`oodforge_stage_seconds` from `/metrics`, warm-up "
        "included): read = body read + multipart parse, decode = JPEG -> RGB, preprocess = resize + normalise, "
        "queue = wait for a batch to start, model = forward + score (per batch, shared by its images), "
        "respond = JSON. Decode and preprocess run in the decode threads, in parallel with each other; "
        "latency minus these stages is uvicorn/ASGI/event-loop time and waiting for the loop.",
        "",
        "| concurrency | " + " | ".join(STAGES) + " | sum of stages | p50 latency |",
        "|---:|" + "---:|" * (len(STAGES) + 2),
    ]
    for r in run.levels:
        if r.stage_ms:
            cells = " | ".join(f"{r.stage_ms[k]:.2f}" for k in STAGES)
            lines.append(f"| {r.concurrency} | {cells} | {sum(r.stage_ms.values()):.2f} | {r.pct(50):.2f} |")
    s = run.sustained
    if s is not None:
        batch = f"{s.mean_batch:.1f}" if s.mean_batch is not None else "-"
        zero = "**0 errors**" if s.errors == 0 else f"**{s.errors} errors**"
        lines += [
            "",
            f"Sustained load: {args.sustain:g} s at concurrency {s.concurrency}: {s.requests} requests, "
            f"{s.images_per_s:.1f} img/s, p50 {s.pct(50):.1f} ms, p99 {s.pct(99):.1f} ms, {zero}, "
            f"mean server batch {batch} images. Server RSS (process tree, VmRSS): {run.rss_before:.0f} MiB "
            f"before, {run.rss_after:.0f} MiB after ({run.rss_after - run.rss_before:+.0f} MiB; "
            f"{run.rss_ready:.0f} MiB right after startup).",
        ]
    return "\n".join(lines)


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
    p.add_argument("--detector", default="oal", help="detector to measure, bare and served (oal)")
    p.add_argument("--host", default="127.0.0.1", help="address the server binds (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="server port (a free one)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (1)")
    p.add_argument("--concurrency", type=concurrency_levels, default="1,8,32", help="levels (1,8,32)")
    p.add_argument(
        "--duration", type=float, default=15.0, help="timed seconds per level, bare and served (15)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each served level (2)")
    p.add_argument(
        "--sustain", type=float, default=60.0, help="seconds at the largest level; 0 skips it (60)"
    )
    p.add_argument("--images-per-request", type=int, default=1, help="images in each request (1)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server batching.max_batch_size (32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching.max_wait_ms (5)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, server and bare (torch's choice)"
    )
    p.add_argument("--decode-threads", type=int, default=None, help="server decode_threads (cores / workers)")
    p.add_argument(
        "--no-jpeg-draft", action="store_true", help="server limits.jpeg_draft=false (full decodes)"
    )
    p.add_argument("--no-access-log", action="store_true", help="pass --no-access-log to uvicorn")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /readyz (120)")
    p.add_argument(
        "--out", type=Path, default=BENCHMARKS_MD, help="file that gets the section (BENCHMARKS.md)"
    )
    p.add_argument("--no-write", action="store_true", help="only print the section")
    args = p.parse_args(argv)
    if args.images_per_request < 1 or args.workers < 1 or args.duration <= 0:
        p.error("--images-per-request, --workers and --duration must be positive")
    args.port = args.port or free_port(args.host)
    return args


def measure_served(args: argparse.Namespace, photos: list[bytes]) -> ServedRun:
    """Start the server, load it level by level, stop it; the server's log tail is printed on errors."""
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        metrics_dir = Path(tmp, "prometheus") if args.workers > 1 else None
        if metrics_dir is not None:
            metrics_dir.mkdir()
        with ServerProcess(args, Path(tmp, "server.log"), metrics_dir) as server:
            print(f"server: {shlex.join(server.command)}", flush=True)
            ready = server.wait_ready(args.startup_timeout)
            time.sleep(0.5)
            rss_ready = rss_mib(server.pids())
            print(f"  ready, detectors {ready.get('detectors')}, RSS {rss_ready:.0f} MiB", flush=True)
            print(
                f"served load (client on the same {os.cpu_count()} cores as the server), "
                f"{args.warmup:g} s warm-up + {args.duration:g} s per level:",
                flush=True,
            )
            run = asyncio.run(
                serve_and_load(args, server, photos, rss_ready, list(ready.get("detectors", [])))
            )
            if any(r.errors for r in [*run.levels, run.sustained] if r is not None):
                print(f"server output (last lines):\n{server.log_tail()}", file=sys.stderr)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ".venv/bin/python -m bench.serve_bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
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
            "using the CPU; with torch's threads competing for cores the figures can be far off",
            file=sys.stderr,
        )
    photos = test_photos()

    print(f"bare Detector.predict_pixels ({path}), {args.duration:g} s per batch size:", flush=True)
    detector = Detector.load(path)
    costs = decode_cost(detector, photos, not args.no_jpeg_draft)
    print(f"  decode {costs[0]:.2f} ms + pre-process {costs[1]:.2f} ms per photo (one thread)", flush=True)
    pixels = server_pixels(detector, photos, not args.no_jpeg_draft)
    default_threads = torch.get_num_threads()
    thread_counts = [args.threads] if args.threads else sorted({default_threads, 1})
    bare, bare_threads = {}, {}
    for c in args.concurrency:
        for threads in thread_counts:  # the model's best: torch's default or one thread
            torch.set_num_threads(threads)
            rate = bare_throughput(detector, pixels, bare_batch(c, args), min(args.duration, BARE_SECONDS))
            print(f"  batch {bare_batch(c, args)}, {threads} torch thread(s): {rate:.1f} img/s", flush=True)
            if rate > bare.get(c, 0.0):
                bare[c], bare_threads[c] = rate, threads
    torch.set_num_threads(args.threads or default_threads)
    del detector, pixels

    try:
        run = measure_served(args, photos)
    except ServerError as err:
        print(err, file=sys.stderr)
        return 2
    failed = sum(r.errors for r in run.levels) + (run.sustained.errors if run.sustained else 0)

    body = report(args, run, bare, bare_threads, costs, command, load_at_start)
    print("\n" + body)
    if not args.no_write:
        write_section("serve-bench", body, args.out)
        print(f"\nwrote the serve-bench section of {args.out}")
    if failed:
        print(f"\n{failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
