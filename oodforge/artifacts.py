"""What every detector artifact directory shares: atomic writes, checksums, spec reading, kind dispatch.

An artifact is a directory with ``model.safetensors`` and ``detector.json`` (DESIGN.md §4). Its ``kind``
(``classifier``, the default for artifacts that do not name one, or ``dense``) says which class loads
it; :func:`load_artifact` dispatches through ``ARTIFACT_KINDS`` so callers (the API, the evaluator)
never branch on it.

Example:
    >>> detector = load_artifact("runs/dense_flow/detector")   # a DenseDetector
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.registry import Registry

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "detector.json"
DEFAULT_KIND = "classifier"

SpecT = TypeVar("SpecT", bound=StrictModel)


class ArtifactError(RuntimeError):
    """A detector directory is missing, incomplete, tampered with or of an unknown format."""


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("oodforge", "torch", "transformers", "safetensors", "faiss-cpu", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(path: str | Path, tensors: dict[str, torch.Tensor], spec: SpecT) -> SpecT:
    """Write ``tensors`` + ``spec`` (with its ``weights_sha256`` filled in) atomically: temp dir + rename.

    An existing directory at ``path`` is replaced. Returns the spec as written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "oodforge": str(FORMAT_VERSION)}
        )
        spec = spec.model_copy(update={"weights_sha256": sha256(tmp / WEIGHTS_FILE)})
        (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return spec


def read_json(path: Path) -> dict[str, Any]:
    """The raw ``detector.json`` of the artifact at ``path`` (format version checked)."""
    if not path.is_dir():
        raise ArtifactError(f"detector directory {path} does not exist (train one: make demo)")
    spec_file = path / SPEC_FILE
    if not spec_file.is_file():
        raise ArtifactError(f"{spec_file} is missing; {path} is not a detector artifact")
    try:
        data = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{spec_file} is not valid JSON ({err}); re-export the detector") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{spec_file} is not a JSON object; re-export the detector")
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ArtifactError(
            f"{spec_file} has format_version {data['format_version']}; upgrade oodforge to load it"
        )
    return data


def read_spec(path: Path, spec_cls: type[SpecT]) -> SpecT:
    """``detector.json`` of ``path`` validated into ``spec_cls``; :class:`ArtifactError` says what is wrong."""
    try:
        return spec_cls.model_validate(read_json(path))
    except ValidationError as err:
        keys = ", ".join(".".join(map(str, e["loc"])) for e in err.errors())
        raise ArtifactError(
            f"{path / SPEC_FILE} is malformed (problem with: {keys}); re-export the detector"
        ) from None


def read_weights(path: Path, expected_sha256: str, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``, checked against the checksum in the spec."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing; the artifact is incomplete, re-export the detector")
    if verify and sha256(weights) != expected_sha256:
        raise ArtifactError(
            f"{weights} does not match the checksum in {SPEC_FILE}: the file was modified or corrupted; "
            "re-export the detector (or pass verify=False if you changed it on purpose)"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{weights} is not a readable safetensors file ({err}); re-export it") from None


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.`` with the prefix removed."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class Loadable(Protocol):
    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Any: ...


ARTIFACT_KINDS: Registry[type[Loadable]] = Registry("detector kind")


class ArtifactDetector:
    """What both detector kinds share: a model, its ``detector.json`` spec, the device, and ``save``.

    Subclasses add inference and ``load``; :meth:`tensors` says what goes into ``model.safetensors``.
    """

    def __init__(self, model: nn.Module, spec: Any, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def threshold(self) -> float:
        return self.spec.threshold.value

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    @property
    def preprocess(self) -> Preprocess:
        return self.spec.preprocess

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights file's content: the model's state under ``model.``."""
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically (temp dir + rename); an existing directory is replaced."""
        self.spec = write_artifact(path, self.tensors(), self.spec)
        return Path(path)


def load_artifact(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Any:
    """Load any detector artifact: a ``Detector`` (classifier) or a ``DenseDetector`` (per-pixel maps)."""
    import oodforge.dense_detector  # noqa: F401  (registers the kinds)
    import oodforge.detector  # noqa: F401

    path = Path(path)
    kind = read_json(path).get("kind", DEFAULT_KIND)
    try:
        loader = ARTIFACT_KINDS.get(kind)
    except KeyError as err:
        raise ArtifactError(f"{path / SPEC_FILE}: {err.args[0]}; upgrade oodforge to load it") from None
    return loader.load(path, device=device, verify=verify)
