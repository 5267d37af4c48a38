"""``fit-generator``: train the embedded Stable Diffusion pipeline on the ID train split (CPU, minutes).

Recipe (each part measured to matter on this data; see BENCHMARKS.md):
1. the VAE is fitted first (L1 + small KL), then frozen; its latents are standardised
   (``scaling_factor`` = 1 / std of the latents), as SD does;
2. the UNet and the text encoder (placeholder tokens included) learn the class-prompted denoising
   task with min-SNR-γ loss weighting, 10% prompt dropout for classifier-free guidance, AdamW with
   warm-up + cosine decay, and an EMA of the UNet weights that is what gets saved.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from oodforge.config import StrictModel
from oodforge.progress import progress
from oodforge.tokens import placeholder_token
from synth.generator import PROMPT


class FitConfig(StrictModel):
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
    vae: AutoencoderKL, images: torch.Tensor, cfg: FitConfig, gen: torch.Generator, log: Callable
) -> float:
    """Train the VAE on images in [-1, 1]; returns the latent scaling factor (1 / latent std)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, cfg.warmup_steps))
    vae.train()
    bar = progress(range(cfg.vae_steps), desc="fit VAE")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = _shift(images[idx], cfg.augment_shift, gen)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(l1=f"{rec.item():.4f}")
            log({"vae/l1": rec.item()}, step)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, len(images), 512)]
        )
    return float(1.0 / latents.std())


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(images[i : i + 512]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prompt_ids(tokenizer, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
    tokenizer,
    scheduler,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    class_names: list[str],
    scaling: float,
    cfg: FitConfig,
    gen: torch.Generator,
    log: Callable,
) -> UNet2DConditionModel:
    """Train UNet + text encoder on class prompts; returns the EMA UNet."""
    mean, std = latents
    ids, empty = prompt_ids(tokenizer, class_names)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, cfg.warmup_steps))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    snr_all = alphas / (1 - alphas)
    unet.train()
    text_encoder.train()
    started = time.perf_counter()
    bar = progress(range(cfg.unet_steps), desc="fit UNet")
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
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
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
        if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
            log({"unet/stopped_at_step": step}, step)
            break
    text_encoder.eval()
    return ema


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
