"""Per-class placeholder tokens of a text-conditioned generator, and the class anchors T(y) they define.

Each ID class gets one new token, ``<ood-NAME>``, added to the generator's CLIP tokenizer; its row in
the text encoder's token-embedding matrix is initialised from the mean embedding of the class name's
own tokens. Those rows are the class anchors T(y) (DESIGN.md §5) that the text-aligned teacher aligns
image embeddings to and that the kNN boundary sampler rescales its outliers to.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def placeholder_token(class_name: str) -> str:
    """``"golden retriever"`` -> ``"<ood-golden_retriever>"``; ``"Café"`` -> ``"<ood-cafe>"``.

    Accents are folded to ASCII (NFKD); a name with no ASCII letter or digit left (``"猫"``) is spelled by
    its code points (``"<ood-u732b>"``), so distinct names get distinct tokens.
    """
    folded = unicodedata.normalize("NFKD", class_name.strip()).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", folded).strip("_").lower()
    if not slug:
        slug = "_".join(f"u{ord(c):x}" for c in class_name.strip()) or "class"
    return f"<ood-{slug}>"


def add_placeholder_tokens(
    tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, class_names: list[str]
) -> list[int]:
    """Ensure every class has its placeholder token; new rows start at the class name's mean embedding.

    Tokens that already exist (a generator fitted with them) keep their learned embedding.
    Returns the token ids in class order.
    """
    tokens = [placeholder_token(c) for c in class_names]
    if len(set(tokens)) != len(tokens):
        raise ValueError(
            f"class names {class_names} give clashing placeholder tokens {tokens}; rename the classes"
        )
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for name, token in zip(class_names, tokens, strict=True):
                if token in new:
                    ids = tokenizer(name, add_special_tokens=False).input_ids
                    init = table[ids].mean(0) if ids else table.mean(0)
                    table[tokenizer.convert_tokens_to_ids(token)] = init
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def class_anchors(
    tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, class_names: list[str]
) -> torch.Tensor:
    """T(y): the placeholder-token embedding rows ``[K, D]`` (tokens are added first if missing)."""
    ids = add_placeholder_tokens(tokenizer, text_encoder, class_names)
    return text_encoder.get_input_embeddings().weight[ids].detach().clone().float()


def load_class_anchors(
    generator: str | Path, class_names: list[str], revision: str | None = None
) -> torch.Tensor:
    """Class anchors read from a diffusers Stable Diffusion directory or Hub id (tokenizer + text encoder only)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(generator), subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(
            str(generator), subfolder="text_encoder", revision=revision
        )
    except OSError as err:
        raise FileNotFoundError(
            f"cannot read the generator's tokenizer/text_encoder from {generator!s}: {err}; "
            "fit one with `python -m synth fit-generator` or point to a diffusers Stable Diffusion checkpoint"
        ) from None
    return class_anchors(tokenizer, text_encoder, class_names)
