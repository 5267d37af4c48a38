"""Every image mode a client sends: decoded by the documented rule, scored the same by /score, /v2 and
``Detector.predict``; hostile inputs keep their 4xx.

Expected pixels are computed here from the rules in :mod:`oodforge.images` (alpha compositing, bit-depth
scaling, the CMYK and YCbCr formulas, the EXIF orientations), not by calling the decoder.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from serving import detectors_dir, png_bytes, running_server
from tritonclient.utils import InferenceServerException

from oodforge.detector import Detector
from oodforge.images import ImageError, decode_image, decode_with_size, to_rgb

H, W = 20, 28  # not square, so that a wrong orientation shows
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
RNG = np.random.default_rng(7)


@dataclass(frozen=True)
class Case:
    data: bytes
    expected: np.ndarray  # [H, W, 3] uint8 on a black background
    tolerance: int = 1
    on_white: np.ndarray | None = None  # the expected pixels on a white background (modes with alpha)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    return png_bytes(image, fmt, **kwargs)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.round(values), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def over(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha compositing: ``a/255 * colour + (1 - a/255) * background``."""
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.round(a * rgb + (1 - a) * np.asarray(background, dtype=np.float64)).astype(np.uint8)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """``R = (255 - C)(255 - K) / 255`` and likewise G from M, B from Y."""
    c = cmyk.astype(np.float64)
    return np.round((255 - c[..., :3]) * (255 - c[..., 3:4]) / 255).astype(np.uint8)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """JPEG (BT.601 full range) YCbCr -> RGB."""
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
        -1,
    )
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


ORIENTED = {  # EXIF orientation -> what it does to the stored rows/columns for display
    1: lambda x: x,
    2: lambda x: x[:, ::-1],  # mirrored left-right
    3: lambda x: x[::-1, ::-1],  # turned 180 degrees
    4: lambda x: x[::-1],  # mirrored top-bottom
    5: lambda x: x.transpose(1, 0, 2),  # transposed about the main diagonal
    6: lambda x: np.rot90(x, -1),  # turned 90 degrees clockwise
    7: lambda x: x.transpose(1, 0, 2)[::-1, ::-1],  # transposed about the anti-diagonal
    8: lambda x: np.rot90(x, 1),  # turned 90 degrees counter-clockwise
}


def _blocks(channels: int) -> np.ndarray:
    """Flat 8x8 blocks of random colour (JPEG keeps them nearly exact)."""
    colours = RNG.integers(30, 225, (H // 4 + 1, W // 4 + 1, channels), dtype=np.uint8)
    return np.kron(colours, np.ones((8, 8, 1), dtype=np.uint8))[: H * 2, : W * 2]


def build_cases() -> dict[str, Case]:
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    cases: dict[str, Case] = {"RGB png": Case(encoded(Image.fromarray(rgb), "PNG"), rgb)}

    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    cases["RGBA png"] = Case(encoded(rgba, "PNG"), over(rgb, alpha, BLACK), on_white=over(rgb, alpha, WHITE))
    la = Image.fromarray(np.dstack([grey, alpha]), mode="LA")
    g3 = grey3(grey)
    cases["LA png"] = Case(encoded(la, "PNG"), over(g3, alpha, BLACK), on_white=over(g3, alpha, WHITE))

    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.tobytes())
    cases["P png"] = Case(encoded(p, "PNG"), palette[index])
    entry_alpha = RNG.integers(0, 256, 256, dtype=np.uint8)  # PA: a palette with an alpha per entry (tRNS)
    cases["PA png (palette alpha)"] = Case(
        encoded(p, "PNG", transparency=entry_alpha.tobytes()),
        over(palette[index], entry_alpha[index], BLACK),
        on_white=over(palette[index], entry_alpha[index], WHITE),
    )
    small = Image.fromarray(index % 16, mode="P")
    small.putpalette(palette[:16].tobytes())
    hole = (index % 16) == 5
    cases["P gif (transparent index)"] = Case(
        encoded(small, "GIF", transparency=5),
        np.where(hole[..., None], 0, palette[index % 16]).astype(np.uint8),
        on_white=np.where(hole[..., None], 255, palette[index % 16]).astype(np.uint8),
    )

    bits = RNG.integers(0, 2, (H, W), dtype=bool)
    cases["1 png"] = Case(encoded(Image.fromarray(bits), "PNG"), grey3(bits * 255.0))
    cases["L png"] = Case(encoded(Image.fromarray(grey), "PNG"), grey3(grey))

    v16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    scaled16 = grey3(v16 * 255.0 / 65535)
    le = Image.frombytes("I;16", (W, H), v16.astype("<u2").tobytes())
    be = Image.frombytes("I;16B", (W, H), v16.astype(">u2").tobytes())
    cases["I;16 png"] = Case(encoded(le, "PNG"), scaled16)
    cases["I;16B png"] = Case(encoded(be, "PNG"), scaled16)
    cases["I;16B tiff"] = Case(encoded(be, "TIFF"), scaled16)
    v32 = RNG.integers(0, 2**31, (H, W), dtype=np.int64).astype(np.int32)
    cases["I tiff (32 bits)"] = Case(encoded(Image.fromarray(v32), "TIFF"), grey3(v32 * 255.0 / (2**32 - 1)))

    unit = RNG.random((H, W)).astype(np.float32)
    cases["F tiff in [0, 1]"] = Case(encoded(Image.fromarray(unit), "TIFF"), grey3(unit * 255.0))
    wide = (RNG.random((H, W)) * 40 - 10).astype(np.float32)
    minmax = (wide.astype(np.float64) - wide.min()) / (wide.max() - wide.min())
    cases["F tiff min-max"] = Case(encoded(Image.fromarray(wide), "TIFF"), grey3(minmax * 255.0))

    cmyk = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    cases["CMYK tiff"] = Case(encoded(Image.fromarray(cmyk, mode="CMYK"), "TIFF"), cmyk_to_rgb(cmyk))
    cmyk_jpeg = encoded(Image.fromarray(_blocks(4), mode="CMYK"), "JPEG", quality=95)
    samples = np.asarray(Image.open(io.BytesIO(cmyk_jpeg)))  # the decoded CMYK samples (JPEG is lossy)
    cases["CMYK jpeg"] = Case(cmyk_jpeg, cmyk_to_rgb(samples))

    ycc = RNG.integers(16, 240, (H, W, 3), dtype=np.uint8)
    cases["YCbCr tiff"] = Case(encoded(Image.fromarray(ycc, mode="YCbCr"), "TIFF"), ycbcr_to_rgb(ycc), 2)
    blocks = _blocks(3)
    ycc_jpeg = encoded(Image.fromarray(blocks, mode="YCbCr"), "JPEG", quality=100, subsampling=0)
    cases["YCbCr jpeg"] = Case(ycc_jpeg, ycbcr_to_rgb(blocks), 4)

    for orientation, turn in ORIENTED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"EXIF orientation {orientation} png"] = Case(
            encoded(Image.fromarray(rgb), "PNG", exif=exif), np.ascontiguousarray(turn(rgb))
        )
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = encoded(Image.fromarray(blocks), "JPEG", quality=100, subsampling=0, exif=exif)
    cases["EXIF orientation 6 jpeg"] = Case(photo, np.ascontiguousarray(np.rot90(blocks, -1)), 4)
    return cases


CASES = build_cases()


# ------------------------------------------------------------------ the decoder on its own


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_decodes_by_the_documented_rule(name):
    case = CASES[name]
    image = decode_image(case.data)
    assert image.mode == "RGB"
    got = np.asarray(image).astype(int)
    assert got.shape == case.expected.shape
    assert np.abs(got - case.expected).max() <= case.tolerance
    if case.on_white is not None:
        on_white = np.asarray(decode_image(case.data, background=WHITE)).astype(int)
        assert np.abs(on_white - case.on_white).max() <= case.tolerance


def test_pil_images_of_other_modes_convert_too():
    values = RNG.integers(0, 1001, (H, W)).astype(np.int32)  # in memory: no declared depth -> 10 bits
    got = np.asarray(to_rgb(Image.fromarray(values))).astype(int)
    assert np.abs(got - grey3(values * 255.0 / 1023)).max() <= 1
    la = Image.fromarray(np.dstack([np.full((H, W), 200, np.uint8), np.full((H, W), 51, np.uint8)]), "LA")
    for image in (la, la.convert("La")):  # premultiplied La too
        assert np.abs(np.asarray(to_rgb(image)).astype(int) - 40).max() <= 1  # 200 * 51/255
    assert np.asarray(to_rgb(la, WHITE))[0, 0, 0] in (243, 244)  # 200 * 0.2 + 255 * 0.8


def photo_640x480() -> Image.Image:
    from skimage import data as photos

    return Image.fromarray(photos.astronaut()[16:496]).resize((640, 480))


def test_jpeg_draft_decodes_large_photos_small_and_keeps_the_full_size():
    photo = photo_640x480()
    data = encoded(photo, "JPEG", quality=95)
    full = decode_with_size(data)
    small = decode_with_size(data, draft=32)
    assert full.image.size == full.size == (640, 480) and small.size == (640, 480)
    assert small.image.size == (80, 60)  # the 1/8 DCT scale still has both sides >= 32
    assert decode_image(data, draft=200).size == (320, 240)  # 1/2: 1/4 would give a side below 200
    box = np.asarray(full.image).reshape(60, 8, 80, 8, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(small.image) - box).mean() < 3  # the same picture, at 1/8 scale
    exif = Image.Exif()
    exif[0x0112] = 8
    turned = decode_with_size(encoded(photo, "JPEG", exif=exif), draft=32)
    assert turned.size == (480, 640) and turned.image.size == (60, 80)


HOSTILE = {
    "empty": (b"", 400, "empty"),
    "not an image": (b"just some text, not pixels", 415, "not a recognised image"),
    "truncated png": (CASES["RGB png"].data[:60], 400, "truncated or corrupt"),
    "animated gif": (
        encoded(
            Image.new("RGB", (8, 8), "red"),
            "GIF",
            save_all=True,
            append_images=[Image.new("RGB", (8, 8), "blue")],
        ),
        415,
        "animated",
    ),
    "zero-size ppm": (b"P6\n0 5\n255\n", 415, "not a recognised image"),
}


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


HOSTILE["decompression bomb"] = (_png_claiming(100_000, 100_000), 413, "pixels")
HOSTILE["zero-size png"] = (_png_claiming(0, 5), 415, "not a recognised image")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_refused_with_their_status(name):
    data, status, message = HOSTILE[name]
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.status == status and message in err.value.message


def test_a_broken_exif_block_is_no_orientation():
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    data = bytearray(encoded(Image.fromarray(rgb), "PNG", exif=b"Exif\x00\x00MM\x00*garbage"))
    assert np.array_equal(np.asarray(decode_image(bytes(data))), rgb)


# ------------------------------------------------------------------ through the server


@pytest.fixture(scope="module")
def served(ood_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    white = root / "white-src"
    shutil.copytree(ood_assets.ce, white)
    spec = json.loads((white / "detector.json").read_text())
    spec["input"]["background"] = list(WHITE)  # only the weights carry a checksum
    (white / "detector.json").write_text(json.dumps(spec))
    detectors_dir(root / "dets", {"black": ood_assets.ce, "white": white})
    env = {"OODFORGE_DETECTORS_DIR": str(root / "dets"), "OODFORGE_DEFAULT_DETECTOR": "black"}
    with running_server(env, root / "server.log") as server:
        yield server, {n: Detector.load(root / "dets" / n / "detector") for n in ("black", "white")}


def _v2_score(server, model: str, data: bytes) -> float:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=object))
    return float(client.infer(model, [image]).as_numpy("score")[0])


@pytest.mark.parametrize("name", list(CASES))
def test_each_mode_scores_the_same_through_score_v2_and_predict(served, name):
    server, detectors = served
    data = CASES[name].data
    models = ("black", "white") if CASES[name].on_white is not None else ("black",)
    with server.client() as client:
        for model in models:
            expected = float(detectors[model].predict([data]).scores[0])
            response = client.post("/score", params={"detector": model}, files={"files": (name, data)})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["score"] == expected
            assert _v2_score(server, model, data) == np.float32(expected)
    if len(models) == 2:  # the background really is the detector's
        black, white = (detectors[m].predict([data]).scores[0] for m in models)
        assert black != white


def test_a_jpeg_photo_scores_the_same_through_the_server_and_predict(served):
    server, detectors = served
    data = encoded(photo_640x480(), "JPEG", quality=90)
    expected = detectors["black"].predict([data])  # bytes: decoded with the server's JPEG draft setting
    full = detectors["black"].predict([Image.open(io.BytesIO(data))])  # a full decode, for comparison
    with server.client() as client:
        body = client.post("/score", files={"files": ("photo.jpg", data)}).json()
    assert body["results"][0]["score"] == float(expected.scores[0])
    assert (
        abs(float(full.scores[0]) - float(expected.scores[0])) < 0.5
    )  # draft changes pixels, not the picture


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_keep_their_4xx_through_score_and_v2(served, name):
    server, _ = served
    data, status, message = HOSTILE[name]
    with server.client() as client:
        response = client.post("/score", files={"files": ("x", data)})
        assert response.status_code == status and message in response.json()["detail"]
    with pytest.raises(InferenceServerException) as err:
        _v2_score(server, "black", data)
    assert err.value.status() == str(status) and message in err.value.message()


def test_a_5000_character_filename_is_accepted_and_echoed_shortened(served):
    server, detectors = served
    name = "a" * 4990 + "-0042.png"
    data = CASES["RGB png"].data
    with server.client() as client:
        response = client.post("/score", files=[("files", (name, data)), ("files", ("b.png", data))])
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert len(first["filename"]) == 255 and first["filename"].endswith("-0042.png")
    assert first["filename"].startswith("aaaa") and second["filename"] == "b.png"
    assert first["score"] == float(detectors["black"].predict([data]).scores[0])


def test_json_filenames_are_echoed_shortened_too(served):
    import base64

    server, _ = served
    with server.client() as client:
        body = client.post(
            "/score",
            json={"images": [base64.b64encode(CASES["L png"].data).decode()], "filenames": ["x" * 900]},
        ).json()
    assert len(body["results"][0]["filename"]) == 255


def test_the_server_never_answered_5xx(served):
    server, _ = served
    assert not [line for line in server.log_text().splitlines() if '" 5' in line and "HTTP/1.1" in line]
