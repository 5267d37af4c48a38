"""Detector artifact files: atomic writes, checksums, reading the spec JSON and the weights.

An artifact is a directory with ``model.safetensors`` and ``detector.json`` (DESIGN.md §4). This module
knows files, not kinds: :mod:`oodforge.detector` validates the spec and its ``KINDS`` registry picks the
class that rebuilds the model.
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
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SUPPORTED_FORMAT = 2  # the newest detector.json format this version reads
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "detector.json"

SpecT = TypeVar("SpecT", bound=BaseModel)


class ArtifactError(RuntimeError):
    """A detector directory is missing, incomplete, tampered with or of an unknown format."""


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a detector's numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("oodforge", "torch", "transformers", "safetensors", "faiss-cpu", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(path: str | Path, tensors: dict[str, torch.Tensor], spec: SpecT) -> SpecT:
    """Write ``tensors`` + ``spec`` (its ``checksums`` filled in) atomically: temp dir + rename.

    An existing directory at ``path`` is replaced; the directory is world-readable (0755, files 0644)
    so a server running as another user (a container's) can read it. Returns the spec as written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(
            tensors,
            str(tmp / WEIGHTS_FILE),
            metadata={
                "format": "pt"
            },  # one key: safetensors orders metadata keys at random, and identical weights must give an identical checksum
        )
        spec = spec.model_copy(update={"checksums": {WEIGHTS_FILE: sha256(tmp / WEIGHTS_FILE)}})
        (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
        for file in (tmp / WEIGHTS_FILE, tmp / SPEC_FILE):
            file.chmod(0o644)
        tmp.chmod(0o755)
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
    if data.get("format_version", 1) > SUPPORTED_FORMAT:
        raise ArtifactError(
            f"{spec_file} has format_version {data['format_version']}; upgrade oodforge to load it"
        )
    return data


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
