"""Synthesis benchmarks -> BENCHMARKS.md: FAISS vs brute-force numpy kNN filtering, and images/s.

    .venv/bin/python bench/synth_bench.py [--generator runs/generator] [--images 64]

1. ID-near filtering cost: k-th NN distance of 20,000 queries against a 100,000 x 64 bank, with the
   FAISS path the filter uses and with a chunked brute-force numpy computation, in one run, as a ratio.
2. Generation throughput of the embedded generator (decoded images/s, batch 32) if it exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402
from oodforge.knn import kth_distance  # noqa: E402


def numpy_kth(queries: np.ndarray, bank: np.ndarray, k: int, chunk: int = 1000) -> np.ndarray:
    """Brute force: squared distances by ||q||^2 - 2 q.b + ||b||^2, partial sort for the k-th."""
    bank_sq = (bank**2).sum(1)
    out = np.empty(len(queries), dtype=np.float32)
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk]
        d = (q**2).sum(1)[:, None] - 2 * q @ bank.T + bank_sq[None, :]
        out[s : s + chunk] = np.sqrt(np.maximum(np.partition(d, k - 1, axis=1)[:, k - 1], 0))
    return out


def faiss_vs_numpy(n_bank: int = 100_000, n_query: int = 20_000, dim: int = 64, k: int = 50) -> dict:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((n_bank, dim)).astype(np.float32)
    queries = rng.standard_normal((n_query, dim)).astype(np.float32)
    t = time.perf_counter()
    fast = kth_distance(queries, bank, k)
    t_faiss = time.perf_counter() - t
    t = time.perf_counter()
    slow = numpy_kth(queries, bank, k)
    t_numpy = time.perf_counter() - t
    return {
        "faiss_s": t_faiss,
        "numpy_s": t_numpy,
        "ratio": t_numpy / t_faiss,
        "max_abs_diff": float(np.abs(fast - slow).max()),
        "shape": f"{n_bank} x {dim} bank, {n_query} queries, k={k}",
    }


def generation_rate(generator_dir: str, n: int, batch: int = 32) -> dict | None:
    from synth.generator import Generator, GeneratorConfig, read_card

    card = read_card(generator_dir)
    if card is None:
        return None
    gen = Generator.load(GeneratorConfig(pretrained=generator_dir), card["class_names"])
    gen.sample([0] * 4, list(range(4)))  # warm-up
    t, done = time.perf_counter(), 0
    while done < n:
        m = min(batch, n - done)
        classes = [(done + i) % len(gen.class_names) for i in range(m)]
        gen.sample(classes, [done + i for i in range(m)], gen.anchors()[classes])
        done += m
    return {"images_per_s": n / (time.perf_counter() - t), "n": n, "steps": gen.cfg.steps, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", default="runs/generator")
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    knn = faiss_vs_numpy()
    lines = [
        "## Synthesis: FAISS filtering and generation speed",
        "",
        f"Measured {today()} on {machine()}. Command: `.venv/bin/python bench/synth_bench.py`.",
        "",
        f"- ID-near filter kNN ({knn['shape']}): FAISS `IndexFlatL2` {knn['faiss_s']:.2f} s vs chunked "
        f"brute-force numpy {knn['numpy_s']:.2f} s in the same run: **FAISS {knn['ratio']:.1f}x faster** "
        f"(largest distance difference {knn['max_abs_diff']:.1e}).",
    ]
    rate = generation_rate(args.generator, args.images)
    if rate:
        lines.append(
            f"- Embedded generator ({args.generator}): **{rate['images_per_s']:.1f} images/s** "
            f"({rate['n']} images, batch {rate['batch']}, {rate['steps']} DPM-Solver steps, CFG, VAE decode)."
        )
    else:
        lines.append(f"- Generation speed not measured: no generator at {args.generator}.")
    if not torch.cuda.is_available():
        lines.append(
            "- SD 1.5-architecture pipeline (fp16, 512x512) on a GPU: not measured, no GPU was lent to this "
            "run; CPU figures only."
        )
    write_section("synth", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
