"""Load any diffusers Stable Diffusion pipeline and decode outlier embeddings by token substitution.

The same code path serves a Hub id (``runwayml/stable-diffusion-v1-5``), a local checkpoint and the
embedded generator that ``fit-generator`` saves: ``StableDiffusionPipeline.from_pretrained``, then one
placeholder token per ID class (``oodforge.tokens``). To decode an outlier vector v for class y, the
placeholder's embedding row is set to v for the text-encoder call and restored afterwards (DESIGN §5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from pydantic import field_validator

from oodforge.config import StrictModel
from oodforge.tokens import add_placeholder_tokens, placeholder_token

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

CARD_FILE = "oodforge_generator.json"
PROMPT = "a high-quality image of the {token}"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


SCHEDULERS: dict[str, str | None] = {
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "pipeline": None,  # keep the checkpoint's own scheduler
}
"""``generator.scheduler`` -> the diffusers scheduler class that replaces the pipeline's."""


class GeneratorConfig(StrictModel):
    """Which pipeline to load and how to sample it (``scheduler``: a key of :data:`SCHEDULERS`)."""

    pretrained: str = "runs/generator"
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    steps: int = 25
    guidance_scale: float = 3.0
    height: int | None = None
    width: int | None = None
    scheduler: str = "dpm"
    prompt: str = PROMPT

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
        return name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, name: str) -> str:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
        return name


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``owner/name``): absolute, relative with ./, or not of two parts."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device`` (``"auto"``: CUDA when available, else CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Generator:
    """A loaded Stable Diffusion pipeline with one placeholder token per ID class."""

    def __init__(self, pipe: StableDiffusionPipeline, cfg: GeneratorConfig, class_names: list[str]) -> None:
        self.pipe = pipe
        self.cfg = cfg
        self.class_names = class_names
        self.token_ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, class_names)
        self.device = pipe.device
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.height = cfg.height or pipe.unet.config.sample_size * vae_factor
        self.width = cfg.width or pipe.unet.config.sample_size * vae_factor
        self._ids: dict[int, torch.Tensor] = {}
        self._uncond: torch.Tensor | None = None

    @classmethod
    def load(cls, cfg: GeneratorConfig, class_names: list[str]) -> Generator:
        """``from_pretrained`` on ``cfg.pretrained`` (Hub id or directory); errors say what to run."""
        import diffusers
        from diffusers import StableDiffusionPipeline

        name = cfg.pretrained
        missing = (
            f"generator {name} is neither a local directory nor a reachable Hub model; create the embedded "
            "one with `python -m synth fit-generator --config configs/synth/tiny_mnist_open.yaml --out "
            f"{name}` or set generator.pretrained to a diffusers Stable Diffusion checkpoint"
        )
        if _looks_local(name) and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(missing)
        check_card_classes(name, class_names)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                name,
                revision=cfg.revision,
                dtype=DTYPES[cfg.dtype],
                safety_checker=None,
                requires_safety_checker=False,
            )
        except OSError as err:
            raise FileNotFoundError(f"{missing} ({err})") from None
        scheduler = SCHEDULERS[cfg.scheduler]
        if scheduler is not None:
            pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
        pipe = pipe.to(resolve_device(cfg.device))
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, cfg, class_names)

    # ------------------------------------------------------------------ anchors and prompts
    def anchors(self) -> torch.Tensor:
        """T(y) for every class, ``[K, D]`` float32 on the CPU."""
        table = self.pipe.text_encoder.get_input_embeddings().weight
        return table[self.token_ids].detach().float().cpu()

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pipe.text_encoder(ids.to(self.device))[0]

    def _prompt_ids(self, class_index: int) -> torch.Tensor:
        """Token ids ``[1, L]`` of a class prompt (tokenised once per class)."""
        if class_index not in self._ids:
            tok = self.pipe.tokenizer
            prompt = self.cfg.prompt.format(token=placeholder_token(self.class_names[class_index]))
            self._ids[class_index] = tok(
                prompt,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return self._ids[class_index]

    @torch.no_grad()
    def prompt_embeds(self, class_index: list[int], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder outputs ``[B, L, E]`` of each class prompt, optionally with its class token replaced.

        One text-encoder pass for the whole batch. With ``vectors``, wherever prompt ``i`` holds its
        class's placeholder token, the token-embedding output is ``vectors[i]`` instead of the table's
        row (token substitution, per prompt); the embedding table itself is never modified.
        """
        ids = torch.cat([self._prompt_ids(c) for c in class_index]).to(self.device)
        if vectors is None:
            return self._encode(ids)
        if len(vectors) != len(class_index):
            raise ValueError(f"{len(vectors)} vectors for {len(class_index)} prompts; pass one per prompt")
        table = self.pipe.text_encoder.get_input_embeddings()
        rows = torch.tensor([self.token_ids[c] for c in class_index], device=ids.device)
        where = (ids == rows[:, None]).unsqueeze(-1)  # [B, L, 1]: the placeholder's positions
        vecs = vectors.to(ids.device, table.weight.dtype).unsqueeze(1)  # [B, 1, D]

        def substitute(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return torch.where(where, vecs.to(output.dtype), output)

        handle = table.register_forward_hook(substitute)
        try:
            return self._encode(ids)
        finally:
            handle.remove()

    def _uncond_embeds(self) -> torch.Tensor:
        """The empty prompt's text-encoder output ``[1, L, E]`` (computed once)."""
        if self._uncond is None:
            tok = self.pipe.tokenizer
            empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
            with torch.no_grad():
                self._uncond = self._encode(empty.input_ids)
        return self._uncond

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_pixels(
        self, class_index: list[int], seeds: list[int], vectors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise one sample per entry, without leaving the device for the images.

        Args:
            class_index: The class of each sample (its prompt's placeholder token).
            seeds: One seed per sample: sample ``i``'s initial noise depends only on ``seeds[i]``.
            vectors: Optional ``[B, D]`` token substitutes (outlier embeddings), one per sample.

        Returns:
            The SD latents ``[B, C, h, w]`` (float32, CPU) and the decoded images as uint8 RGB
            ``[B, 3, H, W]`` on the generator's device.
        """
        if len(seeds) != len(class_index):
            raise ValueError(f"{len(seeds)} seeds for {len(class_index)} samples; pass one seed per sample")
        cond = self.prompt_embeds(class_index, vectors)
        uncond = self._uncond_embeds().expand(len(class_index), -1, -1)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        latents = self.pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generators,
            output_type="latent",
        ).images
        return latents.float().cpu(), self.decode_pixels(latents)

    def sample(
        self, class_index: list[int], seeds: list[int], vectors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Image.Image]]:
        """Denoise one sample per entry; returns the SD latents ``[B, C, h, w]`` and the decoded images.

        The same samples as :meth:`sample_pixels`, with the images as PIL.
        """
        latents, pixels = self.sample_pixels(class_index, seeds, vectors)
        return latents, to_images(pixels)

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode SD latents with the pipeline's VAE into uint8 RGB ``[B, 3, H, W]`` on the generator's device."""
        vae = self.pipe.vae
        x = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode SD latents with the pipeline's VAE into RGB images."""
        return to_images(self.decode_pixels(latents))


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """uint8 RGB ``[B, 3, H, W]`` (any device) -> PIL images."""
    arr = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def read_card(pretrained: str | Path) -> dict | None:
    """The oodforge card saved with a generator at ``pretrained``, or ``None`` when it has none."""
    path = Path(pretrained) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_card_classes(pretrained: str | Path, class_names: list[str]) -> None:
    """A generator fitted by oodforge records its classes; a different class list is an error."""
    card = read_card(pretrained)
    if card and card.get("class_names") and card["class_names"] != class_names:
        raise ValueError(
            f"generator {pretrained} was fitted for classes {card['class_names']} but the data has "
            f"{class_names}; fit a generator for this data (python -m synth fit-generator) or fix data.benchmark"
        )
