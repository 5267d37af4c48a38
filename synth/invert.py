"""Textual inversion: learn only the class placeholder tokens of a pre-trained Stable Diffusion pipeline.

``fit-generator`` with ``pretrained`` set runs this instead of training the embedded pipeline. The VAE,
UNet and text encoder stay frozen; the trainable parameters are the rows of the text encoder's
token-embedding matrix that belong to the class placeholder tokens ``<ood-NAME>`` (``oodforge.tokens``).
The loss is the pipeline's own denoising objective (Gal et al., "An Image is Worth One Word",
arXiv 2208.01618): for an ID image x of class y, prompt "a high-quality image of the <ood-y>",

    z0 = scaling_factor * E(x),  z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε,  L = ‖UNet(z_t, t, c(y)) - target‖²

with target ε or v as the pipeline's scheduler predicts. The learned rows are their own small parameter
(:class:`PlaceholderRows`, ``[K, D]``) spliced into the token-embedding output by a forward hook, and
written into the embedding matrix at the end, so the saved pipeline differs from the input only in those
rows, and the optimiser state (and a checkpoint) is K rows, not the whole 49408-row table.

Resumable: the loop ``accelerator.save_state``s the rows, the AdamW state, the LR schedule, the
``torch.Generator`` of batches/timesteps/noise and the step every ``checkpoint_every_steps`` steps and at
its end (``synth.checkpoint``); a re-run continues from the newest checkpoint with identical results.

Precision: the frozen VAE and UNet run in the dtype they were loaded in (float16/bfloat16 on a GPU);
the text encoder, and so the learned rows, is trained in float32 and cast back afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field
from torch import nn

from oodforge.config import StrictModel
from oodforge.tokens import add_placeholder_tokens
from synth.checkpoint import GeneratorState, Stage
from synth.fit import _cosine, prompt_ids

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline


class InvertConfig(StrictModel):
    """Textual-inversion settings (used when ``fit-generator`` has ``pretrained`` set).

    Attributes:
        steps: Optimiser steps.
        lr: AdamW learning rate of the placeholder rows (after warm-up, cosine decay to 0).
        batch_size: ID train images per step.
        warmup_steps: Linear learning-rate warm-up.
        max_minutes: Optional time budget; the loop stops after this many minutes.
        dtype: Dtype the pipeline is loaded in (the frozen VAE and UNet run in it).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1`` ...
        gradient_checkpointing: Recompute UNet activations in the backward pass (less GPU memory).
        resolution: Side the ID images are resized to for training (and fidelity samples are drawn at);
            default: the pipeline's own (:func:`pipeline_resolution`, 512 for Stable Diffusion 1.5). A
            multiple of the VAE's downsampling factor (8 for SD).
        checkpoint_every_steps: Save the loop's accelerate state this often (and at its end).
        keep_checkpoints: How many of those checkpoints to keep.
    """

    steps: int = Field(1000, ge=1)
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    warmup_steps: int = Field(50, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    resolution: int | None = Field(None, ge=8)
    checkpoint_every_steps: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


def pipeline_resolution(pipe: StableDiffusionPipeline) -> int:
    """Side of the images the pipeline was trained on: UNet sample size times the VAE's downsampling."""
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def training_resolution(pipe: StableDiffusionPipeline, cfg: InvertConfig) -> int:
    """``cfg.resolution`` or the pipeline's own; an error names a size the VAE cannot encode."""
    size = cfg.resolution or pipeline_resolution(pipe)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if size % factor:
        raise ValueError(
            f"invert.resolution={size} is not a multiple of the VAE's downsampling factor {factor}; "
            f"use e.g. {max(factor, size // factor * factor)}"
        )
    return size


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch in [-1, 1] to ``size`` x ``size`` (bicubic, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
        -1, 1
    )


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents of a batch: a sample of the posterior times ``scaling_factor``, in float32."""
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device)
    return (dist.mean.float() + dist.std.float() * noise) * vae.config.scaling_factor


class PlaceholderRows(nn.Module):
    """The trainable placeholder-token rows ``[K, D]`` (float32), spliced into a token-embedding output.

    ``splice(input_ids, embeds)`` replaces the embedding of every position whose id is a placeholder id
    with that placeholder's row, so gradients reach ``rows`` exactly as they would reach those rows of
    the full table.
    """

    def __init__(self, table: torch.Tensor, token_ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=table.device))
        self.rows = nn.Parameter(table.detach()[token_ids].clone().float())

    def splice(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Replace the embeddings of placeholder-token positions in ``embeds`` with the learned rows."""
        match = input_ids.unsqueeze(-1) == self.token_ids  # [B, L, K]
        if not bool(match.any()):
            return embeds
        rows = match.to(self.rows.dtype) @ self.rows  # [B, L, D]; each position matches at most one id
        return torch.where(match.any(-1, keepdim=True), rows.to(embeds.dtype), embeds)

    @torch.no_grad()
    def write_into(self, table: torch.Tensor) -> None:
        """Copy the learned rows into the embedding matrix (in its dtype)."""
        table[self.token_ids] = self.rows.to(table.dtype)


def _freeze(pipe: StableDiffusionPipeline, cfg: InvertConfig) -> None:
    """Freeze every weight and put the text encoder in float32 (the learned rows train in float32)."""
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        module.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.text_encoder.to(torch.float32)


def fit_tokens(
    pipe: StableDiffusionPipeline,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    cfg: InvertConfig,
    gen: torch.Generator,
    log: Callable[[dict, int], None],
    stage: Stage,
) -> None:
    """Learn the placeholder-token rows of ``pipe`` on class-labelled images, in place.

    Args:
        pipe: A diffusers ``StableDiffusionPipeline`` (placeholder tokens are added if missing).
        images: ID train images ``[N, 3, H, W]`` in [-1, 1] on the CPU; resized per batch to
            :func:`training_resolution`.
        labels: Class index of each image ``[N]``.
        class_names: ID class names, in label order.
        cfg: Steps, learning rate, batch size, time budget, checkpoint interval.
        gen: CPU random generator (batches, timesteps, noise); checkpointed with the loop.
        log: ``log(values, step)`` receives the loss every 50 steps and at the last step.
        stage: Where the loop checkpoints; it resumes from the newest checkpoint there.

    Every weight other than the placeholder rows is bit-identical afterwards; the text encoder is
    returned in the dtype it came in.
    """
    token_ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, class_names)
    text_dtype, device = pipe.text_encoder.dtype, pipe.unet.device
    _freeze(pipe, cfg)
    embedding = pipe.text_encoder.get_input_embeddings()
    learned = PlaceholderRows(embedding.weight, token_ids)
    # the training noise schedule of the pipeline's own scheduler (same betas and prediction type)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    ids, _ = prompt_ids(pipe.tokenizer, class_names)
    size = training_resolution(pipe, cfg)
    accelerator = Accelerator(device_placement=False)
    opt = torch.optim.AdamW(learned.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps, cfg.warmup_steps))
    learned, opt, sched = accelerator.prepare(learned, opt, sched)
    done = stage.begin(accelerator, GeneratorState(gen))
    hook = embedding.register_forward_hook(lambda _m, args, out: learned.splice(args[0], out))
    started = time.perf_counter()
    bar = stage.steps(done, cfg.steps, desc="textual inversion")
    try:
        for step in bar:
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
            z0 = encode(pipe.vae, resize(images[idx], size), gen)
            noise = torch.randn(z0.shape, generator=gen).to(device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(
                device
            )
            zt = noise_sched.add_noise(z0, noise, t)
            context = pipe.text_encoder(ids[labels[idx]].to(device))[0]
            pred = pipe.unet(
                zt.to(pipe.unet.dtype), t, encoder_hidden_states=context.to(pipe.unet.dtype)
            ).sample
            target = noise if prediction == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            loss = F.mse_loss(pred.float(), target)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                log({"invert/loss": loss.item()}, step)
            stage.step_done(accelerator, done)
            if cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes:
                log({"invert/stopped_at_step": step}, step)
                break
        bar.close()
        stage.finish(accelerator, done)
    finally:
        hook.remove()
        learned.write_into(embedding.weight)
        pipe.text_encoder.to(text_dtype)
