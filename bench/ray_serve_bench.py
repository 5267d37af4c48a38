"""Ray Serve throughput with 1 and 2 replicas on a local two-node Ray cluster -> BENCHMARKS.md.

    python -m bench.ray_serve_bench [--detectors DIR] [--duration 20] [--concurrency 8] [--write]

A ``ray.cluster_utils.Cluster`` with two nodes of one CPU each (both on this host); ``api.ray_serve``
deploys the app with one replica, then with two (one per node); for each, ``--concurrency`` asyncio
clients POST ``/score`` (one 640x480 JPEG photo per request, bodies encoded once) back to back for
``--duration`` seconds after a warm-up. One run; the client, Ray's proxy and the replicas share this
host's cores, so the ratio says whether the second replica takes work, not what a second host gives.
Prints one JSON line; ``--write`` also writes the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from api import ray_serve  # noqa: E402
from api.settings import load_settings  # noqa: E402
from bench.common import machine, today, write_section  # noqa: E402
from bench.serve_bench import free_port, test_photos  # noqa: E402

DEFAULT_DETECTORS = REPO / "oodforge" / "assets" / "detectors" / "mnist-open"


async def load(
    url: str, photos: list[bytes], concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    """``concurrency`` clients posting one photo per request; images/s and latency in the timed window."""
    start = time.perf_counter() + warmup
    stop = start + duration
    latencies: list[float] = []
    errors = 0

    async def client(i: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            j = i
            while time.perf_counter() < stop:
                t = time.perf_counter()
                response = await http.post("/score", files={"files": ("p.jpg", photos[j % len(photos)])})
                j += concurrency
                if response.status_code != 200:
                    errors += 1
                elif t >= start and time.perf_counter() <= stop:
                    latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    ms = np.array(latencies) * 1000
    return {
        "images_per_s": round(len(latencies) / duration, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "errors": errors,
    }


def main() -> None:
    """Measure 1 and 2 replicas and print the JSON line."""
    import ray
    from ray.cluster_utils import Cluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", type=Path, default=DEFAULT_DETECTORS)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    settings = load_settings(overrides=[f"detectors_dir={args.detectors}"])
    photos = test_photos(16)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"concurrency": args.concurrency, "duration_s": args.duration}
    try:
        for replicas in (1, 2):
            ray_serve.run(settings, replicas=replicas, cpus_per_replica=1, port=port)
            result[f"replicas_{replicas}"] = asyncio.run(
                load(url, photos, args.concurrency, args.warmup, args.duration)
            )
    finally:
        ray_serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    one, two = result["replicas_1"]["images_per_s"], result["replicas_2"]["images_per_s"]
    result["ratio_2_vs_1"] = round(two / one, 2) if one else None
    print(json.dumps(result))
    if args.write:
        r1, r2 = result["replicas_1"], result["replicas_2"]
        write_section(
            "ray_serve",
            f"""## Ray Serve: 1 vs 2 replicas on a local two-node Ray cluster (issue 25)

`python -m bench.ray_serve_bench --write` ({today()}; {machine()}; **the 2 cores were shared with other
jobs**; one run). `ray.cluster_utils.Cluster` with two nodes of one CPU each on this host, the
`mnist-open` CE detector, {args.concurrency} clients posting one 640x480 JPEG per request for
{args.duration:.0f} s through Ray's HTTP proxy.

| replicas | images/s | p50 ms | p99 ms | errors |
|---|---|---|---|---|
| 1 | {r1["images_per_s"]} | {r1["p50_ms"]} | {r1["p99_ms"]} | {r1["errors"]} |
| 2 (one per node) | {r2["images_per_s"]} | {r2["p50_ms"]} | {r2["p99_ms"]} | {r2["errors"]} |

Ratio 2 / 1 replicas: **{result["ratio_2_vs_1"]}x**. The load generator, Ray's proxies and both replicas
share this host's cores, so the ratio is bounded by the host, not by Serve; it does not show what a
second host would add.
""",
        )


if __name__ == "__main__":
    main()
