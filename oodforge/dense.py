"""Dense (per-pixel) OOD math: the JS divergence to the uniform, per-pixel scores, image pooling, pasting.

Everything here is a pure function on tensors, tested against its formula (Grcić, Bevandić & Šegvić,
"Dense out-of-distribution detection by robust learning on synthetic negative data", NFlowJS):

- :func:`js_to_uniform` — ``JS(U ‖ p)`` with ``p = softmax(f)`` per pixel, in ``[0, ln 2]``. It is 0 where
  the prediction is uniform (what the model learns on negative pixels) and grows with confidence.
- ``PIXEL_SCORES`` — per-pixel ID scores, **higher = more in-distribution** like every score in oodforge:
  ``js`` (= ``JS(U ‖ p)``; the paper's anomaly score ``−JS`` is its negation), ``msp`` and ``energy``.
- ``POOLINGS`` — how a ``[N, H, W]`` score map becomes one image score (``quantile``, ``mean``, ``min``).
- :func:`paste` — alpha-composites a patch into an image (gradients reach the patch) and returns the
  exact mask of the pixels it turned negative.

Example:
    >>> logits = segmenter(pixels)                      # [N, K, H, W]
    >>> maps = PIXEL_SCORES.get("js")(logits)           # [N, H, W], higher = more ID
    >>> scores = pool(maps, PoolingSpec(name="quantile", q=0.01))   # [N]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from oodforge.config import StrictModel
from oodforge.registry import Registry
from oodforge.scores import energy, msp

LN2 = math.log(2.0)
NEGATIVE_ALPHA = 0.5  # a pasted pixel with alpha >= this is a negative pixel; 0 < alpha < this is void


def js_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Jensen-Shannon divergence ``JS(U ‖ p)`` between the uniform ``U`` and ``p = softmax(f)`` along ``dim``.

    ``JS(U ‖ p) = ½ KL(U ‖ m) + ½ KL(p ‖ m)`` with ``m = (U + p) / 2``; natural log, so ``0 ≤ JS ≤ ln 2``
    (0 iff ``p`` is uniform). Computed from ``log_softmax`` so saturated logits stay finite.

    Args:
        logits: Logits with the K classes along ``dim`` (e.g. ``[N, K, H, W]``).
        dim: The class dimension.

    Returns:
        The divergence with ``dim`` removed (e.g. ``[N, H, W]``).
    """
    k = logits.shape[dim]
    log_p = logits.float().log_softmax(dim=dim)
    p = log_p.exp()
    m = 0.5 * (p + 1.0 / k)
    log_m = m.log()
    kl_u_m = ((-math.log(k) - log_m) / k).sum(dim=dim)
    kl_p_m = (p * (log_p - log_m)).sum(dim=dim)
    return (0.5 * (kl_u_m + kl_p_m)).clamp(0.0, LN2)


PixelScore = Callable[[torch.Tensor], torch.Tensor]
PIXEL_SCORES: Registry[PixelScore] = Registry("pixel score")
"""Name -> ``f(logits [N, K, H, W]) -> [N, H, W]``, higher = more in-distribution."""
PIXEL_SCORES.register("js")(js_to_uniform)
PIXEL_SCORES.register("msp")(msp)  # both reduce over dim 1, so they work per pixel unchanged
PIXEL_SCORES.register("energy")(energy)


class PoolingSpec(StrictModel):
    """How a score map becomes an image score.

    Attributes:
        name: ``quantile`` (the ``q``-quantile of the map: a low quantile reacts to a small anomalous
            region and ignores a few noisy pixels), ``mean`` or ``min``.
        q: The quantile of ``quantile``.
    """

    name: str = "quantile"
    q: float = Field(0.01, ge=0.0, le=1.0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in POOLINGS:
            raise ValueError(f"unknown pooling {name!r}; choose one of: {', '.join(POOLINGS.names())}")
        return name


POOLINGS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("pooling")
POOLINGS.register("quantile")(lambda flat, q: torch.quantile(flat, q, dim=1))
POOLINGS.register("mean")(lambda flat, q: flat.mean(dim=1))
POOLINGS.register("min")(lambda flat, q: flat.amin(dim=1))


def pool(maps: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """Image scores ``[N]`` from score maps ``[N, H, W]`` (higher = more in-distribution)."""
    if maps.ndim != 3:
        raise ValueError(f"score maps must be [N, H, W], got shape {tuple(maps.shape)}")
    return POOLINGS.get(spec.name)(maps.flatten(1).float(), spec.q)


def paste(
    image: torch.Tensor,
    patch: torch.Tensor,
    top: int,
    left: int,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alpha-composite ``patch`` into ``image`` at ``(top, left)``: ``out = image·(1 − a) + patch·a``.

    The result is a new tensor (nothing is written in place), so gradients flow to ``patch`` (a flow's
    sample) and to ``image``.

    Args:
        image: ``[C, H, W]``.
        patch: ``[C, h, w]``, fully inside the image at ``(top, left)``.
        top: Row of the patch's top-left pixel.
        left: Column of the patch's top-left pixel.
        alpha: ``[h, w]`` opacity in ``[0, 1]``; ``None`` = an opaque square.

    Returns:
        ``(pasted [C, H, W], negative [H, W] bool, void [H, W] bool)``: ``negative`` is exactly the pixels
        with ``a ≥ 0.5`` (an opaque patch: its whole square), ``void`` those with ``0 < a < 0.5``.
    """
    if image.ndim != 3 or patch.ndim != 3 or patch.shape[0] != image.shape[0]:
        raise ValueError(
            f"paste needs image [C, H, W] and patch [C, h, w] with the same C; got {tuple(image.shape)} "
            f"and {tuple(patch.shape)}"
        )
    _, height, width = image.shape
    _, h, w = patch.shape
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"a {h}x{w} patch at ({top}, {left}) does not fit in a {height}x{width} image")
    if alpha is None:
        alpha = torch.ones(h, w, dtype=image.dtype, device=image.device)
    if alpha.shape != (h, w):
        raise ValueError(f"alpha must be [{h}, {w}] like the patch, got {tuple(alpha.shape)}")
    pad = (left, width - left - w, top, height - top - h)
    a = F.pad(alpha.to(image.dtype), pad)
    out = image * (1 - a) + F.pad(patch.to(image.dtype), pad) * a
    a = a.detach()
    return out, a >= NEGATIVE_ALPHA, (a > 0) & (a < NEGATIVE_ALPHA)
