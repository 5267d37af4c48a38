"""Pre-processing (PIL and tensor paths), augmentation and the seeded TransformedSet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.config import ConfigError, validate
from oodforge.data import ArrayImageSet
from oodforge.data.transforms import Preprocess, TransformedSet, augment, item_seed


def random_images(n: int, h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_preprocess_normalises_by_hand_computation() -> None:
    pixels = np.array([[[0, 51, 255], [255, 255, 255]], [[102, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    pre = Preprocess(size=2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = pre(Image.fromarray(pixels))
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    # pixel (row 0, col 0) = (0, 51, 255): ((0 - .5) / .2, (.2 - .4) / .25, (1 - .3) / .5)
    assert torch.allclose(out[:, 0, 0], torch.tensor([-2.5, -0.8, 1.4]), atol=1e-6)
    expected = (pixels / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_preprocess_converts_modes_and_resizes_bilinearly() -> None:
    grey = Image.fromarray(random_images(1)[0, :, :, 0])
    out = Preprocess(size=32)(grey)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    image = Image.fromarray(random_images(1, 64, 48)[0])
    pre = Preprocess(size=32, mean=(0, 0, 0), std=(1, 1, 1))
    reference = np.asarray(image.resize((32, 32), Image.BILINEAR)) / 255.0  # PIL's antialiased bilinear
    np.testing.assert_allclose(pre(image).permute(1, 2, 0).numpy(), reference, atol=1.5 / 255)


@pytest.mark.parametrize("size", [24, 32])
def test_tensor_path_equals_pil_path(size: int) -> None:
    arrays = random_images(4, 24, 24)
    pre = Preprocess(size=size, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    from_pil = torch.stack([pre(Image.fromarray(a)) for a in arrays])
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    assert torch.allclose(pre.tensor(batch), from_pil, atol=1e-6)
    assert torch.allclose(pre.tensor(batch.float() / 255.0), from_pil, atol=1e-5)
    assert pre.tensor(batch).shape == (4, 3, size, size)


def test_preprocess_is_pure_data_and_validated() -> None:
    pre = Preprocess(size=28, mean=(0.1, 0.2, 0.3))
    assert Preprocess.model_validate_json(pre.model_dump_json()) == pre
    with pytest.raises(ConfigError, match="std must be positive"):
        validate(Preprocess, {"std": [1, 0, 1]})
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        Preprocess().tensor(torch.zeros(3, 8, 8))


def test_augment_is_reproducible_and_a_shift() -> None:
    image = torch.from_numpy(random_images(1, 8, 8)[0]).permute(2, 0, 1).float()
    a = augment(image, torch.Generator().manual_seed(7), pad=2)
    b = augment(image, torch.Generator().manual_seed(7), pad=2)
    assert torch.equal(a, b) and a.shape == image.shape
    padded = torch.nn.functional.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
    windows = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
    assert any(torch.equal(a, w) for w in windows)
    outs = {augment(image, torch.Generator().manual_seed(s), pad=2).sum().item() for s in range(20)}
    assert len(outs) > 3


def test_augment_pad_zero_is_identity_and_flip_and_zero_padding() -> None:
    image = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment(image, torch.Generator().manual_seed(1), pad=0), image)
    flips = [augment(image, torch.Generator().manual_seed(s), pad=0, hflip=True) for s in range(16)]
    assert all(torch.equal(f, image) or torch.equal(f, image.flip(-1)) for f in flips)
    assert any(torch.equal(f, image.flip(-1)) for f in flips) and any(torch.equal(f, image) for f in flips)
    ones = torch.ones(3, 4, 4)
    shifted = [augment(ones, torch.Generator().manual_seed(s), pad=1, padding="zero") for s in range(10)]
    assert any(s.min() == 0 for s in shifted) and all(s.max() == 1 for s in shifted)
    assert all(augment(ones, torch.Generator().manual_seed(s), pad=1).min() == 1 for s in range(10))


def test_transformed_set_is_reproducible_per_seed_and_epoch() -> None:
    images = ArrayImageSet("x", random_images(6, 16, 16), np.arange(6))
    pre = Preprocess(size=16)

    def epoch_items(seed: int, epoch: int, global_seed: int = 0) -> torch.Tensor:
        ds = TransformedSet(images, pre, augment=True, seed=seed, hflip=True)
        ds.set_epoch(epoch)
        torch.manual_seed(global_seed)  # the global RNG must not matter
        return torch.stack([ds[i][0] for i in range(len(ds))])

    first = epoch_items(seed=0, epoch=1)
    assert torch.equal(first, epoch_items(seed=0, epoch=1, global_seed=123))
    assert not torch.equal(first, epoch_items(seed=0, epoch=2))
    assert not torch.equal(first, epoch_items(seed=1, epoch=1))
    plain = TransformedSet(images, pre)
    x, label = plain[3]
    assert label == 3 and isinstance(label, int)
    assert torch.equal(x, pre(images[3][0])) and len(plain) == 6


def test_item_seed_depends_only_on_its_inputs() -> None:
    assert item_seed(0, 1, 2) == 3071860871404845570  # fixed: same in every process and run
    assert len({item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(3)}) == 27
    assert item_seed(-1, 0, 0) >= 0


def test_transformed_set_gives_the_same_items_in_worker_processes() -> None:
    images = ArrayImageSet("x", random_images(8, 16, 16), np.arange(8))
    ds = TransformedSet(images, Preprocess(size=16), augment=True, seed=4, hflip=True)
    ds.set_epoch(2)
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    from_workers = torch.cat([x for x, _ in loader])
    assert torch.equal(direct, from_workers)
