"""``teacher``: the text-aligned encoder of Dream-OOD phase 1 (DESIGN.md §5).

The classifier gets a cosine head: a projection ``z = P(h)`` from the backbone's feature width to the
width D of the generator's token embeddings, and logits ``f_j = cos(z, T(y_j)) / τ`` against the class
anchors T(y) (the generator's per-class placeholder-token embeddings, :mod:`oodforge.tokens`). The loss
is ``CE(f, y)``. The exported detector's features are ``z``, the embedding the synth stage indexes.

    accelerate launch trainer/train_oal.py --config configs/train/teacher.yaml
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from oodforge.backbones import BackboneConfig, HeadConfig, build_classifier
from oodforge.config import ConfigError, StrictModel
from oodforge.data import Benchmark
from oodforge.tokens import load_class_anchors
from trainer.config import TrainConfig
from trainer.methods.base import METHODS, Plan
from trainer.methods.ce import CrossEntropy

FIT_GENERATOR = (
    "python -m synth fit-generator --config configs/synth/tiny_mnist_open.yaml --out runs/generator"
)
GENERATOR_PARTS = ("tokenizer", "text_encoder")


class TeacherArgs(StrictModel):
    """``method_args`` of ``teacher``.

    Attributes:
        generator: diffusers Stable Diffusion directory or Hub id whose ``tokenizer/`` and
            ``text_encoder/`` define the class anchors (only those two parts are read).
        revision: Hub revision (branch, tag or commit) of ``generator``.
        tau: temperature τ of the cosine logits.
    """

    generator: Path
    revision: str | None = None
    tau: float = Field(0.1, gt=0)


def _on_hub(name: str, revision: str | None) -> bool:
    """Whether ``name`` is a Hub model with a text encoder (in the local Hub cache, or online)."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    probe = "text_encoder/config.json"
    if isinstance(try_to_load_from_cache(name, probe, revision=revision), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(name, probe, revision=revision)
    except Exception:  # unreachable Hub, bad revision, no access: the model cannot be loaded either
        return False


def check_generator(generator: str | Path, revision: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``generator`` has a tokenizer and a text encoder.

    ``generator`` may be a local diffusers directory or a Hub model.
    """
    path = Path(generator).expanduser()
    where = f"{generator}" if path.is_absolute() else f"{generator} (relative to {Path.cwd()})"
    if path.is_dir():
        missing = [f"{part}/" for part in GENERATOR_PARTS if not (path / part).is_dir()]
        if missing:
            raise ConfigError(
                f"method_args.generator: {where} has no {' and no '.join(missing)}; it is not a diffusers "
                f"Stable Diffusion directory. Create the tiny generator with `{FIT_GENERATOR}` or point to "
                "a diffusers checkpoint"
            )
        return
    if path.exists():
        raise ConfigError(f"method_args.generator: {where} is a file; it must be a diffusers directory")
    if not _on_hub(str(generator), revision):
        raise ConfigError(
            f"method_args.generator: {where} does not exist (nor is it a reachable Hub model); create "
            f"the tiny generator with `{FIT_GENERATOR}` or point to a diffusers Stable Diffusion "
            "directory or Hub id"
        )


@METHODS.register("teacher")
class TextAlignedTeacher(CrossEntropy):  # the loss is CE, over the cosine head's logits
    """L = CE(f, y) with f_j = cos(P(h(x)), T(y_j)) / τ and T(y) the generator's class anchors."""

    Config = TeacherArgs

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """The backbone with a cosine head over the generator's class anchors."""
        args: TeacherArgs = self.args
        if config.model.head != HeadConfig():
            raise ConfigError(
                "model.head: the teacher method builds its own cosine head (temperature: method_args.tau); "
                "remove model.head from the config"
            )
        check_generator(args.generator, args.revision)
        try:
            anchors = load_class_anchors(args.generator, data.class_names, revision=args.revision)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        model_cfg: BackboneConfig = config.model.model_copy(
            update={"head": HeadConfig(name="cosine", tau=args.tau)}
        )
        return Plan(model=build_classifier(model_cfg, len(data.class_names), anchors=anchors))
