"""ID images that carry the generator's artifacts: generated ID-class images and VAE round trips of real ID.

Synthetic outliers are decoder outputs. If only outliers carry decoder artifacts, a detector can learn
"decoded = outlier" instead of the novelty (issue 23's blur detector). The synth stage therefore also
writes a *reference* of ID images made by the same generator, with their labels:

* ``generated`` — images sampled for each ID class from its own (unchanged) placeholder token, split
  into ``train`` / ``val`` / ``test`` by index (3:1:1);
* ``roundtrip`` — every image of the ID train, val and test splits encoded and decoded by the VAE,
  index-aligned with the benchmark's splits.

They are covariate-shifted ID (csID) for evaluation (they must be accepted), artifact-balanced ID for
training (decoded images on both sides of the boundary), and the contrast for score selection on a user's
own data. Format: ``<outliers>/reference/images.safetensors`` (uint8 ``[N, H, W, 3]`` tensors
``generated/<split>``, ``roundtrip/<split>`` and int64 labels ``.../labels``) and ``card.json`` (generator,
data config, counts); written atomically by :mod:`synth.reference`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from oodforge.data.base import ArrayImageSet

REFERENCE_DIR = "reference"
IMAGES_FILE = "images.safetensors"
CARD_FILE = "card.json"
KINDS = ("generated", "roundtrip")
SPLITS = ("train", "val", "test")


def reference_dir(outliers: Path) -> Path:
    """Where the reference of the outlier dataset at ``outliers`` lives."""
    return Path(outliers) / REFERENCE_DIR


@dataclass
class Reference:
    """A loaded reference: ``sets[(kind, split)]`` are labelled ID image sets, ``card`` how they were made."""

    root: Path
    sets: dict[tuple[str, str], ArrayImageSet]
    card: dict

    @classmethod
    def load(cls, root: Path) -> Reference:
        """Read ``root`` (a ``reference/`` directory, or an outlier dataset that holds one).

        Raises:
            FileNotFoundError: no complete reference there, with the command that writes one.
        """
        root = Path(root)
        if not (root / IMAGES_FILE).is_file() and (reference_dir(root) / IMAGES_FILE).is_file():
            root = reference_dir(root)
        if not (root / CARD_FILE).is_file() or not (root / IMAGES_FILE).is_file():
            raise FileNotFoundError(
                f"{root} holds no generator reference (card.json + images.safetensors); write it with "
                "`python -m synth reference --config <the synth config> --out <outlier dataset dir>`"
            )
        tensors = load_file(str(root / IMAGES_FILE))
        sets = {}
        for kind in KINDS:
            for split in SPLITS:
                key = f"{kind}/{split}"
                if key in tensors:
                    sets[(kind, split)] = ArrayImageSet(
                        f"{kind}-{split}", tensors[key], tensors[f"{key}/labels"]
                    )
        return cls(root, sets, json.loads((root / CARD_FILE).read_text()))

    def get(self, kind: str, split: str) -> ArrayImageSet | None:
        """The ``kind`` images of ``split`` (``None`` when the reference has none)."""
        return self.sets.get((kind, split))


def find_reference(*candidates: Path | str | None) -> Reference | None:
    """The first of ``candidates`` (reference or outlier dataset directories) that holds a reference."""
    for c in candidates:
        if c is None:
            continue
        try:
            return Reference.load(Path(c))
        except FileNotFoundError:
            continue
    return None


def split_of(index: int) -> str:
    """``train`` / ``val`` / ``test`` of the ``index``-th generated image of a class (3:1:1)."""
    return ("train", "train", "train", "val", "test")[index % 5]


def as_uint8(images: np.ndarray) -> np.ndarray:
    """Contiguous uint8 ``[N, H, W, 3]`` (the stored layout)."""
    return np.ascontiguousarray(images, dtype=np.uint8)
