"""Two machines on one host: outlier generation and OAL training under ``accelerate launch --num_machines 2``.

    python -m bench.multinode [--work DIR] [--pixel 240] [--epochs 2] [--write]

Every "machine" is its own ``accelerate launch --num_machines 2 --machine_rank R --main_process_ip
127.0.0.1 --main_process_port P`` (gloo on CPU, one process each, ``OMP_NUM_THREADS=1`` so that a rank
is one core), exactly the command a user runs on each of two hosts; ``--out`` / ``output_dir`` is a
directory both see (on two real hosts: a shared filesystem).

Generation (tiny untrained SD pipeline and teacher, built here, no download):
  1 rank | 1 machine x 2 processes | 2 machines | 2 machines with rank 1 killed mid-run, then both
  relaunched. ``identical`` compares every record (ids and metadata), latent tensor and PNG byte of the
  datasets written with 2 ranks (however they were placed and interrupted). The 1-rank run decodes other
  candidates by design (each rank fills its own share of ``counts.pixel``), so it is timed, not compared.
OAL training on the 2-machine outliers:
  1 rank (batch 64) | 2 machines (batch 32 each: the same global batch) | 2 machines with rank 1 killed
  after a checkpoint and both relaunched with ``--resume``. Bit-level comparisons: resumed vs
  uninterrupted 2-machine weights; 1 vs 2 ranks differ by batch statistics (BatchNorm, CLUB, per-rank
  means), so their ID accuracy and AUROC are compared within ``TRAIN_TOLERANCE``.

Prints one JSON line; ``--write`` also writes the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CLASSES = [str(d) for d in range(6)]
TINY_NET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
TRAIN_TOLERANCE = 0.05  # |1-rank - 2-rank| on ID accuracy and on near/far AUROC (fractions)
KILL_WAIT_S = 30  # after rank 1 is killed, how long rank 0 may take to notice before it is stopped too


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(machines: int, processes: int, rank: int = 0, port: int = 0) -> list[str]:
    """The ``accelerate launch`` prefix for one machine of ``machines`` (``processes`` in all)."""
    cmd = [ACCELERATE, "launch", "--num_machines", str(machines), "--num_processes", str(processes),
           "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    if processes > 1:
        cmd.append("--multi_gpu")  # accelerate's name for "distributed"; on CPU it means gloo
    if machines > 1:
        cmd += [
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
        ]
    return cmd


def env() -> dict[str, str]:
    """The environment of every rank: this checkout importable, one thread per rank."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group with its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_machines(tail: list[str], machines: int, log: Path) -> list[subprocess.Popen]:
    """One launch per machine (rank 0 first), each running ``tail`` (the program and its arguments)."""
    if machines == 1:
        return [start([*launcher(1, 1), *tail], log)]
    port = free_port()
    return [
        start([*launcher(machines, machines, rank, port), *tail], log.with_name(f"{log.stem}-rank{rank}.log"))
        for rank in range(machines)
    ]


def wait_all(procs: list[subprocess.Popen], what: str, timeout: float = 900) -> None:
    """Wait for every launch; a non-zero exit raises with the log names."""
    deadline = time.time() + timeout
    for proc in procs:
        rc = proc.wait(timeout=max(1, deadline - time.time()))
        if rc != 0:
            raise RuntimeError(f"{what}: a launch exited with {rc}; see the logs ({proc.args[-1]} ...)")


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and every process under it, as a machine that loses power.

    torchrun starts each worker in a session of its own, so killing the launcher's process group would
    leave the worker running: the descendants are collected first and killed one by one.
    """
    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


def kill_rank1_when(procs: list[subprocess.Popen], ready: Any, what: str, timeout: float = 600) -> float:
    """Kill machine 1 once ``ready()`` holds; machine 0 then fails (or is stopped). Returns seconds to kill."""
    started = time.time()
    while not ready():
        if time.time() - started > timeout or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{what}: the run ended or stalled before rank 1 could be killed")
        time.sleep(0.05)
    stop(procs[1])
    try:  # rank 0 sees its peer's sockets close; stop it if it still waits
        procs[0].wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        stop(procs[0])
    return time.time() - started


# --------------------------------------------------------------------------- assets


def tiny_assets(root: Path) -> dict[str, Path]:
    """A saved tiny SD pipeline, an untrained cosine-head teacher and a tiny CE detector (OAL's start)."""
    from diffusers import StableDiffusionPipeline

    from oodforge.backbones import BackboneConfig, HeadConfig, build_classifier
    from oodforge.data.transforms import Preprocess
    from oodforge.detector import ClassifierDetector
    from oodforge.scores import build_score
    from synth.embedded import TinySDConfig, build_components
    from synth.generator import CARD_FILE, Generator, GeneratorConfig

    out = {"gen": root / "gen", "teacher": root / "teacher", "ce": root / "ce"}
    if all((p / ("model_index.json" if k == "gen" else "detector.json")).is_file() for k, p in out.items()):
        return out
    torch.manual_seed(0)
    sd = TinySDConfig(vae_channels=[16, 16], unet_channels=[16, 32], unet_attention_head_dim=8, text_width=32)
    parts = build_components(sd, CLASSES, root / "work")
    StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(out["gen"])
    (out["gen"] / CARD_FILE).write_text(json.dumps({"class_names": CLASSES}))
    anchors = Generator.load(GeneratorConfig(pretrained=str(out["gen"])), CLASSES).anchors()
    teacher = build_classifier(
        BackboneConfig(options=TINY_NET, head=HeadConfig(name="cosine")), 6, anchors=anchors
    )
    ce = build_classifier(BackboneConfig(options=TINY_NET), 6)
    for name, model in (("teacher", teacher), ("ce", ce)):
        ClassifierDetector.create(name=name, model=model.eval(), score=build_score("energy"), preprocess=Preprocess(),
                                  class_names=CLASSES, val_scores=np.zeros(1)).save(out[name])  # fmt: skip
    return out


def synth_config(
    assets: dict[str, Path], pixel: int, path: Path, steps: int = 8, quantile: float = 0.99
) -> Path:
    """A tiny ``generate`` config (8 denoising steps, batches of 4, ~5% rejected) written to ``path``."""
    cfg = {
        "teacher": str(assets["teacher"]),
        "generator": {"pretrained": str(assets["gen"]), "steps": steps, "guidance_scale": 2.0},
        "sampler": {"k": 20, "select": 10, "n_candidates": 50},
        "filter": {"k": 10, "quantile": quantile},
        "counts": {"knn_per_class": 8, "pixel": pixel, "batch_size": 4},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- comparing


def dataset_digest(root: Path) -> dict[str, Any]:
    """What must match between two runs: every record, every latent tensor, every PNG's bytes."""
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    latents = load_file(str(root / "latents.safetensors"))
    images = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "images").glob("*.png"))
    }
    return {"records": records, "latents": latents, "images": images}


def same_dataset(a: Path, b: Path) -> bool:
    """Whether two outlier datasets hold the same records, latents (bit for bit) and images (byte for byte)."""
    da, db = dataset_digest(a), dataset_digest(b)
    return (
        da["records"] == db["records"]
        and da["images"] == db["images"]
        and da["latents"].keys() == db["latents"].keys()
        and all(torch.equal(da["latents"][k], db["latents"][k]) for k in da["latents"])
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported detector's tensors."""
    return load_file(str(run_dir / "detector" / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two runs' exported weights (inf when the keys differ)."""
    wa, wb = weights(a), weights(b)
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


def headline(run_dir: Path) -> dict[str, float]:
    """ID accuracy and the exported score's mean near / far AUROC from ``report.json``."""
    report = json.loads((run_dir / "report.json").read_text())
    per = report["scores"][report["score"]]
    return {
        "id_accuracy": report["id_accuracy"],
        "near_auroc": per["near"]["auroc"],
        "far_auroc": per["far"]["auroc"],
    }


# --------------------------------------------------------------------------- the runs


def generation(work: Path, assets: dict[str, Path], pixel: int) -> dict[str, Any]:
    """Generate with 1 rank, 1 machine x 2, 2 machines, and 2 machines killed + resumed; compare."""
    cfg = synth_config(assets, pixel, work / "synth.yaml")
    runs = {"one_rank": 1, "one_machine_two_processes": 2, "two_machines": 2, "two_machines_killed": 2}
    times: dict[str, float] = {}
    for name in runs:
        out = work / "gen" / name
        tail = ["-m", "synth", "generate", "--config", str(cfg), "--out", str(out)]
        log = work / "logs" / f"gen-{name}.log"
        started = time.perf_counter()
        if name == "one_machine_two_processes":
            procs = [start([*launcher(1, 2), *tail], log)]
        else:
            procs = start_machines(tail, 1 if name == "one_rank" else 2, log)
        if name == "two_machines_killed":
            journal = out / "parts" / "metadata-1.jsonl"

            def ready(journal: Path = journal) -> bool:
                return journal.is_file() and journal.read_text().count('"pool": "pixel"') >= max(
                    2, pixel // 6
                )

            kill_rank1_when(procs, ready, "generation")
            assert not (out / "card.json").exists(), "the killed run finished anyway; raise --pixel"
            procs = start_machines(tail, 2, log.with_name(f"gen-{name}-resumed.log"))
        wait_all(procs, f"generation {name}")
        times[name] = round(time.perf_counter() - started, 1)
    gen = work / "gen"
    checks = {
        "two_machines_vs_one_machine": same_dataset(gen / "two_machines", gen / "one_machine_two_processes"),
        "killed_and_resumed_vs_uninterrupted": same_dataset(
            gen / "two_machines_killed", gen / "two_machines"
        ),
    }
    card = json.loads((gen / "two_machines" / "card.json").read_text())
    return {
        "identical": all(checks.values()),
        "checks": checks,
        "seconds": times,
        "speedup_2_vs_1_rank": round(times["one_rank"] / times["two_machines"], 2),
        "counts": card["counts"],
    }


def training(work: Path, assets: dict[str, Path], outliers: Path, epochs: int) -> dict[str, Any]:
    """OAL with 1 rank and 2 machines, and 2 machines killed after a checkpoint and resumed; compare."""
    runs_dir = work / "train"

    def tail(name: str, batch: int, resume: bool = False) -> list[str]:
        items = [f"name={name}", f"output_dir={runs_dir}", f"model.options={json.dumps(TINY_NET)}",
                 f"train.batch_size={batch}", "train.eval_batch_size=1024", f"train.epochs={epochs}",
                 "train.checkpoint_every_steps=5", "eval.plots=false", "eval.scores=[energy, msp]",
                 "export.score=energy", f"method_args.teacher={assets['teacher']}",
                 f"method_args.outliers={outliers}", f"init_from={assets['ce']}"]  # fmt: skip
        args = ["trainer/train_oal.py", "--config", "configs/train/oal.yaml"]
        for item in items:
            args += ["--set", item]
        return args + (["--resume"] if resume else [])

    times: dict[str, float] = {}
    plan = {"one_rank": (1, 64), "one_machine_two_processes": (1, 32), "two_machines": (2, 32),
            "two_machines_killed": (2, 32)}  # fmt: skip
    killed_after = None
    for name, (machines, batch) in plan.items():
        log = work / "logs" / f"train-{name}.log"
        started = time.perf_counter()
        if name == "one_machine_two_processes":  # the same world size as two machines, one launch
            procs = [start([*launcher(1, 2), *tail(name, batch)], log)]
        else:
            procs = start_machines(tail(name, batch), machines, log)
        if name == "two_machines_killed":
            ckpts = runs_dir / name / "checkpoints"
            kill_rank1_when(procs, lambda ckpts=ckpts: (ckpts / "step_0000010").is_dir(), "training")
            assert not (runs_dir / name / "detector").exists(), "the killed run finished anyway"
            killed_after = sorted(p.name for p in ckpts.glob("step_*"))[-1]
            procs = start_machines(
                tail(name, batch, resume=True), 2, log.with_name(f"train-{name}-resumed.log")
            )
        wait_all(procs, f"training {name}")
        times[name] = round(time.perf_counter() - started, 1)
    resumed_diff = max_weight_diff(runs_dir / "two_machines_killed", runs_dir / "two_machines")
    layout_diff = max_weight_diff(runs_dir / "two_machines", runs_dir / "one_machine_two_processes")
    one, two = headline(runs_dir / "one_rank"), headline(runs_dir / "two_machines")
    metric_diff = {k: round(abs(one[k] - two[k]), 4) for k in one}
    return {
        "resumed_from": killed_after,
        "resumed_max_weight_diff": resumed_diff,
        "resumed_identical": resumed_diff == 0.0,
        # same world size, same per-process batches and gloo reductions: the layout over machines must not matter
        "two_machines_vs_one_machine_max_weight_diff": layout_diff,
        "two_machines_vs_one_machine_identical": layout_diff == 0.0,
        "one_vs_two_ranks_metric_diff": metric_diff,
        "one_vs_two_ranks_within_tolerance": all(v <= TRAIN_TOLERANCE for v in metric_diff.values()),
        "tolerance": TRAIN_TOLERANCE,
        "metrics": {"one_rank": one, "two_machines": two},
        "seconds": times,
        "speedup_2_vs_1_rank": round(times["one_rank"] / times["two_machines"], 2),
    }


def markdown(result: dict[str, Any], machine: str, day: str) -> str:
    """The BENCHMARKS.md section."""
    g, t = result["generation"], result["training"]
    gs, ts = g["seconds"], t["seconds"]
    return f"""## More than one machine: two `accelerate launch` machines on one host (issue 25)

`python -m bench.multinode --write` ({day}; {machine}). Times include each launch's start-up, so the
ratios are rough. Each "machine" is its own `accelerate launch
--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 --main_process_port P` (gloo, one process
with `OMP_NUM_THREADS=1`); times include every launch's start-up (imports, process group).

| run | generation ({g["counts"]["pixel"]["kept"]} pixel outliers, tiny SD) | OAL training ({result["epochs"]} epochs, tiny net) |
|---|---|---|
| 1 rank | {gs["one_rank"]} s | {ts["one_rank"]} s |
| 1 machine x 2 processes | {gs["one_machine_two_processes"]} s | {ts["one_machine_two_processes"]} s |
| 2 machines | {gs["two_machines"]} s ({g["speedup_2_vs_1_rank"]}x) | {ts["two_machines"]} s ({t["speedup_2_vs_1_rank"]}x) |
| 2 machines, rank 1 killed, relaunched | {gs["two_machines_killed"]} s (kill + resume) | {ts["two_machines_killed"]} s (killed after `{t["resumed_from"]}`, `--resume`) |

- generation `identical: {str(g["identical"]).lower()}`: 2 machines vs 1 machine x 2 processes
  {str(g["checks"]["two_machines_vs_one_machine"]).lower()}, killed-and-resumed vs uninterrupted
  {str(g["checks"]["killed_and_resumed_vs_uninterrupted"]).lower()} (every record with its metadata, every latent bit,
  every PNG byte). A 1-rank run decodes other candidates (each rank fills its own share of
  `counts.pixel`), so its dataset is a different, equally valid sample.
- training: 2 machines vs 1 machine x 2 processes (same world size), max |weight diff| =
  {t["two_machines_vs_one_machine_max_weight_diff"]:.3g}; resumed vs uninterrupted 2-machine weights, max |diff| = {t["resumed_max_weight_diff"]:.3g};
  1 rank (batch 64) vs 2 machines (batch 32 each) differ by per-rank batch statistics: |diff| of ID
  accuracy / near / far AUROC = {t["one_vs_two_ranks_metric_diff"]["id_accuracy"]} /
  {t["one_vs_two_ranks_metric_diff"]["near_auroc"]} / {t["one_vs_two_ranks_metric_diff"]["far_auroc"]}
  (tolerance {t["tolerance"]}: {str(t["one_vs_two_ranks_within_tolerance"]).lower()}).
- On so tiny a workload each launch's start-up (imports, process group, loading the ID data) and the
  shared cores dominate: the ratios are not what two real hosts would gain.
"""


def main() -> None:
    """Run generation and training on 1 and 2 ranks and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-multinode"))
    parser.add_argument("--pixel", type=int, default=240, help="pixel outliers to generate")
    parser.add_argument("--epochs", type=int, default=2, help="OAL training epochs")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    work = args.work.resolve()
    for sub in ("gen", "train", "logs"):  # a fresh comparison every time; the assets are reused
        subprocess.run(["rm", "-rf", str(work / sub)], check=True)
    assets = tiny_assets(work / "assets")
    result: dict[str, Any] = {"epochs": args.epochs}
    result["generation"] = generation(work, assets, args.pixel)
    result["training"] = training(work, assets, work / "gen" / "two_machines", args.epochs)
    result["identical"] = (
        result["generation"]["identical"]
        and result["training"]["resumed_identical"]
        and result["training"]["two_machines_vs_one_machine_identical"]
    )
    print(json.dumps(result))
    if args.write:
        from bench.common import machine, today, write_section

        write_section("multinode", markdown(result, machine(), today()))


if __name__ == "__main__":
    main()
