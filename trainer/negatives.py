"""Synthetic negative patches for dense OOD training, from a registry of sources (``NEGATIVES``).

- ``flow``: a normalizing flow (zuko ``RealNVP``) on ``crop`` x ``crop`` RGB patches. It is pre-trained by
  maximum likelihood on random crops of inlier scenes, then trained jointly with the segmenter: its
  samples are drawn with ``rsample`` (gradients kept), resized to a random side and pasted as opaque
  squares, so the segmenter's negative-pixel loss reaches the flow through the pasted pixels, next to
  the flow's own likelihood loss on inlier crops (NFlowJS).
- ``synth``: the kept pixel outliers of a synth outlier dataset (issue "synth"), resized to a random side
  and composited like the scene's digits: a random bright colour with the outlier's luminance as alpha.
  The negative pixels are those with alpha ≥ 0.5; 0 < alpha < 0.5 is void.

:func:`paste_negatives` puts one patch into every scene of a batch and relabels the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zuko
from pydantic import Field
from torch import nn

from oodforge.config import ConfigError, StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.dense import paste
from oodforge.outliers import OutlierDataset
from oodforge.progress import progress
from oodforge.registry import Registry
from trainer.losses.dense import VOID


class FlowConfig(StrictModel):
    """The ``flow`` source.

    Attributes:
        crop: Side of the patches the flow models (it has ``3·crop²`` dimensions).
        transforms: Number of RealNVP coupling transforms.
        hidden: Hidden widths of each coupling network.
        pretrain_steps: Maximum-likelihood steps on inlier crops before joint training.
        batch_size: Crops per pre-training step and per joint-training likelihood term.
        lr: Learning rate of the flow (Adam), in pre-training and joint training.
        nll_weight: Weight of the flow's likelihood loss in the joint objective.
    """

    crop: int = Field(16, ge=4, le=64)
    transforms: int = Field(4, ge=1)
    hidden: list[int] = [256, 256]
    pretrain_steps: int = Field(600, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    nll_weight: float = Field(1.0, ge=0)


class NegativesConfig(StrictModel):
    """Which negatives are pasted into training scenes, and how.

    Attributes:
        sources: ``flow``, ``synth``, both (each scene draws one of them at random) or none (the
            segmenter sees no negatives: the max-softmax / energy baseline).
        beta: Weight β of the JS term on negative pixels.
        side: Range of the side (px) of a pasted patch.
        synth_dir: The synth outlier dataset the ``synth`` source reads.
        flow: The ``flow`` source's settings.
    """

    sources: list[str] = []
    beta: float = Field(0.03, ge=0)
    side: tuple[int, int] = (12, 28)
    synth_dir: Path = Path("runs/outliers")
    flow: FlowConfig = FlowConfig()


@dataclass
class Patches:
    """Negative patches: ``pixels`` ``[n, 3, s, s]`` (model space) and ``alpha`` ``[n, s, s]`` or ``None``."""

    pixels: torch.Tensor
    alpha: torch.Tensor | None


class NegativeSource(nn.Module):
    """A source of negative patches; a module so that trainable sources train and checkpoint with the model."""

    def prepare(self, scenes: torch.Tensor, run_dir: Path) -> None:
        """One-off work before training (e.g. pre-training), given the pre-processed inlier scenes."""

    def sample(self, n: int, generator: torch.Generator) -> Patches:
        """``n`` negative patches, drawn with ``generator``."""
        raise NotImplementedError

    def aux_loss(self, scenes: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """The source's own loss on a batch of inlier scenes (added to the total), or ``None``."""
        return None


NEGATIVES: Registry[Callable[[NegativesConfig, Preprocess], NegativeSource]] = Registry("negative source")


def random_crops(scenes: torch.Tensor, n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``side`` x ``side`` crops ``[n, C, side, side]`` of random scenes ``[N, C, H, W]``."""
    count, _, height, width = scenes.shape
    idx = torch.randint(0, count, (n,), generator=generator)
    top = torch.randint(0, height - side + 1, (n,), generator=generator)
    left = torch.randint(0, width - side + 1, (n,), generator=generator)
    return torch.stack(
        [
            scenes[i, :, y : y + side, x : x + side]
            for i, y, x in zip(idx.tolist(), top.tolist(), left.tolist(), strict=True)
        ]
    )


@NEGATIVES.register("flow")
class FlowNegatives(NegativeSource):
    """RealNVP on flattened crops; likelihood in nats per dimension, samples with gradients."""

    PRETRAINED = "flow_pretrained.pt"

    def __init__(self, cfg: NegativesConfig, preprocess: Preprocess) -> None:
        super().__init__()
        self.cfg = cfg.flow
        self.dim = 3 * self.cfg.crop**2
        self.flow = zuko.flows.RealNVP(
            features=self.dim, transforms=self.cfg.transforms, hidden_features=self.cfg.hidden
        )
        # dequantisation noise: one 8-bit step in model space (pre-processing maps [0, 1] by (x - m) / s)
        self.step = 1.0 / (255.0 * min(preprocess.std))

    def nll(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean negative log-likelihood per dimension (nats) of dequantised crops ``[n, 3, c, c]``."""
        x = crops.flatten(1)
        x = x + self.step * torch.rand(x.shape, generator=generator, device=x.device)
        return -self.flow().log_prob(x).mean() / self.dim

    def prepare(self, scenes: torch.Tensor, run_dir: Path) -> None:
        """Maximum-likelihood pre-training on inlier crops (cached in the run directory for restarts)."""
        cache = run_dir / self.PRETRAINED
        if cache.is_file():
            self.flow.load_state_dict(torch.load(cache, weights_only=True))
            return
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.Adam(self.flow.parameters(), lr=self.cfg.lr)
        bar = progress(range(self.cfg.pretrain_steps), desc="pre-train flow")
        for _ in bar:
            loss = self.nll(random_crops(scenes, self.cfg.batch_size, self.cfg.crop, generator), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(nll=f"{loss.item():.3f}")
        tmp = cache.with_suffix(".tmp")
        torch.save(self.flow.state_dict(), tmp)
        tmp.replace(cache)

    def sample(self, n: int, generator: torch.Generator) -> Patches:
        """``n`` patches sampled from the flow (with gradients; the global RNG, not ``generator``)."""
        del generator  # zuko samples with the global torch RNG (seeded by the trainer)
        c = self.cfg.crop
        pixels = self.flow().rsample((n,)).view(n, 3, c, c)
        return Patches(pixels=pixels, alpha=None)

    def aux_loss(self, scenes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The flow's weighted NLL on random crops of the inlier ``scenes`` (trains it jointly)."""
        crops = random_crops(scenes, self.cfg.batch_size, self.cfg.crop, generator)
        return self.cfg.nll_weight * self.nll(crops, generator)


@NEGATIVES.register("synth")
class SynthNegatives(NegativeSource):
    """Kept pixel outliers of a synth dataset, composited with their luminance as alpha."""

    def __init__(self, cfg: NegativesConfig, preprocess: Preprocess) -> None:
        super().__init__()
        try:
            images = OutlierDataset.load(cfg.synth_dir).images()
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"negatives.synth_dir: {err} (make demo generates runs/outliers)") from None
        grey = np.stack(
            [np.asarray(images[i][0].convert("L"), dtype=np.float32) / 255.0 for i in range(len(images))]
        )
        self.register_buffer("alphas", torch.from_numpy(grey), persistent=False)
        self.preprocess = preprocess

    def sample(self, n: int, generator: torch.Generator) -> Patches:
        """``n`` random outliers as alpha masks, each filled with a random light colour."""
        idx = torch.randint(0, len(self.alphas), (n,), generator=generator)
        alpha = self.alphas[idx]
        colour = 150.0 + 105.0 * torch.rand(n, 3, 1, 1, generator=generator)
        pixels = self.preprocess.tensor((colour / 255.0).expand(n, 3, *alpha.shape[-2:]).contiguous())
        return Patches(pixels=pixels, alpha=alpha)


def build_sources(cfg: NegativesConfig, preprocess: Preprocess) -> nn.ModuleDict:
    """The configured sources, by name (empty when ``cfg.sources`` is empty)."""
    for name in cfg.sources:
        NEGATIVES.get(name)  # a clear error for an unknown name, before anything is built
    if len(set(cfg.sources)) != len(cfg.sources):
        raise ConfigError(f"negatives.sources lists a source twice: {cfg.sources}")
    return nn.ModuleDict({name: NEGATIVES.get(name)(cfg, preprocess) for name in cfg.sources})


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)


def paste_negatives(
    scenes: torch.Tensor,
    labels: torch.Tensor,
    sources: nn.ModuleDict,
    side: tuple[int, int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Paste one negative patch into every scene; each scene draws its source uniformly from ``sources``.

    Args:
        scenes: Pre-processed scenes ``[N, 3, H, W]``.
        labels: Their labels ``[N, H, W]``.
        sources: The negative sources (at least one).
        side: Range of the patches' side in pixels (clipped to the scene).
        generator: Randomness of sources, sizes and positions.

    Returns:
        ``(scenes, labels, negative, info)``: the pasted scenes (gradients reach trainable sources), the
        labels with void where a patch made a pixel void, the negative-pixel mask ``[N, H, W]`` and
        ``info`` (patches per source).
    """
    n, _, height, width = scenes.shape
    names = list(sources)
    choice = torch.randint(0, len(names), (n,), generator=generator)
    hi = min(side[1], height, width)
    sides = torch.randint(min(side[0], hi), hi + 1, (n,), generator=generator).tolist()
    out = list(scenes.unbind(0))
    labels = labels.clone()
    negative = torch.zeros(n, height, width, dtype=torch.bool, device=scenes.device)
    info: dict[str, Any] = {}
    for k, name in enumerate(names):
        rows = torch.nonzero(choice == k).flatten().tolist()
        if not rows:
            continue
        info[name] = len(rows)
        patches = sources[name].sample(len(rows), generator)
        for j, row in enumerate(rows):
            s = sides[row]
            pixels = _resize(patches.pixels[j : j + 1], s)[0]
            alpha = (
                None if patches.alpha is None else _resize(patches.alpha[j][None, None], s)[0, 0].clamp(0, 1)
            )
            top = int(torch.randint(0, height - s + 1, (), generator=generator))
            left = int(torch.randint(0, width - s + 1, (), generator=generator))
            out[row], neg, void = paste(out[row], pixels.to(scenes.device), top, left, alpha)
            negative[row] = neg
            labels[row][void] = VOID
    return torch.stack(out), labels, negative, info
