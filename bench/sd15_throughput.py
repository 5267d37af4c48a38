"""SD-1.5 generation throughput: oodforge's Generator vs a bare diffusers StableDiffusionPipeline call.

Issue 16 item 6: with the real SD-1.5 architecture, fp16, 512x512, 50 steps, images/s of
``synth.generator.Generator.sample`` (class prompts with placeholder tokens, token substitution by boundary
embeddings, latents kept, VAE decode to PIL) next to ``StableDiffusionPipeline(prompt=..., ...)`` with the
same scheduler, steps, guidance, size and batch, in the same process, alternating rounds so that clock and
thermal drift hit both. Goal: ours within 10% of bare.

    .venv/bin/python bench/sd15_throughput.py                      # a GPU: fp16, 512x512, 50 steps
    .venv/bin/python bench/sd15_throughput.py --pretrained DIR     # a real checkpoint instead of random weights
    .venv/bin/python bench/sd15_throughput.py --device cpu --dtype float32 --size 64 --steps 2 --images 4 \\
        --no-write                                                   # a CPU smoke run of the same code

Without ``--pretrained`` it writes a random-weight SD-1.5 snapshot (``bench/real_scale_models.build_sd15``:
the real UNet/VAE/CLIP-L configs; throughput does not depend on the weights) and loads it with
``from_pretrained``, so no network is needed. Writes the ``sd15-throughput`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    from diffusers import StableDiffusionPipeline

    from bench.real_scale_models import build_sd15
    from synth.generator import DTYPES, Generator, GeneratorConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", type=Path, default=None, help="SD checkpoint dir (default: random SD-1.5)")
    p.add_argument("--work", type=Path, default=Path("/tmp/oodforge-sd15"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=32, help="images per method per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; for a CPU smoke run pass --device cpu --dtype float32 --size 64")
    model_dir = args.pretrained
    if model_dir is None:
        model_dir = args.work / "stable-diffusion-v1-5"
        if not (model_dir / "model_index.json").is_file():
            build_sd15(model_dir, bpe=None, dtype=DTYPES[args.dtype])
    cfg = GeneratorConfig(pretrained=str(model_dir), dtype=args.dtype, device=args.device, steps=args.steps,
                          guidance_scale=7.5, height=args.size, width=args.size, scheduler="pipeline")  # fmt: skip
    ours = Generator.load(cfg, CLASSES)
    bare = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=DTYPES[args.dtype], safety_checker=None, requires_safety_checker=False
    ).to(device)
    bare.set_progress_bar_config(disable=True)
    anchors = ours.anchors()

    def run_ours(n: int) -> None:
        for s in range(0, n, args.batch):
            classes = [(s + i) % len(CLASSES) for i in range(min(args.batch, n - s))]
            noise = 0.01 * torch.randn(len(classes), anchors.shape[1])
            ours.sample(classes, [s + i for i in range(len(classes))], anchors[classes] + noise)

    def run_bare(n: int) -> None:
        for s in range(0, n, args.batch):
            m = min(args.batch, n - s)
            prompts = [f"a high-quality image of a {CLASSES[(s + i) % len(CLASSES)]}" for i in range(m)]
            generators = [torch.Generator("cpu").manual_seed(s + i) for i in range(m)]
            bare(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                 width=args.size, generator=generators, output_type="pil")  # fmt: skip

    run_ours(args.batch)  # warm-up (kernels, allocator)
    run_bare(args.batch)
    rates: dict[str, list[float]] = {"oodforge Generator.sample": [], "bare StableDiffusionPipeline": []}
    for _ in range(args.rounds):
        for name, fn in (("oodforge Generator.sample", run_ours), ("bare StableDiffusionPipeline", run_bare)):
            sync(device)
            t = time.perf_counter()
            fn(args.images)
            sync(device)
            rates[name].append(args.images / (time.perf_counter() - t))
    mean = {k: statistics.fmean(v) for k, v in rates.items()}
    ratio = mean["oodforge Generator.sample"] / mean["bare StableDiffusionPipeline"]
    rows = [f"| {k} | {mean[k]:.3f} ± {statistics.pstdev(v):.3f} |" for k, v in rates.items()]
    text = f"""## SD-1.5 generation throughput: ours vs bare diffusers (issue 16)

Measured {today()} on {machine()}; `.venv/bin/python bench/sd15_throughput.py {" ".join(sys.argv[1:])}`.
SD-1.5 architecture ({"random weights" if args.pretrained is None else args.pretrained}), {args.dtype}, {args.size}x{args.size},
{args.steps} steps of the checkpoint's scheduler, CFG 7.5, batch {args.batch}, {args.images} images per method per
round, {args.rounds} alternating rounds (mean ± std over rounds), VAE decode to PIL included in both.

| path | images/s |
|---|---:|
{chr(10).join(rows)}

Ours / bare: **{ratio:.2f}x** (goal ≥ 0.90x).
"""
    print(text)
    if not args.no_write:
        write_section("sd15-throughput", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
