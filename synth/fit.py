"""``fit-generator``: train the embedded Stable Diffusion pipeline on the ID train split (CPU, minutes).

Recipe (each part measured to matter on this data; see BENCHMARKS.md):
1. the VAE is fitted first (L1 + small KL), then frozen; its latents are standardised
   (``scaling_factor`` = 1 / std of the latents), as SD does;
2. the UNet and the text encoder (placeholder tokens included) learn the class-prompted denoising
   task with min-SNR-γ loss weighting, 10% prompt dropout for classifier-free guidance, AdamW with
   warm-up + cosine decay, and an EMA of the UNet weights that is what gets saved.

Both loops are resumable (``synth.checkpoint``): they ``accelerator.save_state`` every
``checkpoint_every_steps`` steps and at their end, and a re-run continues from the newest checkpoint.
Every random draw (batches, augmentation shifts, posterior samples, noise, timesteps, prompt dropout)
comes from the one ``torch.Generator`` passed in, which is checkpointed with the models, so a killed and
resumed fit ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from pydantic import Field

from oodforge.config import StrictModel
from oodforge.tokens import placeholder_token
from synth.checkpoint import GeneratorState, Stage
from synth.generator import PROMPT

if TYPE_CHECKING:
    from diffusers import DDPMScheduler
    from transformers import PreTrainedTokenizerBase

BOOKKEEPING_KEYS = {"checkpoint_every_steps", "keep_checkpoints", "max_minutes"}
"""Config keys that do not change what a stage computes (left out of its checkpoint fingerprint)."""
VAE_KEYS = {"vae_steps", "vae_lr", "vae_kl_weight", "batch_size", "warmup_steps", "augment_shift"}
"""The ``fit`` keys the VAE stage depends on (the UNet stage depends on every non-bookkeeping key)."""


class FitConfig(StrictModel):
    """The embedded generator's recipe (``fit:`` in ``configs/synth/tiny_mnist_open.yaml``).

    ``checkpoint_every_steps`` and ``keep_checkpoints`` set how often each stage saves its accelerate
    state (it also saves at the stage's end) and how many checkpoints it keeps; ``max_minutes`` caps the
    UNet stage's wall time (measured from the last start, so a resumed stage gets the budget again).
    """

    vae_steps: int = 600
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    unet_steps: int = 4000
    unet_lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 100
    ema_decay: float = 0.995
    snr_gamma: float = 5.0
    prompt_dropout: float = 0.1
    augment_shift: int = 2
    max_minutes: float | None = None
    checkpoint_every_steps: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


def _shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation of a batch by up to ``pad`` pixels (edge padding)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fit_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: FitConfig,
    gen: torch.Generator,
    log: Callable,
    stage: Stage,
) -> None:
    """Train the VAE on images in [-1, 1], in place (then in eval mode; see :func:`latent_scaling`).

    Resumes from ``stage``'s newest checkpoint; once the stage has ended, only restores its final state
    (the VAE weights and ``gen``).
    """
    accelerator = Accelerator(device_placement=False)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, cfg.warmup_steps))
    vae, opt, sched = accelerator.prepare(vae, opt, sched)
    done = stage.begin(accelerator, GeneratorState(gen))
    vae.train()
    bar = stage.steps(done, cfg.vae_steps, desc="fit VAE")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = _shift(images[idx], cfg.augment_shift, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(l1=f"{rec.item():.4f}")
            log({"vae/l1": rec.item()}, step)
        stage.step_done(accelerator, done)
    bar.close()
    stage.finish(accelerator, done)
    vae.eval()


def latent_scaling(means: torch.Tensor) -> float:
    """SD's ``scaling_factor``: 1 / std of the VAE's latent means over the training images."""
    return float(1.0 / means.std())


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds ``[N, C, h, w]`` of ``images``, in batches of 512."""
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(images[i : i + 512]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, class_names: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each class prompt [K, L] and of the empty prompt [1, L]."""
    prompts = [PROMPT.format(token=placeholder_token(c)) for c in class_names]
    kw = {
        "padding": "max_length",
        "max_length": tokenizer.model_max_length,
        "truncation": True,
        "return_tensors": "pt",
    }
    return tokenizer(prompts, **kw).input_ids, tokenizer([""], **kw).input_ids


def fit_unet(
    unet: UNet2DConditionModel,
    text_encoder: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scheduler: DDPMScheduler,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    class_names: list[str],
    scaling: float,
    cfg: FitConfig,
    gen: torch.Generator,
    log: Callable,
    stage: Stage,
) -> UNet2DConditionModel:
    """Train UNet + text encoder on class prompts; returns the EMA UNet.

    ``stage`` checkpoints the UNet, the text encoder, the EMA UNet, optimizer, LR schedule, ``gen`` and
    the step; the loop resumes from its newest checkpoint (and is skipped once the stage has ended).
    """
    mean, std = latents
    ids, empty = prompt_ids(tokenizer, class_names)
    accelerator = Accelerator(device_placement=False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, cfg.warmup_steps))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet, text_encoder, opt, sched = accelerator.prepare(unet, text_encoder, opt, sched)
    done = stage.begin(accelerator, ema, GeneratorState(gen))
    alphas = scheduler.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    bar = stage.steps(done, cfg.unet_steps, desc="fit UNet")
    for step in bar:
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        tokens = ids[labels[idx]].clone()
        drop = torch.rand(len(idx), generator=gen) < cfg.prompt_dropout
        tokens[drop] = empty[0]
        context = text_encoder(tokens)[0]
        pred = unet(zt, t, encoder_hidden_states=context).sample
        target = (
            noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        )
        snr = snr_all[t]
        weight = torch.clamp(snr, max=cfg.snr_gamma) / (
            snr if scheduler.config.prediction_type == "epsilon" else snr + 1
        )
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log({"unet/loss": loss.item()}, step)
        stage.step_done(accelerator, done)
        if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
            log({"unet/stopped_at_step": step}, step)
            break
    bar.close()
    stage.finish(accelerator, done)
    text_encoder.eval()
    return ema


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
