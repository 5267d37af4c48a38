"""One command from image folders to a served OAL detector: CE → generator → teacher → outliers → OAL → report.

    python -m trainer.pipeline --data DIR [--ood NAME=DIR[:near|far]]... --out runs/NAME
    python -m trainer.pipeline --benchmark mnist-open --out runs          # what `make demo` runs
    python -m trainer.pipeline --data DIR --pretrained runwayml/stable-diffusion-v1-5 --out runs/NAME

``DIR`` is an image folder (``DIR/<class>/*`` or ``DIR/{train,val,test}/<class>/*``) or a CIFAR python
directory (``--benchmark cifar10``). Defaults come from the data: image size, number and names of the
classes, the splits, the generator's size and the outlier counts. Every stage writes the config it derived
to ``OUT/configs/<stage>.yaml`` (edit one and run the command again to use it; ``--rederive`` rewrites
them) and runs as its own process:

======== ======================================================= ==============================
stage    what                                                    done when
======== ======================================================= ==============================
ce       the CE baseline (also the OAL student's start)          ``OUT/ce/detector`` exists
generator the embedded SD fit, textual inversion of              ``OUT/generator/model_index.json``
         ``--pretrained``, ``--generator DIR``, or the
         published mnist-open generator
teacher  the text-aligned teacher against the generator's tokens ``OUT/teacher/detector`` exists
outliers kNN boundary sampling, SD decoding, ID-near filter      ``OUT/outliers/card.json``
oal      OAL fine-tuning of the CE baseline                      ``OUT/oal/detector`` exists
report   CE vs OAL per OOD set (or on held-out synthetic         ``OUT/report.md``
         outliers without ``--ood``)
======== ======================================================= ==============================

A finished stage is skipped; a killed one resumes from its checkpoints when the command is run again.
``--set STAGE.key=value`` overrides any key of a stage's config (``--set ce.train.epochs=5``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from oodforge.config import ConfigError, apply_overrides, read_yaml
from oodforge.data import BENCHMARKS, Benchmark, DataConfig, load_benchmark
from oodforge.data.folders import scan_images
from synth.generator import resolve_device

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("ce", "generator", "teacher", "outliers", "oal", "report")
MIN_IMAGES, FEW_IMAGES = 10, 100  # per class: an error below the first, a warning below the second
PUBLISHED_GENERATORS = {"mnist-open": "tiny-mnist-open"}  # benchmark -> oodforge/assets/generators/<name>


class PipelineError(ValueError):
    """Bad data or arguments for the pipeline; the message says what to fix."""


@dataclass
class DataProfile:
    """What the pipeline learned about the data before any stage ran."""

    benchmark: Benchmark
    data: dict[str, Any]
    image_size: int
    per_class: dict[str, int]
    unreadable: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        """ID train images."""
        return len(self.benchmark.train)


# --------------------------------------------------------------------------- data
def parse_ood(items: list[str]) -> dict[str, dict[str, str]]:
    """``NAME=DIR[:near|far]`` items -> ``data.ood`` (far unless said)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name or not rest:
            raise PipelineError(f"--ood {item!r} is not NAME=DIR[:near|far] (e.g. --ood svhn=/data/svhn:far)")
        path, shift = rest, "far"
        for suffix in (":near", ":far"):
            if rest.endswith(suffix):
                path, shift = rest[: -len(suffix)], suffix[1:]
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise PipelineError(f"--ood {name}: {folder} is not a directory; point it at a folder of images")
        if not scan_images(folder)[0]:
            raise PipelineError(
                f"--ood {name}: {folder} holds no readable image; add images or drop --ood {name}"
            )
        out[name] = {"path": str(folder.resolve()), "shift": shift}
    return out


def _side(sizes: Counter) -> int:
    """32 for small images (median side ≤ 48 px), else 64: what the embedded generator and CPU afford."""
    sides = sorted(min(s) for s, n in sizes.items() for _ in range(n))
    return 32 if not sides or sides[len(sides) // 2] <= 48 else 64


def profile_data(args: argparse.Namespace) -> DataProfile:
    """Load the data once, check it, and derive the defaults; :class:`PipelineError` says what to fix."""
    benchmark = args.benchmark or ("imagefolder" if args.data else "mnist-open")
    if benchmark not in BENCHMARKS:
        raise PipelineError(
            f"--benchmark {benchmark!r} is unknown; choose one of {', '.join(BENCHMARKS.names())}"
        )
    if args.data is None and benchmark in ("imagefolder", "cifar10", "cifar100"):
        raise PipelineError(f"--benchmark {benchmark} needs --data DIR")
    unreadable: list[str] = []
    sizes: Counter = Counter()
    notes: list[str] = []
    if benchmark == "imagefolder":
        root = Path(args.data).expanduser()
        if not root.is_dir():
            raise PipelineError(f"--data {root} is not a directory; expected DIR/<class>/<images>")
        good, bad = scan_images(root)
        unreadable = [str(p) for p in bad]
        for p in good[:: max(1, len(good) // 300)]:  # sizes of up to ~300 files, evenly spread
            with Image.open(p) as im:
                sizes[im.size] += 1
    data = {"benchmark": benchmark, "seed": args.seed, "ood": parse_ood(args.ood)}
    if args.data is not None:
        data["root"] = str(Path(args.data).expanduser().resolve())
    image_size = args.image_size or (_side(sizes) if sizes else 32)
    data["image_size"] = image_size
    try:
        bench = load_benchmark(DataConfig.model_validate(data))
    except (FileNotFoundError, ValueError, ConfigError) as err:
        raise PipelineError(str(err)) from None
    names = bench.class_names
    if len(names) < 2:
        raise PipelineError(
            f"{args.data} has {len(names)} class folder(s) ({names}); OOD detection needs at least 2 ID classes: put each class's images in its own folder, DIR/<class>/*"
        )
    counts = Counter(bench.train.labels.tolist())
    per_class = {n: counts.get(i, 0) for i, n in enumerate(names)}
    short = {n: c for n, c in per_class.items() if c < MIN_IMAGES}
    if short:
        raise PipelineError(
            "too few training images in class(es) "
            + ", ".join(f"{n!r} ({c})" for n, c in short.items())
            + f": each class needs at least {MIN_IMAGES} (after the val/test split); add images or remove the class"
        )
    few = {n: c for n, c in per_class.items() if c < FEW_IMAGES}
    if few:
        notes.append(
            "few training images in "
            + ", ".join(f"{n!r} ({c})" for n, c in few.items())
            + f" (fewer than {FEW_IMAGES}): expect noisy results"
        )
    if len(sizes) > 1:
        notes.append(
            f"images come in {len(sizes)} sizes (e.g. {', '.join(f'{w}x{h}' for w, h in list(sizes)[:3])}); all are resized to {image_size}x{image_size}"
        )
    if unreadable:
        notes.append(f"{len(unreadable)} unreadable file(s) skipped, e.g. {unreadable[0]}")
    return DataProfile(bench, data, image_size, per_class, unreadable, sizes, notes)


# --------------------------------------------------------------------------- derived configs
def _epochs(n_train: int, batch_size: int, minimum: int, steps: int = 200) -> int:
    """At least ``minimum`` epochs and at least ``steps`` optimisation steps."""
    per_epoch = max(1, n_train // batch_size)
    return max(minimum, math.ceil(steps / per_epoch))


def _base(name: str) -> dict[str, Any]:
    return read_yaml(REPO_CONFIGS / "train" / f"{name}.yaml")


def derive_configs(args: argparse.Namespace, profile: DataProfile, out: Path) -> dict[str, dict[str, Any]]:
    """Every stage's config, derived from the shipped configs and the data."""
    data = profile.data
    preprocess = {"size": profile.image_size}
    batch = 128 if profile.n_train >= 1024 else 64
    epochs = _epochs(profile.n_train, batch, 15)
    common = {"output_dir": str(out), "data": data, "preprocess": preprocess}
    gen_dir = str(out / "generator")
    ce = {**_base("ce"), **common, "name": "ce"}
    ce["train"] = {**ce.get("train", {}), "epochs": epochs, "batch_size": batch}
    if not profile.benchmark.val_ood:  # nothing to select on before the outliers exist
        ce["export"] = {**ce.get("export", {}), "score": "energy"}
    teacher = {**_base("teacher"), **common, "name": "teacher"}
    teacher["method_args"] = {**teacher["method_args"], "generator": gen_dir}
    teacher["train"] = {**teacher.get("train", {}), "epochs": epochs, "batch_size": batch}
    oal = {**_base("oal"), **common, "name": "oal", "init_from": str(out / "ce" / "detector")}
    oal["method_args"] = {
        **oal["method_args"],
        "teacher": str(out / "teacher" / "detector"),
        "outliers": str(out / "outliers"),
    }
    oal["train"] = {
        **oal.get("train", {}),
        "batch_size": batch,
        "epochs": _epochs(profile.n_train, batch, 10),
    }
    synth = read_yaml(REPO_CONFIGS / "synth" / "mnist_open.yaml")
    synth.update({"data": data, "teacher": str(out / "teacher" / "detector")})
    synth["generator"] = {**synth["generator"], "pretrained": gen_dir}
    # one kept outlier per two train images, between 200 and the recipe's 1000 (~22 decoded per kept on CPU)
    pixel = int(min(1000, max(200, profile.n_train // 2)))
    synth["counts"] = {**synth["counts"], "pixel": pixel}
    # generated ID images for the csID suite and selection: one per two train images of a class, 10..150
    per_class = int(min(150, max(10, profile.n_train // (2 * max(1, len(profile.per_class))))))
    synth["reference"] = {**synth.get("reference", {}), "generated_per_class": per_class}
    if args.pretrained:
        on_gpu = resolve_device(args.device).type == "cuda"  # "auto": CUDA when this machine has it
        synth["generator"].update(
            {"dtype": "float16" if on_gpu else "float32", "device": args.device, "steps": 25}
        )
    fit = read_yaml(REPO_CONFIGS / "synth" / "tiny_mnist_open.yaml")
    fit.update({"data": data})
    fit["model"] = {**fit["model"], "image_size": profile.image_size}
    fit["fidelity"] = {**fit["fidelity"], "classifier": str(out / "ce" / "detector")}
    if args.pretrained:
        fit.update({"pretrained": args.pretrained})
        fit["invert"] = {"steps": args.invert_steps, "device": args.device}
    else:
        fit["fit"] = {**fit["fit"], "max_minutes": args.fit_minutes}
    configs = {"ce": ce, "generator": fit, "teacher": teacher, "outliers": synth, "oal": oal}
    for stage, items in stage_overrides(args.overrides).items():
        if stage not in configs or "" in items:
            bad = next(i for i in args.overrides if i.partition(".")[0] == stage)
            raise PipelineError(
                f"--set {bad!r}: write STAGE.key=value with STAGE one of {', '.join(configs)}"
            )
        configs[stage] = apply_overrides(configs[stage], items)
    return configs


def stage_overrides(items: list[str]) -> dict[str, list[str]]:
    """``--set STAGE.key=value`` items grouped by stage (``{"ce": ["train.epochs=5"]}``)."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        stage, _, rest = item.partition(".")
        grouped.setdefault(stage, []).append(rest)
    return grouped


def write_configs(
    configs: dict[str, dict[str, Any]], out: Path, rederive: bool, overrides: list[str] = ()
) -> dict[str, Path]:
    """``OUT/configs/<stage>.yaml`` for each stage.

    An existing file is kept (it may be the user's edit); this run's ``--set`` items for that stage are
    applied on top of it and the file is rewritten, so a re-run with ``--set`` does what it says. A stage
    whose config changed this way runs again unless its output is complete (delete it to retrain).
    """
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    grouped = stage_overrides(list(overrides))
    paths = {}
    for stage, cfg in configs.items():
        path = folder / f"{stage}.yaml"
        if rederive or not path.is_file():
            path.write_text(
                f"# derived by python -m trainer.pipeline; edit and re-run to use it\n{yaml.safe_dump(cfg, sort_keys=False)}"
            )
        elif grouped.get(stage):
            kept = read_yaml(path)
            updated = apply_overrides(kept, grouped[stage])
            if updated != kept:
                path.write_text(
                    f"# derived by python -m trainer.pipeline, edited; --set applied\n{yaml.safe_dump(updated, sort_keys=False)}"
                )
                print(f"pipeline: {path}: applied --set {', '.join(grouped[stage])}")
            else:
                print(f"pipeline: using {path} (already has --set {', '.join(grouped[stage])})")
        else:
            print(f"pipeline: using {path} as it is (--rederive rewrites it from the data)")
        paths[stage] = path
    return paths


# --------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One step of the pipeline: the command that runs (or resumes) it and how to tell it is done."""

    name: str
    done: Callable[[], bool]
    command: list[str] | None = None
    run: Callable[[], None] | None = None
    about: str = ""
    before: Callable[[], None] | None = None


def published_generator(benchmark: str) -> Path | None:
    """The generator this project publishes for a benchmark (``make publish``), if any."""
    name = PUBLISHED_GENERATORS.get(benchmark)
    if name is None:
        return None
    path = Path(str(resources.files("oodforge") / "assets" / "generators" / name))
    return path if (path / "model_index.json").is_file() else None


def copy_generator(source: Path, target: Path) -> None:
    """Copy a generator directory into the run (atomically: temp dir + rename)."""
    tmp = target.with_name(f".{target.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def build_stages(
    args: argparse.Namespace, profile: DataProfile, out: Path, paths: dict[str, Path]
) -> list[Stage]:
    """The stages in order, each with its done-test and command."""
    py = sys.executable
    train = [py, "-m", "trainer.train", "--resume", "--config"]
    gen_dir = out / "generator"
    stages = [
        Stage("ce", lambda: (out / "ce" / "detector" / "detector.json").is_file(), [*train, str(paths["ce"])])
    ]
    published = (
        None
        if (args.pretrained or args.generator or args.fit)
        else published_generator(profile.data["benchmark"])
    )
    if args.generator:
        source = Path(args.generator)
        stages.append(
            Stage(
                "generator",
                lambda: (gen_dir / "model_index.json").is_file(),
                run=lambda: copy_generator(source, gen_dir),
                about=f"copy of {source}",
            )
        )
    elif published is not None and profile.data.get("seed", 0) == 0 and profile.image_size == 32:
        stages.append(
            Stage(
                "generator",
                lambda: (gen_dir / "model_index.json").is_file(),
                run=lambda: copy_generator(published, gen_dir),
                about=f"the published generator {published} (fit it yourself with --fit)",
            )
        )
    else:
        fit = [py, "-m", "synth", "fit-generator", "--config", str(paths["generator"]), "--out", str(gen_dir)]
        about = f"textual inversion of {args.pretrained}" if args.pretrained else "embedded generator fit"
        stages.append(Stage("generator", lambda: (gen_dir / "model_index.json").is_file(), fit, about=about))
    stages += [
        Stage(
            "teacher",
            lambda: (out / "teacher" / "detector" / "detector.json").is_file(),
            [*train, str(paths["teacher"])],
        ),
        Stage(
            "outliers",
            lambda: (out / "outliers" / "card.json").is_file(),
            [
                py,
                "-m",
                "synth",
                "generate",
                "--config",
                str(paths["outliers"]),
                "--out",
                str(out / "outliers"),
            ],
        ),
        Stage(
            "oal",
            lambda: (out / "oal" / "detector" / "detector.json").is_file(),
            [*train, str(paths["oal"])],
            before=lambda: fit_oal_to_outliers(out, paths["oal"], profile),
        ),
        Stage("report", lambda: (out / "report.md").is_file(), run=lambda: write_report(out, profile)),
    ]
    return stages


def run_stage(stage: Stage, out: Path) -> float:
    """Run one stage (its output streams to this terminal); returns its wall time in seconds."""
    started = time.perf_counter()
    print(f"\n=== pipeline: {stage.name}" + (f" ({stage.about})" if stage.about else ""), flush=True)
    if stage.before is not None:
        stage.before()
    if stage.run is not None:
        stage.run()
    else:
        assert stage.command is not None
        code = subprocess.call(stage.command)
        if code != 0:
            raise PipelineError(
                f"stage {stage.name} failed (exit {code}); fix what its output says and run the same command "
                f"again: finished stages are skipped and {stage.name} resumes from its last checkpoint "
                f"(its config: {out / 'configs' / (stage.name + '.yaml')})"
            )
    if not stage.done():
        raise PipelineError(
            f"stage {stage.name} exited 0 but left no complete output under {out}; see its log above, "
            "then run the same command again"
        )
    return time.perf_counter() - started


MIN_HOLDOUT = 10  # held-out synthetic outliers that score selection needs


def fit_oal_to_outliers(out: Path, config: Path, profile: DataProfile) -> None:
    """Turn off what the synthesised outliers cannot feed (too few kept images), saying so."""
    from oodforge.outliers import OutlierDataset

    ds = OutlierDataset.load(out / "outliers")
    cfg = read_yaml(config)
    n_train = len(ds._image_paths("train"))
    n_held = len(ds._image_paths("holdout"))
    changes = []
    batch = int(cfg.get("train", {}).get("batch_size", 128))
    if cfg["method_args"].get("pixel_term") and n_train < batch:
        cfg["method_args"]["pixel_term"] = None
        changes.append(
            f"pixel_term off: only {n_train} kept pixel outliers for training (a batch is {batch})"
        )
    if cfg.get("export", {}).get("score") == "auto" and n_held < MIN_HOLDOUT:
        cfg["export"]["score"] = "knn"
        changes.append(
            f"export.score knn instead of auto: only {n_held} held-out pixel outliers to choose on"
        )
    if changes:
        for change in changes:
            note = f"{change}; generate more (OUT/configs/outliers.yaml counts.pixel, max_candidates_factor)"
            print(f"pipeline: note: {note}")
            profile.notes.append(note)
        config.write_text(
            f"# adjusted by python -m trainer.pipeline to the outliers it got\n{yaml.safe_dump(cfg, sort_keys=False)}"
        )


# --------------------------------------------------------------------------- report
def _held_out_auroc(out: Path, profile: DataProfile) -> dict[str, float]:
    """AUROC of each detector's own score: ID val vs the held-out synthetic outliers."""
    from oodforge.detector import ClassifierDetector
    from oodforge.metrics import auroc
    from oodforge.outliers import OutlierDataset

    held = OutlierDataset.load(out / "outliers").images("holdout")
    held_images = [held[i][0] for i in range(len(held))]
    val = [profile.benchmark.val[i][0] for i in range(len(profile.benchmark.val))]
    result = {}
    for name in ("ce", "oal"):
        detector = ClassifierDetector.load(out / name / "detector")
        result[name] = auroc(detector.predict(val).scores, detector.predict(held_images).scores)
    return result


def fullspectrum_inputs(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """CE re-evaluated with the generator reference (it trained before the outliers existed) and both shortcuts."""
    from trainer import evaluate, shortcut

    ce_eval = out / "ce" / "fullspectrum.json"
    if not ce_eval.is_file():
        scores = ",".join(json.loads((out / "ce" / "report.json").read_text())["scores"])
        evaluate.main(["--detector", str(out / "ce" / "detector"), "--reference", str(out / "outliers"),
                       "--data", str(out / "ce" / "config.json"), "--scores", scores, "--out", str(ce_eval),
                       "--device", "cpu"])  # fmt: skip
    shortcuts = {}
    for name in ("ce", "oal"):
        path = out / name / "shortcut.json"
        if not path.is_file():
            shortcut.main(
                [
                    "--detector",
                    str(out / name / "detector"),
                    "--outliers",
                    str(out / "outliers"),
                    "--out",
                    str(path),
                ]
            )
        if path.is_file():
            shortcuts[name] = json.loads(path.read_text())
    return json.loads(ce_eval.read_text()), shortcuts


def write_report(out: Path, profile: DataProfile) -> None:
    """``OUT/report.md``: the data, the stages' outputs and CE vs OAL (classic and full-spectrum)."""
    from trainer.compare import comparison_markdown, fullspectrum_comparison_markdown, load_report

    reports = {name: load_report(out / name) for name in ("ce", "oal")}
    ce_full, shortcuts = fullspectrum_inputs(out)
    reports["ce"] = {**ce_full, "score": reports["ce"]["score"]}
    lines = [
        f"# Pipeline report: {out}",
        "",
        f"Data: `{profile.data['benchmark']}`"
        + (f" at `{profile.data.get('root')}`" if profile.data.get("root") else ""),
        f"{len(profile.per_class)} classes, {profile.n_train} train / {len(profile.benchmark.val)} val / "
        f"{len(profile.benchmark.test)} test ID images at {profile.image_size}x{profile.image_size}; "
        f"train images per class: " + ", ".join(f"{n} {c}" for n, c in profile.per_class.items()) + ".",
        f"Unreadable files skipped: {len(profile.unreadable)}"
        + (
            ""
            if not profile.unreadable
            else " ("
            + ", ".join(profile.unreadable[:10])
            + (", ..." if len(profile.unreadable) > 10 else "")
            + ")"
        ),
        *[f"Note: {n}" for n in profile.notes],
        "",
        "Stages: `ce/`, `generator/`, `teacher/`, `outliers/`, `oal/` (each with its report), configs in `configs/`.",
        "",
    ]
    chosen = reports["oal"].get("score_selection", {}).get("chosen")
    if chosen:
        lines += [
            f"OAL ships with the **{chosen}** score (chosen by the validation rule: "
            f"{reports['oal']['score_selection']['criterion']}).",
            "",
        ]
    if profile.benchmark.ood:
        scores = list(dict.fromkeys([reports["ce"]["score"], reports["oal"]["score"]]))
        lines.append(
            comparison_markdown(
                reports, [s for s in scores if all(s in r["scores"] for r in reports.values())]
            )
        )
    else:
        held = _held_out_auroc(out, profile)
        lines += [
            "No test OOD folders were given (`--ood NAME=DIR`), so there are no test OOD metrics.",
            "",
            "| detector | ID test accuracy | AUROC: ID val vs held-out synthetic outliers |",
            "|---|---:|---:|",
            *[
                f"| {n} | {100 * reports[n]['id_accuracy']:.2f}% | {100 * held[n]:.2f}% |"
                for n in ("ce", "oal")
            ],
        ]
    lines += ["", fullspectrum_comparison_markdown(reports, shortcuts)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def serve_lines(out: Path, example: str) -> str:
    """The commands that serve the new detector and score one image with it."""
    return (
        "serve it:\n"
        f"  OODFORGE_DETECTORS_DIR={out} OODFORGE_DEFAULT_DETECTOR=oal .venv/bin/uvicorn api.app:app --host 127.0.0.1 --port 8000\n"
        f"  (or: make serve SERVE_CONFIG=configs/serve/demo.yaml OODFORGE_DETECTORS_DIR={out})\n"
        "score an image:\n"
        f"  curl -F files=@{example} 'http://127.0.0.1:8000/score?detector=oal'"
    )


# --------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m trainer.pipeline``."""
    p = argparse.ArgumentParser(prog="python -m trainer.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="image folder (DIR/<class>/*) or CIFAR python dir")
    p.add_argument(
        "--benchmark", default=None, help="imagefolder (default with --data), cifar10, cifar100, mnist-open"
    )
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=DIR[:near|far]",
        help="a test OOD folder (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory, e.g. runs/mydata")
    p.add_argument(
        "--pretrained", default=None, help="a diffusers SD checkpoint (Hub id or dir) for textual inversion"
    )
    p.add_argument("--generator", type=Path, default=None, help="use this fitted generator directory as is")
    p.add_argument(
        "--fit", action="store_true", help="fit the embedded generator even where one is published"
    )
    p.add_argument(
        "--fit-minutes", type=float, default=10.0, help="time budget of the embedded UNet fit, minutes"
    )
    p.add_argument("--invert-steps", type=int, default=300, help="textual-inversion steps with --pretrained")
    p.add_argument("--image-size", type=int, default=None, help="model input side (default: from the data)")
    p.add_argument("--device", default="auto", help="generator device for --pretrained (auto, cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    p.add_argument("--rederive", action="store_true", help="rewrite OUT/configs/*.yaml from the data")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the stages that are not done yet; bad data or arguments exit 2 with what to fix."""
    args = parser().parse_args(argv)
    out = args.out
    try:
        profile = profile_data(args)
        for note in profile.notes:
            print(f"pipeline: note: {note}")
        configs = derive_configs(args, profile, out)
        paths = write_configs(configs, out, args.rederive, args.overrides)
        (out / "pipeline.json").write_text(
            json.dumps({"argv": sys.argv[1:] if argv is None else argv, "data": profile.data}, indent=2)
        )
        times: dict[str, float] = {}
        for stage in build_stages(args, profile, out, paths):
            if stage.done():
                print(
                    f"pipeline: {stage.name} is done ({out / stage.name if stage.name != 'report' else out / 'report.md'}); skipped"
                )
            else:
                times[stage.name] = run_stage(stage, out)
            if stage.name == args.stop_after:
                break
    except (PipelineError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if times:
        print("\npipeline: stage times " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if (out / "report.md").is_file():
        print(f"\nreport: {out / 'report.md'}\n{(out / 'report.md').read_text()}")
        example = (
            next(iter(profile.benchmark.test.paths), "IMAGE.png")
            if hasattr(profile.benchmark.test, "paths")
            else "IMAGE.png"
        )
        print(serve_lines(out, str(example)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
