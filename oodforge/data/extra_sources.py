"""More OOD sources for ``mnist-open`` from what installed packages ship: validation OOD and extra test families.

Validation OOD (what score selection and recipe choices may read; no source is shared with any test set,
as OpenOOD v1.5 separates them):

* ``val-letters`` (near): capital letters rendered from matplotlib's DejaVu fonts, white strokes on black
  like the digits, at random size, position and slant; letters that read as an ID digit (O, I, Z, S, G,
  D, L, B, Q) are left out;
* ``val-pen-glyphs`` (near): lowercase letters, symbols and Greek capitals (none that reads as a digit)
  from the same fonts, made to look hand-drawn: an elastic deformation of the glyph (Simard et al. 2003),
  a random pen width and MNIST-like anti-aliasing. It is the harder near set: its strokes have the
  digits' low-level statistics, so only a score that reads the shape separates it from csID;
* ``val-scenes`` (far): crops of scikit-learn's two sample photos (``china``, ``flower``);
* ``val-patterns`` (far): crops of scikit-image's synthetic images (binary blobs, checkerboard, the
  Shepp-Logan phantom, the colour wheel, the horse silhouette).

Extra test OOD families (reported beside the benchmark's own sets, read by no choice):

* ``uci-digits-6-9`` (near): scikit-learn's 8x8 UCI handwritten digits 6-9, upsampled to 28x28 and padded
  like MNIST (another source of the near-OOD classes);
* ``printed-text`` (far): crops of scikit-image's scanned ``page`` and ``text`` images;
* ``mpl-samples`` (far): crops of matplotlib's sample images (Grace Hopper's portrait, an MRI slice, two
  elevation maps).

Every set is uint8 ``[N, size, size, 3]``, a pure function of the seed, cached in-process.
"""

from __future__ import annotations

import gzip
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from oodforge.data.arrays import random_crops, to_rgb

N_PER_SET = 300
LETTERS = "ACEFHJKMNPRTUVWXY"
PEN_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
PEN_GLYPHS = "acefhkmnpruvwxy#%&@+<>" + "\u03bb\u03a3\u03a9\u03a6\u03a8\u03c0"  # λ Σ Ω Φ Ψ π
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
PATTERNS = ("binary_blobs", "checkerboard", "shepp_logan_phantom", "colorwheel", "horse")


def _crops(
    image: np.ndarray, n: int, rng: np.random.Generator, size: int, lo: float = 0.2, hi: float = 0.5
) -> np.ndarray:
    """``n`` random square crops of ``lo``..``hi`` of the shorter side, each resized to ``size``."""
    short = min(image.shape[:2])
    return random_crops(image, n, rng, lo=max(8, int(lo * short)), hi=max(8, int(hi * short)), size=size)


def _pad_like_mnist(digits28: np.ndarray, size: int) -> np.ndarray:
    """Grey ``[N, 28, 28]`` -> padded to 32 as mnist-open does, RGB, resized to ``size``."""
    padded = np.pad(digits28, ((0, 0), (2, 2), (2, 2)))
    return np.stack([to_rgb(d, size) for d in padded])


def _glyph28(text: str, font: ImageFont.FreeTypeFont, angle: float, canvas_side: int = 56) -> np.ndarray:
    """``text`` drawn white on black and rotated by ``angle`` degrees, grey uint8 ``[28, 28]``.

    The glyph's box is fitted to 20x20 in the middle of the frame, where MNIST puts a digit.
    """
    canvas = Image.new("L", (canvas_side, canvas_side), 0)
    ImageDraw.Draw(canvas).text((canvas_side // 2,) * 2, text, fill=255, font=font, anchor="mm")
    glyph = canvas.rotate(angle, resample=Image.BILINEAR)
    glyph = glyph.crop(glyph.getbbox() or (0, 0, canvas_side, canvas_side))
    scale = 20 / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    frame = Image.new("L", (28, 28), 0)
    frame.paste(glyph, ((28 - glyph.width) // 2, (28 - glyph.height) // 2))
    return np.asarray(frame)


def _font(rng: np.random.Generator, size: int, fonts: tuple[str, ...] = FONTS) -> ImageFont.FreeTypeFont:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return ImageFont.truetype(str(ttf / fonts[int(rng.integers(len(fonts)))]), size)


def _letters(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        font = _font(rng, int(rng.integers(18, 25)))
        out[k] = _glyph28(LETTERS[int(rng.integers(len(LETTERS)))], font, float(rng.uniform(-15, 15)))
    return _pad_like_mnist(out, size)


def elastic(image: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Simard et al. (2003)'s elastic distortion of a grey uint8 image.

    Every pixel ``(y, x)`` takes the bilinear sample at ``(y + dy, x + dx)``: ``dy`` then ``dx`` are
    uniform(-1, 1) fields drawn from ``rng``, smoothed by a Gaussian of ``sigma`` px and scaled by ``alpha``.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = image.shape
    dy, dx = (alpha * gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") for _ in range(2))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    moved = map_coordinates(image.astype(np.float64), [yy + dy, xx + dx], order=1, mode="constant")
    return np.clip(moved, 0, 255).astype(np.uint8)


def _pen_glyphs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        # drawn large and fitted down, so the stroke is ~1/10 of the glyph (about 2 px, as a pen's in MNIST)
        font = _font(rng, int(rng.integers(64, 81)), PEN_FONTS)
        glyph = _glyph28(
            PEN_GLYPHS[int(rng.integers(len(PEN_GLYPHS)))], font, float(rng.uniform(-12, 12)), canvas_side=160
        )
        img = Image.fromarray(elastic(glyph, rng, alpha=float(rng.uniform(20, 36)), sigma=4.0))
        if rng.random() < 0.4:  # a broader pen
            img = img.filter(ImageFilter.MaxFilter(3))
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.7))))
        out[k] = np.asarray(img)
    return _pad_like_mnist(out, size)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(skimage.data, name)()


def _mpl_samples() -> list[np.ndarray]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "sample_data"
    images = [np.asarray(Image.open(root / "grace_hopper.jpg").convert("RGB"))]
    with gzip.open(root / "s1045.ima.gz") as f:  # a 256x256 16-bit MRI slice
        mri = np.frombuffer(f.read(), np.uint16).astype(np.float64).reshape(256, 256)
    dem = np.load(root / "jacksboro_fault_dem.npz")["elevation"].astype(np.float64)
    topo = np.load(root / "topobathy.npz")["topo"].astype(np.float64)
    for grid in (mri, dem, topo):
        lo, hi = np.percentile(grid, (1, 99))
        images.append(np.clip((grid - lo) / max(hi - lo, 1e-9), 0, 1))
    return images


def _mixed_crops(sources: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    per = -(-N_PER_SET // len(sources))
    return np.concatenate([_crops(s, per, rng, size) for s in sources])[:N_PER_SET]


@lru_cache(maxsize=4)
def validation_sets(seed: int, size: int) -> dict[str, tuple[np.ndarray, str]]:
    """The validation OOD arrays ``{name: (uint8 [N, size, size, 3], shift)}`` for ``seed``."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng([seed, 2])
    scenes = list(load_sample_images().images)
    patterns = [_skimage(name) for name in PATTERNS]
    sets = {
        "val-letters": (_letters(rng, N_PER_SET, size), "near"),
        "val-pen-glyphs": (_pen_glyphs(np.random.default_rng([seed, 4]), N_PER_SET, size), "near"),
        "val-scenes": (_mixed_crops(scenes, rng, size), "far"),
        "val-patterns": (_mixed_crops(patterns, rng, size), "far"),
    }
    for a, _ in sets.values():
        a.flags.writeable = False
    return sets


@lru_cache(maxsize=4)
def extra_test_sets(seed: int, size: int) -> dict[str, tuple[np.ndarray, str]]:
    """The extra test OOD arrays ``{name: (uint8 [N, size, size, 3], shift)}`` for ``seed``."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng([seed, 3])
    uci = load_digits()
    pick = np.isin(uci.target, (6, 7, 8, 9))
    eight = uci.images[pick] / 16.0  # 0..16 grey levels
    digits28 = np.stack(
        [np.asarray(Image.fromarray(np.uint8(255 * d)).resize((20, 20), Image.BICUBIC)) for d in eight]
    )
    digits28 = np.pad(digits28, ((0, 0), (4, 4), (4, 4)))  # a 20x20 digit in a 28x28 frame, as MNIST
    idx = rng.permutation(len(digits28))[:N_PER_SET]
    text = [255 - _skimage("page"), 255 - _skimage("text")]  # dark ink -> bright strokes, as the digits
    sets = {
        "uci-digits-6-9": (_pad_like_mnist(digits28[idx], size), "near"),
        "printed-text": (_mixed_crops(text, rng, size), "far"),
        "mpl-samples": (_mixed_crops(_mpl_samples(), rng, size), "far"),
    }
    for a, _ in sets.values():
        a.flags.writeable = False
    return sets
