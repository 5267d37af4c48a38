"""Real-architecture rehearsal on CPU: the whole pipeline at SD-1.5 / CLIP-L / ResNet-18 size, no network.

    .venv/bin/python bench/real_scale_rehearsal.py [--work /tmp/oodforge-rehearsal] [--clip-bpe FILE|DIR]
        [--via stages|pipeline] [--only STAGE ...] [--rebuild] [--no-write]
    make rehearsal          # fetches the open_clip_torch wheel (for CLIP's BPE merges) first, then this

The models and data of the first stage are kept in the work dir and reused by later runs (``--rebuild``
makes them again); every other stage's outputs are removed before it runs, so each run runs every stage.

Random-weight models with the real architectures and configs (``bench/real_scale_models.py``: Stable
Diffusion 1.5's UNet / VAE / CLIP ViT-L/14 text encoder with a 49,408-token CLIP tokenizer, a ResNet-18
classifier) are saved as Hub snapshots and loaded by the project's own ``from_pretrained`` code, on a
CIFAR-10-format directory of random images at 64x64 and 2 denoising steps. Each stage is the project's
own command, run as a subprocess (``run_stage``): textual inversion (``python -m synth fit-generator``),
the text-aligned teacher, outlier generation (kNN boundary sampling, SD decoding, kNN filtering), the CE
baseline, OAL, and serving the exported detector (``create_app`` + one ``POST /score``). Every override
is a ``--set``; no file under ``configs/`` changes.

It checks shapes, dtypes and that every stage ran — not quality: SD latents 4x8x8 at 64x64 with
``scaling_factor`` 0.18215 in the outlier dataset, text embeddings 77x768, placeholder tokens in the
49,408-token vocabulary, a 768-wide teacher embedding, a detector that takes 3x64x64 input, the fields of
the served response. Each stage's wall time and peak RSS (``wait4``'s ``ru_maxrss`` of its process tree)
go into a summary table and ``bench/real_scale_rehearsal.json``; the exit code is 1 when a stage or a
check fails.

``--via pipeline`` runs the same chain through the one-command pipeline instead (``pipeline_run_stages``):
the build stage, then one ``python -m trainer.pipeline --pretrained <SD-1.5 dir> ...`` stage whose
``--set STAGE.key=value`` items make every stage as small as above (ResNet-18 for ce / teacher / oal),
then serving from its ``--out`` dir. The same checks run on the pipeline's output paths (``Paths`` with
``via="pipeline"``: generator ``OUT/generator``, runs ``OUT``, outliers ``OUT/outliers``), plus
``OUT/report.md`` and ``OUT/configs/<stage>.yaml``; its summary goes to
``bench/real_scale_rehearsal_pipeline.json`` and its own BENCHMARKS.md section. ``--no-write`` leaves
BENCHMARKS.md alone (the JSON summary is still written).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIAS = ("stages", "pipeline")  # each stage's own command, or one `python -m trainer.pipeline`
REPORTS = {
    "stages": ROOT / "bench" / "real_scale_rehearsal.json",
    "pipeline": ROOT / "bench" / "real_scale_rehearsal_pipeline.json",
}
SECTIONS = {"stages": "real-scale-rehearsal", "pipeline": "real-scale-rehearsal-pipeline"}  # of BENCHMARKS.md
REPORT = REPORTS["stages"]
DEFAULT_BPE = Path.home() / ".cache" / "oodforge" / "wheels"
CLASSES = 10
SIZE = 64  # image side everywhere: SD at 64x64 -> 8x8x4 latents


@dataclass(frozen=True)
class Paths:
    """Where everything lies; ``via="pipeline"`` maps the stages' outputs to the pipeline's ``--out`` dir."""

    work: Path
    via: str = "stages"

    @property
    def pipeline(self) -> bool:
        return self.via == "pipeline"

    @property
    def run(self) -> Path:
        """``python -m trainer.pipeline --out``."""
        return self.work / "pipeline-run"

    @property
    def sd15(self) -> Path:
        return self.work / "models" / "stable-diffusion-v1-5"

    @property
    def resnet(self) -> Path:
        return self.work / "models" / "resnet-18"

    @property
    def cifar(self) -> Path:
        return self.work / "data" / "cifar-10-batches-py"

    @property
    def ood(self) -> Path:
        return self.work / "data" / "ood-noise"

    @property
    def generator(self) -> Path:
        return self.run / "generator" if self.pipeline else self.work / "generators" / "sd15-cifar10"

    @property
    def runs(self) -> Path:
        """The parent of the ``ce`` / ``teacher`` / ``oal`` run dirs."""
        return self.run if self.pipeline else self.work / "runs"

    @property
    def outliers(self) -> Path:
        return self.run / "outliers" if self.pipeline else self.work / "outliers" / "cifar10"

    @property
    def served(self) -> Path:
        return self.work / ("served-pipeline.json" if self.pipeline else "served.json")

    @property
    def logs(self) -> Path:
        return self.work / "logs" / "pipeline" if self.pipeline else self.work / "logs"


@dataclass
class Stage:
    name: str
    argv: list[str]
    what: str
    outputs: list[Path] = field(default_factory=list)  # removed before the stage runs: each rehearsal runs it


@dataclass
class Result:
    name: str
    what: str
    seconds: float
    peak_rss_mb: float
    returncode: int
    log: str
    checks: list[str] = field(default_factory=list)
    error: str | None = None


def _sets(items: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in items.items():
        out += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return out


def _build_stage(p: Paths, bpe: Path | None) -> Stage:
    build = [sys.executable, str(Path(__file__).resolve()), "build", "--work", str(p.work)]
    return Stage(
        "build",
        build + (["--clip-bpe", str(bpe)] if bpe else []),
        "random-weight SD 1.5 + ResNet-18 snapshots, CIFAR-format data",
    )


def _serve_stage(p: Paths) -> Stage:
    return Stage(
        "serve",
        [sys.executable, str(Path(__file__).resolve()), "serve", "--detectors", str(p.runs), "--out", str(p.served)],
        "create_app + one POST /score to the exported OAL detector",
        [p.served],
    )  # fmt: skip


def _train_small(p: Paths) -> dict[str, object]:
    """ce / teacher / oal: one epoch of the ResNet-18 snapshot (``model.name=hf``) at 64x64."""
    return {
        "model.name": "hf",
        "model.pretrained": p.resnet,
        "preprocess.size": SIZE,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.checkpoint_every_steps": 4,
        "train.log_every_steps": 1,
        "train.num_workers": 0,
        "eval.plots": "false",
    }


INVERT_SMALL = {  # textual inversion: 2 steps of batch 2 at 64x64 on the CPU, float32
    "invert.steps": 2,
    "invert.batch_size": 2,
    "invert.warmup_steps": 0,
    "invert.max_minutes": "null",
    "invert.dtype": "float32",
    "invert.device": "cpu",
    "invert.resolution": SIZE,
    "invert.checkpoint_every_steps": 1,
}
GENERATE_SMALL = {  # outlier synthesis: 2 denoising steps at 64x64, a few dozen candidates
    "generator.dtype": "float32",
    "generator.device": "cpu",
    "generator.steps": 2,
    "generator.height": SIZE,
    "generator.width": SIZE,
    "sampler.n_candidates": 64,
    "filter.k": 5,
    "counts.knn_per_class": 4,
    "counts.pixel": 6,
    "counts.batch_size": 6,
    "counts.max_candidates_factor": 2,
}


def pipeline_stages(p: Paths, bpe: Path | None) -> list[Stage]:
    """The commands of the rehearsal, in order (the first builds the models and data, the rest is the pipeline)."""
    if p.pipeline:
        return pipeline_run_stages(p, bpe)
    py = sys.executable
    data = {"data.benchmark": "cifar10", "data.root": p.cifar, "data.image_size": SIZE}
    trained = {
        **data,
        "data.ood.noise.path": p.ood,
        "output_dir": p.runs,
        **_train_small(p),
    }
    train = [py, "trainer/train.py", "--config"]
    return [
        _build_stage(p, bpe),
        Stage(
            "invert",
            [
                py,
                "-m",
                "synth",
                "fit-generator",
                "--config",
                "configs/synth/sd15_invert_cifar10.yaml",
                "--out",
                str(p.generator),
            ]
            + _sets(
                {
                    **data,
                    "pretrained": p.sd15,
                    **INVERT_SMALL,
                    "fidelity.classifier": p.work / "no-classifier",
                }
            ),
            "textual inversion of the 10 placeholder tokens (python -m synth fit-generator)",
            [p.generator, p.generator.with_name(f".{p.generator.name}.work")],
        ),  # fmt: skip
        Stage(
            "teacher",
            train
            + ["configs/train/teacher.yaml"]
            + _sets(
                {
                    **trained,
                    "name": "teacher",
                    "method_args.generator": p.generator,
                    "eval.scores": ["knn"],
                    "eval.score_params.knn.k": 10,
                }
            ),
            "text-aligned teacher: ResNet-18 + cosine head on the generator's token space",
            [p.runs / "teacher"],
        ),  # fmt: skip
        Stage(
            "generate",
            [
                py,
                "-m",
                "synth",
                "generate",
                "--config",
                "configs/synth/sd15_cifar10.yaml",
                "--out",
                str(p.outliers),
            ]
            + _sets(
                {
                    **data,
                    "teacher": p.runs / "teacher" / "detector",
                    "generator.pretrained": p.generator,
                    **GENERATE_SMALL,
                }
            ),
            "kNN boundary sampling -> SD decoding (2 steps) -> kNN ID-near filter (python -m synth generate)",
            [p.outliers],
        ),  # fmt: skip
        Stage(
            "ce",
            train
            + ["configs/train/ce.yaml"]
            + _sets({**trained, "name": "ce", "eval.scores": ["msp", "energy"]}),
            "CE baseline (trainer/train.py)",
            [p.runs / "ce"],
        ),
        Stage(
            "oal",
            train
            + ["configs/train/oal.yaml"]
            + _sets(
                {
                    **trained,
                    "name": "oal",
                    "init_from": p.runs / "ce" / "detector",
                    "method_args.teacher": p.runs / "teacher" / "detector",
                    "method_args.outliers": p.outliers,
                    "eval.scores": ["msp", "energy"],
                }
            ),
            "OAL: CE + KD + CLUB(knn) + CLUB(sd) + energy margins, export (trainer/train.py)",
            [p.runs / "oal"],
        ),  # fmt: skip
        _serve_stage(p),
    ]


def pipeline_run_stages(p: Paths, bpe: Path | None) -> list[Stage]:
    """``--via pipeline``: build, the whole chain as one ``python -m trainer.pipeline`` command, serve.

    The pipeline derives each stage's config from the data and the shipped configs; the ``--set
    STAGE.key=value`` items below make each as small as the per-stage commands are (with the fidelity of
    the inverted generator measured by the CE baseline, as the pipeline does, on one 2-step sample per
    class). The pipeline skips finished stages, so its ``--out`` dir is removed first.
    """
    train = _train_small(p)
    per_stage: dict[str, dict[str, object]] = {
        "ce": {**train, "eval.scores": ["msp", "energy"]},
        "generator": {**INVERT_SMALL, "fidelity.per_class": 1, "fidelity.steps": 2},
        "teacher": {**train, "eval.scores": ["knn"], "eval.score_params.knn.k": 10},
        "outliers": GENERATE_SMALL,
        "oal": {**train, "eval.scores": ["msp", "energy"]},
    }
    sets = _sets(
        {f"{stage}.{key}": value for stage, items in per_stage.items() for key, value in items.items()}
    )
    command = [
        sys.executable, "-m", "trainer.pipeline",
        "--data", str(p.cifar), "--benchmark", "cifar10", "--ood", f"noise={p.ood}:far",
        "--pretrained", str(p.sd15), "--out", str(p.run),
        "--image-size", str(SIZE), "--invert-steps", "2", "--device", "cpu",
        *sets,
    ]  # fmt: skip
    return [
        _build_stage(p, bpe),
        Stage(
            "pipeline",
            command,
            "python -m trainer.pipeline --pretrained <SD-1.5>: ce, textual inversion, teacher, outliers, oal, report",
            [p.run],
        ),
        _serve_stage(p),
    ]


def run_stage(stage: Stage, log_dir: Path) -> Result:
    """Run one stage's command from the repository root; wall time and the peak RSS of its process tree."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage.name}.log"
    for path in stage.outputs:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OODFORGE_PROGRESS_SECONDS": "20", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(stage.argv) + "\n\n")
        out.flush()
        proc = subprocess.Popen(stage.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the process or its largest waited-for child
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Result(
        name=stage.name,
        what=stage.what,
        seconds=round(time.perf_counter() - started, 1),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 0),
        returncode=proc.returncode,
        log=str(log),
    )


# --------------------------------------------------------------------------- checks (artifacts on disk only)
def _check(cond: bool, message: str) -> str:
    if not cond:
        raise AssertionError(message)
    return message


def _numel(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        total = 0
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def _prompt_embedding(generator: Path, class_name: str):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    from oodforge.tokens import placeholder_token
    from synth.generator import PROMPT

    tok = CLIPTokenizer.from_pretrained(generator, subfolder="tokenizer")
    ids = tok(PROMPT.format(token=placeholder_token(class_name)), padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids  # fmt: skip
    hf_logging.disable_progress_bar()
    text_encoder = CLIPTextModel.from_pretrained(generator, subfolder="text_encoder", dtype=torch.float32)
    with torch.no_grad():
        return tok, ids, text_encoder(ids)[0]


def check_build(p: Paths) -> list[str]:
    from transformers import CLIPTokenizer

    info = json.loads((p.work / "models" / "built.json").read_text())
    unet = _numel(p.sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    vae_cfg = json.loads((p.sd15 / "vae" / "config.json").read_text())
    unet_cfg = json.loads((p.sd15 / "unet" / "config.json").read_text())
    tok = CLIPTokenizer.from_pretrained(p.sd15, subfolder="tokenizer")
    return [
        _check(850e6 < unet < 870e6, f"SD-1.5 UNet: {unet / 1e6:.1f} M parameters"),
        _check(
            unet_cfg["cross_attention_dim"] == 768
            and unet_cfg["block_out_channels"] == [320, 640, 1280, 1280],
            "UNet cross_attention_dim 768, block_out_channels [320, 640, 1280, 1280]",
        ),  # fmt: skip
        _check(
            vae_cfg["scaling_factor"] == 0.18215 and vae_cfg["latent_channels"] == 4,
            "VAE scaling_factor 0.18215, 4 latent channels",
        ),  # fmt: skip
        _check(
            len(tok) == 49408 and tok.model_max_length == 77,
            f"CLIP tokenizer: {len(tok)} tokens, 77 positions",
        ),
        _check(info["resnet_params"] > 11e6, f"ResNet-18: {info['resnet_params'] / 1e6:.1f} M parameters"),
        f"vocabulary: {info['vocabulary']}",
    ]


def check_invert(p: Paths) -> list[str]:
    from safetensors.torch import load_file

    from bench.real_scale_models import CIFAR10_NAMES
    from oodforge.tokens import placeholder_token

    card = json.loads((p.generator / "oodforge_generator.json").read_text())
    tok, ids, emb = _prompt_embedding(p.generator, CIFAR10_NAMES[0])
    placeholder_ids = tok.convert_tokens_to_ids([placeholder_token(c) for c in CIFAR10_NAMES])
    rows = [v for k, v in load_file(p.generator / "text_encoder" / "model.safetensors").items()
            if k.endswith("token_embedding.weight")][0]  # fmt: skip
    return [
        _check(card["placeholder_tokens"] == [placeholder_token(c) for c in CIFAR10_NAMES], "card lists the 10 placeholder tokens"),
        _check(sorted(placeholder_ids) == list(range(49408, 49418)), "placeholder tokens are ids 49408..49417 of the tokenizer"),
        _check(tuple(rows.shape) == (49418, 768) and str(rows.dtype) == "torch.float16",
               f"token embedding table {tuple(rows.shape)} {rows.dtype} (saved float16)"),  # fmt: skip
        _check(ids.shape[1] == 77 and placeholder_ids[0] in ids[0].tolist(), "class prompt: 77 token ids with its placeholder"),
        _check(tuple(emb.shape) == (1, 77, 768), f"text embeddings {tuple(emb.shape[1:])}"),
        _check(card["resolution"] == SIZE, f"inverted at {card['resolution']}x{card['resolution']}"),
    ]  # fmt: skip


def _detector_checks(run: Path, embed: int | None) -> list[str]:
    import torch
    from PIL import Image

    from oodforge.detector import ClassifierDetector

    spec = json.loads((run / "detector" / "detector.json").read_text())
    det = ClassifierDetector.load(run / "detector")
    logits, feats = det.forward_batch(torch.zeros(2, 3, SIZE, SIZE))
    out = det.predict([Image.new("RGB", (56, 40), (90, 10, 200)), Image.new("L", (SIZE, SIZE), 128)])
    checks = [
        _check(spec["preprocess"]["size"] == SIZE, f"{run.name}: detector input 3x{SIZE}x{SIZE}"),
        _check(tuple(logits.shape) == (2, CLASSES), f"{run.name}: logits [N, {CLASSES}]"),
        _check(len(out.scores) == 2 and len(out.is_ood) == 2, f"{run.name}: predict gives a score and verdict per image"),
        _check((run / "report.json").is_file(), f"{run.name}: report.json written"),
    ]  # fmt: skip
    if embed is not None:
        checks.append(_check(feats.shape[1] == embed, f"{run.name}: embedding width {feats.shape[1]}"))
    return checks


def check_teacher(p: Paths) -> list[str]:
    return _detector_checks(p.runs / "teacher", 768)


def check_generate(p: Paths) -> list[str]:
    from safetensors.torch import load_file

    card = json.loads((p.outliers / "card.json").read_text())
    latents = load_file(p.outliers / "latents.safetensors")
    vae = json.loads((Path(card["generator"]["pretrained"]) / "vae" / "config.json").read_text())
    records = [json.loads(x) for x in (p.outliers / "metadata.jsonl").read_text().splitlines() if x.strip()]
    from PIL import Image

    images = sorted((p.outliers / "images").glob("*.png"))
    sizes = {Image.open(f).size for f in images}
    sd, knn = latents["sd"], latents["knn"]
    return [
        _check(sd.ndim == 4 and tuple(sd.shape[1:]) == (4, 8, 8) and len(sd) > 0, f"sd latents {tuple(sd.shape)} {sd.dtype}"),
        _check(vae["scaling_factor"] == 0.18215, "generator VAE scaling_factor 0.18215"),
        _check(knn.ndim == 2 and knn.shape[1] == 768 and len(knn) > 0, f"knn pool {tuple(knn.shape)} {knn.dtype}"),
        _check(any("knn_distance" in r for r in records), f"metadata: {len(records)} records with kNN distances"),
        _check(not images or sizes == {(SIZE, SIZE)}, f"{len(images)} kept pixel outliers, {sizes or 'none'}"),
        f"counts {card.get('counts')}",
    ]  # fmt: skip


def check_ce(p: Paths) -> list[str]:
    return _detector_checks(p.runs / "ce", 512)


def check_oal(p: Paths) -> list[str]:
    import csv

    with (p.runs / "oal" / "logs" / "metrics.csv").open() as f:
        logged = {row["name"] for row in csv.DictReader(f)}
    terms = ("train/logit_kd", "train/feature_kd", "train/club_knn", "train/club_sd")
    return [
        *_detector_checks(p.runs / "oal", 512),
        _check(set(terms) <= logged, f"OAL logged {', '.join(t.removeprefix('train/') for t in terms)}"),
    ]


def check_serve(p: Paths) -> list[str]:
    body = json.loads(p.served.read_text())
    result = body["results"][0]
    from bench.real_scale_models import CIFAR10_NAMES

    return [
        _check(body["detector"]["name"] == "oal", "served by the exported OAL detector"),
        _check({"value", "score", "split", "target_id_tpr"} <= body["threshold"].keys(), "threshold fields"),
        _check(len(body["results"]) == 2, "one result per uploaded image"),
        _check(
            {"index", "is_ood", "score", "threshold", "label", "confidence"} <= result.keys(), "result fields"
        ),
        _check(
            result["label"] in CIFAR10_NAMES and 0 <= result["confidence"] <= 1, f"label {result['label']!r}"
        ),
    ]


PIPELINE_STAGES = ("ce", "generator", "teacher", "outliers", "oal")  # OUT/configs/<stage>.yaml


def check_pipeline(p: Paths) -> list[str]:
    """What only the one-command pipeline writes: its report, the derived configs with the ``--set`` items."""
    import yaml

    report = p.run / "report.md"
    configs = {s: p.run / "configs" / f"{s}.yaml" for s in PIPELINE_STAGES}
    missing = [path.name for path in configs.values() if not path.is_file()]
    written = _check(
        not missing, f"configs/{{{','.join(PIPELINE_STAGES)}}}.yaml written (missing: {missing})"
    )
    cfg = {s: yaml.safe_load(path.read_text()) for s, path in configs.items()}
    text = report.read_text() if report.is_file() else ""
    log = p.logs / "pipeline.log"
    fidelity = json.loads((p.generator / "oodforge_generator.json").read_text()).get("fidelity") or {}
    oal = cfg["oal"]["method_args"]
    times = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("pipeline: stage times")
    ]
    return [
        _check("ID test accuracy" in text, f"{report.name} written ({len(text.splitlines())} lines, CE vs OAL)"),
        written.removesuffix(" (missing: [])"),
        _check(all(cfg[s]["model"]["name"] == "hf" and cfg[s]["model"]["pretrained"] == str(p.resnet)
                   for s in ("ce", "teacher", "oal")), "ce/teacher/oal configs: ResNet-18 (model.name hf) from --set"),
        _check(cfg["generator"]["pretrained"] == str(p.sd15) and cfg["generator"]["invert"]["steps"] == 2,
               "generator config: textual inversion of --pretrained, 2 steps"),
        _check(cfg["outliers"]["generator"]["pretrained"] == str(p.generator)
               and cfg["outliers"]["generator"]["steps"] == 2, "outliers config: the inverted generator, 2 steps"),
        _check(fidelity.get("fidelity") is not None and Path(fidelity["classifier"]) == p.runs / "ce" / "detector",
               f"generator fidelity judged by OUT/ce: {100 * (fidelity.get('fidelity') or 0):.0f}% of "
               f"{fidelity.get('n_samples')} samples"),
        f"oal config fitted to the outliers: pixel_term {oal.get('pixel_term')}, export.score {cfg['oal']['export']['score']}",
        (times[-1].removeprefix("pipeline: ") if times else "no stage times in the pipeline's log"),
    ]  # fmt: skip


CHECKS: dict[str, Callable[[Paths], list[str]]] = {
    "build": check_build, "invert": check_invert, "teacher": check_teacher, "generate": check_generate,
    "ce": check_ce, "oal": check_oal, "serve": check_serve, "pipeline": check_pipeline,
}  # fmt: skip
# the checks after each stage; the pipeline stage is checked as the per-stage chain would be, plus its own files
STAGE_CHECKS = {"pipeline": ["pipeline", "invert", "teacher", "generate", "ce", "oal"]}


# --------------------------------------------------------------------------- sub-commands run as stages
def build(work: Path, bpe: Path | None) -> None:
    import torch

    from bench.real_scale_models import build_resnet18, build_sd15, write_cifar10, write_image_folder

    p = Paths(work)
    marker = work / "models" / "built.json"
    if marker.is_file():
        print(f"models and data already built in {work} (delete {marker} to rebuild)")
        return
    # float32 as SD 1.5's main branch ships (~4.3 GB); float16 when the disk is short
    dtype = torch.float32 if shutil.disk_usage(work).free > 20 * 2**30 else torch.float16
    info = build_sd15(p.sd15, bpe, dtype=dtype)
    info["resnet_params"] = build_resnet18(p.resnet)
    write_cifar10(p.cifar)
    write_image_folder(p.ood)
    marker.write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def serve(detectors: Path, out: Path) -> None:
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    # work-around (project bug): importing api.app builds a module-level app from OODFORGE_* variables,
    # and oodforge.progress's own OODFORGE_PROGRESS[_SECONDS] are rejected there as unknown settings keys
    for name in ("OODFORGE_PROGRESS", "OODFORGE_PROGRESS_SECONDS"):
        os.environ.pop(name, None)
    from api.app import create_app
    from api.settings import ServeSettings

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h, mode) in enumerate([(SIZE, SIZE, "RGB"), (100, 80, "RGBA")]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)[..., : len(mode)], mode).save(
            buf, "PNG"
        )
        files.append(("files", (f"image{i}.png", buf.getvalue(), "image/png")))
    settings = ServeSettings(detectors_dir=detectors, detectors=["oal"], default_detector="oal")
    with TestClient(create_app(settings)) as client:
        response = client.post("/score", files=files)
        if response.status_code != 200:
            raise SystemExit(f"POST /score -> {response.status_code}: {response.text}")
        out.write_text(json.dumps(response.json(), indent=2))
    print(json.dumps(response.json(), indent=2))


# --------------------------------------------------------------------------- the run
def find_bpe(given: Path | None) -> Path | None:
    """The CLIP merges source: ``given`` (a wheel, a ``.txt.gz``, or a directory holding wheels), else the
    newest ``open_clip_torch`` wheel in the default cache; None when there is none."""
    where = given or DEFAULT_BPE
    if where.is_dir():
        wheels = sorted(where.glob("open_clip_torch-*.whl"))
        return wheels[-1] if wheels else None
    return where if where.is_file() else None


def preflight(work: Path) -> dict:
    """Free memory and disk before the run (the SD-1.5 stages peak near 6.5 GiB; the snapshots take ~9 GB)."""
    work.mkdir(parents=True, exist_ok=True)
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    available = int(meminfo.get("MemAvailable", "0 kB").split()[0]) / 2**20
    free = shutil.disk_usage(work).free / 2**30
    if available < 8:
        print(f"warning: only {available:.1f} GiB of memory available; the SD-1.5 stages need about 6.5 GiB")
    return {"memory_available_gib": round(available, 1), "disk_free_gib": round(free, 1)}


def run_checks(name: str, work: Path, via: str = "stages") -> tuple[list[str], str | None]:
    """A stage's checks, in their own process: this one stays small, so that each stage's peak RSS is its
    own (a child's ``ru_maxrss`` starts from its parent's size at the fork)."""
    names = STAGE_CHECKS.get(name, [name])
    argv = [sys.executable, str(Path(__file__).resolve()), "check", *names, "--work", str(work), "--via", via]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return [], f"check crashed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}"
    return outcome["checks"], outcome["error"]


def check(names: list[str], work: Path, via: str = "stages") -> None:
    """(sub-command) Run these stages' checks, in order, up to the first that fails; the last stdout line is
    ``{"checks": [...], "error": ...}`` (with several names, each line starts with its check's name)."""
    p, checks, error = Paths(work, via), [], None
    for name in names:
        try:
            lines = CHECKS[name](p)
        except Exception as err:  # an assertion, or an artifact that is missing or malformed
            error = f"check {name} failed: {type(err).__name__}: {err}"
            break
        if len(names) > 1:
            lines = [line if line.startswith(f"{name}: ") else f"{name}: {line}" for line in lines]
        checks += lines
    print(json.dumps({"checks": checks, "error": error}))


def table(results: list[Result]) -> str:
    lines = [f"{'stage':<10} {'wall s':>8} {'peak RSS MiB':>13}  status", "-" * 48]
    for r in results:
        status = (
            "ok" if r.returncode == 0 and r.error is None else f"FAILED ({r.error or f'exit {r.returncode}'})"
        )
        lines.append(f"{r.name:<10} {r.seconds:>8.1f} {r.peak_rss_mb:>13.0f}  {status[:200]}")
    lines.append("-" * 48)
    lines.append(f"{'total':<10} {sum(r.seconds for r in results):>8.1f}")
    return "\n".join(lines)


def write_benchmarks(
    report: dict, results: list[Result], bpe: Path | None, section: str = SECTIONS["stages"]
) -> None:
    """The ``section`` of BENCHMARKS.md (``real-scale-rehearsal``, or ``real-scale-rehearsal-pipeline`` for
    ``--via pipeline``): every stage, its time, memory and checks."""
    from bench.common import machine, today, write_section

    via = report.get("via", "stages")
    if via == "pipeline":
        title = "Real-architecture rehearsal on CPU through `python -m trainer.pipeline` (issue 16)"
        command = "`.venv/bin/python bench/real_scale_rehearsal.py --via pipeline`"
        how = (
            "The chain ran as one `python -m trainer.pipeline --pretrained <SD-1.5 dir>` command (every stage "
            "made small with `--set STAGE.key=value`), then its `--out` dir was served."
        )
    else:
        title = "Real-architecture rehearsal on CPU (issue 16)"
        command = "`make rehearsal` (= `.venv/bin/python bench/real_scale_rehearsal.py`)"
        how = "Each stage ran as its own command."
    summary = Path(report.get("summary", REPORTS[via])).relative_to(ROOT)
    rows = [
        f"| {r.name} | {r.what} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} | "
        f"{'ok' if r.returncode == 0 and r.error is None else 'FAILED'} | {'; '.join(r.checks)} |"
        for r in results
    ]
    write_section(
        section,
        f"""## {title}

Measured {today()} on {machine()}; {command},
no network. {how} Random-weight SD-1.5 UNet / VAE / CLIP ViT-L/14 text encoder (tokenizer:
{"CLIP's BPE merges read from " + bpe.name if bpe else "a synthetic 49,408-token BPE"}) and a ResNet-18 saved
as Hub snapshots, loaded through `from_pretrained`, on CIFAR-10-format random images at 64x64, 2 denoising
steps. Result: **{"every stage ran and every check passed" if report["ok"] else "FAILED"}**, {report["total_seconds"] / 60:.1f} min in
all. Per stage (wall s, peak RSS of its process tree in MiB, and what it checked); the full log of each
stage is in `{report["logs"]}/`, the summary in `{summary}`:

| stage | what | s | MiB | status | checks |
|---|---|---:|---:|---|---|
{chr(10).join(rows)}
""",
    )


def rehearse(
    work: Path, bpe: Path | None, only: list[str] | None = None, via: str = "stages", write: bool = True
) -> int:
    """Run the stages (``via``: each stage's command, or one ``python -m trainer.pipeline``), check them,
    write the JSON summary and (``write`` and not ``only``) the BENCHMARKS.md section; 0 when all passed."""
    p = Paths(work, via)
    summary = REPORTS[via]
    resources = preflight(work)
    print(
        f"via {via}; work dir {work}: {resources['memory_available_gib']} GiB memory available, "
        f"{resources['disk_free_gib']} GiB disk free; CLIP merges: {bpe or 'none (synthetic vocabulary)'}"
    )
    results: list[Result] = []
    started = time.perf_counter()
    for stage in pipeline_stages(p, bpe):
        if only and stage.name not in only:
            continue
        print(f"== {stage.name}: {stage.what}", flush=True)
        result = run_stage(stage, p.logs)
        if result.returncode != 0:
            tail = Path(result.log).read_text(errors="replace").splitlines()[-25:]
            result.error = f"exit {result.returncode}; last lines of {result.log}:\n" + "\n".join(tail)
        else:
            result.checks, result.error = run_checks(stage.name, work, via)
        results.append(result)
        print(f"   {result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MiB", flush=True)
        for line in result.checks:
            print(f"   ok  {line}")
        if result.error:
            print(f"   FAILED: {result.error}", flush=True)
            break
    ok = all(r.returncode == 0 and r.error is None for r in results) and len(results) == len(
        [s for s in pipeline_stages(p, bpe) if not only or s.name in only]
    )
    report = {
        "ok": ok,
        "via": via,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
        "work": str(work),
        "logs": str(p.logs),
        "summary": str(summary),
        **resources,
        "stages": [asdict(r) for r in results],
    }
    summary.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(results))
    if write and not only:
        write_benchmarks(report, results, bpe, SECTIONS[via])
    print(f"\n{'all stages ran and every check passed' if ok else 'REHEARSAL FAILED'}; report: {summary}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--work", type=Path, default=Path("/tmp/oodforge-rehearsal"))
    parser.add_argument("--clip-bpe", type=Path, default=None,
                        help="open_clip_torch wheel, bpe_simple_vocab_16e6.txt.gz, or a directory of wheels (default: "
                             f"{DEFAULT_BPE}); without one a synthetic 49,408-token BPE is built")  # fmt: skip
    parser.add_argument(
        "--via",
        choices=VIAS,
        default="stages",
        help="stages: each stage's own command (default); pipeline: one `python -m trainer.pipeline`",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        help="run only these stages (their inputs must exist); with "
        "--via pipeline they are build, pipeline, serve",
    )
    parser.add_argument("--no-write", action="store_true",
                        help="do not write BENCHMARKS.md (the JSON summary is still written)")  # fmt: skip
    parser.add_argument(
        "--rebuild", action="store_true", help="build the models and data again (else reused)"
    )
    b = sub.add_parser("build", help="(a stage) build the models and data")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--clip-bpe", type=Path, default=None)
    c = sub.add_parser("check", help="run one stage's checks on the artifacts in the work dir")
    c.add_argument("stage", nargs="+", choices=sorted(CHECKS))
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--via", choices=VIAS, default="stages")
    s = sub.add_parser("serve", help="(a stage) serve the exported detector and score two images")
    s.add_argument("--detectors", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.work, args.clip_bpe)
        return 0
    if args.command == "serve":
        serve(args.detectors, args.out)
        return 0
    if args.command == "check":
        check(args.stage, args.work, args.via)
        return 0
    if args.rebuild:
        shutil.rmtree(args.work / "models", ignore_errors=True)
        shutil.rmtree(args.work / "data", ignore_errors=True)
    return rehearse(args.work, find_bpe(args.clip_bpe), args.only, args.via, write=not args.no_write)


if __name__ == "__main__":
    raise SystemExit(main())
