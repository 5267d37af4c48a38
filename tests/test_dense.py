"""Dense OOD math and pieces: JS to the uniform, the dense loss, pasting, flow negatives, metrics, segmenters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from oodforge.data.mnist_scenes import VOID
from oodforge.data.transforms import Preprocess
from oodforge.dense import LN2, PIXEL_SCORES, PoolingSpec, js_to_uniform, paste, pool
from oodforge.segmenters import SegmenterConfig, build_segmenter, segmenter_from_architecture
from trainer.dense_eval import mean_iou, pixel_metrics
from trainer.losses.dense import dense_ood_loss
from trainer.negatives import FlowConfig, FlowNegatives, NegativesConfig, paste_negatives


def js_reference(p: np.ndarray) -> float:
    """JS(U ‖ p) written out: ½ Σ u log(u/m) + ½ Σ p log(p/m), m = (u + p)/2 (0·log 0 = 0)."""
    u = np.full_like(p, 1.0 / len(p))
    m = 0.5 * (u + p)
    kl_pm = sum(pk * math.log(pk / mk) for pk, mk in zip(p, m, strict=True) if pk > 0)
    return 0.5 * float(np.sum(u * np.log(u / m))) + 0.5 * kl_pm


def test_js_to_uniform_equals_its_formula_per_pixel() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3
    js = js_to_uniform(logits)
    p = logits.softmax(dim=1).numpy()
    assert js.shape == (2, 3, 4)
    for n, y, x in np.ndindex(2, 3, 4):
        assert js[n, y, x].item() == pytest.approx(js_reference(p[n, :, y, x]), abs=1e-6)


def test_js_to_uniform_is_zero_at_uniform_and_bounded_by_ln2() -> None:
    assert js_to_uniform(torch.zeros(3, 7, 2, 2)).abs().max().item() < 1e-7
    saturated = torch.full((1, 7, 1, 1), -1e4)
    saturated[0, 2] = 1e4
    one_hot = js_to_uniform(saturated).item()
    k = 7  # closed form for a one-hot p over K classes
    expected = 0.5 * ((k - 1) / k * LN2 + math.log(2 / (k + 1)) / k) + 0.5 * math.log(2 * k / (k + 1))
    assert one_hot == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(1)
    for scale in (0.1, 1, 10, 1e3):
        values = js_to_uniform(torch.randn(64, 2, 8) * scale)
        assert torch.isfinite(values).all() and values.min() >= 0 and values.max() <= LN2
    two_class = js_to_uniform(torch.tensor([[1e4, -1e4]]))
    assert two_class.item() == pytest.approx(0.75 * math.log(4 / 3), abs=1e-6)  # ½(½ln⅔ + ½ln2) + ½ln(4/3)


def test_pixel_scores_are_higher_for_confident_pixels() -> None:
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 1, 0, 1] = 8.0  # pixel 1 confident, pixel 0 uniform
    for name in PIXEL_SCORES:
        scores = PIXEL_SCORES.get(name)(logits)
        assert scores.shape == (1, 1, 2)
        assert scores[0, 0, 1] > scores[0, 0, 0], name


def test_dense_loss_is_ce_on_inlier_pixels_plus_beta_js_on_negatives() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    labels = torch.randint(0, 4, (2, 5, 5))
    labels[0, 0, :] = VOID
    negative = torch.zeros(2, 5, 5, dtype=torch.bool)
    negative[1, 2:4, 1:3] = True
    loss = dense_ood_loss(logits, labels, negative, beta=0.03)
    keep = (labels != VOID) & ~negative
    log_p = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
    ce = -log_p.gather(1, labels[keep][:, None]).mean()
    js = js_to_uniform(logits)[negative].mean()
    assert loss.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss.js.item() == pytest.approx(js.item(), rel=1e-6)
    assert loss.total.item() == pytest.approx(ce.item() + 0.03 * js.item(), rel=1e-6)
    loss.total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    no_negatives = dense_ood_loss(logits, labels, torch.zeros_like(negative), beta=0.03)
    assert no_negatives.js.item() == 0 and no_negatives.total.item() == pytest.approx(
        dense_ood_loss(logits, labels, torch.zeros_like(negative), beta=0).total.item()
    )


def test_pasted_opaque_patch_mask_is_exactly_the_changed_pixels() -> None:
    image = torch.zeros(3, 16, 20)
    patch = torch.rand(3, 5, 7) + 0.5
    out, negative, void = paste(image, patch, top=4, left=9)
    changed = (out != image).any(0)
    assert torch.equal(negative, changed)
    assert negative.sum() == 5 * 7 and negative[4:9, 9:16].all() and not void.any()
    assert torch.equal(out[:, 4:9, 9:16], patch)


def test_pasted_alpha_patch_mask_is_alpha_at_least_half() -> None:
    image = torch.zeros(3, 10, 10)
    alpha = torch.tensor([[0.0, 0.3, 0.5], [0.9, 1.0, 0.2], [0.0, 0.0, 0.7]])
    out, negative, void = paste(image, torch.ones(3, 3, 3), top=2, left=3, alpha=alpha)
    expected_neg, expected_void = torch.zeros(10, 10, dtype=torch.bool), torch.zeros(10, 10, dtype=torch.bool)
    expected_neg[2:5, 3:6] = alpha >= 0.5
    expected_void[2:5, 3:6] = (alpha > 0) & (alpha < 0.5)
    assert torch.equal(negative, expected_neg) and torch.equal(void, expected_void)
    assert torch.allclose(out[0, 2:5, 3:6], alpha)  # image 0, patch 1: out = alpha
    with pytest.raises(ValueError, match="does not fit"):
        paste(image, torch.ones(3, 3, 3), top=8, left=0)


def test_paste_negatives_labels_match_the_pasted_pixels() -> None:
    class Constant(torch.nn.Module):
        def sample(self, n, generator):
            from trainer.negatives import Patches

            return Patches(pixels=torch.full((n, 3, 4, 4), 5.0), alpha=None)

    scenes = torch.zeros(6, 3, 32, 32)
    labels = torch.randint(0, 7, (6, 32, 32))
    sources = torch.nn.ModuleDict({"const": Constant()})
    out, new_labels, negative, info = paste_negatives(
        scenes, labels, sources, (6, 10), torch.Generator().manual_seed(0)
    )
    assert info == {"const": 6}
    assert torch.equal(negative, (out != scenes).any(1))  # the negative pixels are exactly the pasted ones
    for n in range(6):
        side = math.isqrt(int(negative[n].sum()))
        assert 6 <= side <= 10 and side * side == negative[n].sum()
    assert torch.equal(new_labels, labels)  # opaque patches make no void pixels


def test_flow_samples_keep_gradients_to_its_parameters() -> None:
    torch.manual_seed(0)
    cfg = NegativesConfig(sources=["flow"], flow=FlowConfig(crop=4, transforms=2, hidden=[16]))
    source = FlowNegatives(cfg, Preprocess(size=32))
    patches = source.sample(3, torch.Generator())
    assert patches.pixels.shape == (3, 3, 4, 4) and patches.alpha is None
    assert patches.pixels.requires_grad
    # the segmenter's loss reaches the flow through pasted pixels
    scenes = torch.zeros(3, 3, 16, 16)
    out, _, negative, _ = paste_negatives(
        scenes,
        torch.zeros(3, 16, 16, dtype=torch.long),
        torch.nn.ModuleDict({"flow": source}),
        (4, 8),
        torch.Generator().manual_seed(1),
    )
    (out.sum(1) * negative).sum().backward()
    grads = [p.grad for p in source.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    nll = source.nll(torch.randn(8, 3, 4, 4), torch.Generator().manual_seed(0))
    assert nll.ndim == 0 and torch.isfinite(nll)


def test_pooling() -> None:
    maps = torch.arange(2 * 10 * 10, dtype=torch.float32).view(2, 10, 10)
    assert torch.equal(pool(maps, PoolingSpec(name="min")), torch.tensor([0.0, 100.0]))
    assert torch.allclose(pool(maps, PoolingSpec(name="mean")), torch.tensor([49.5, 149.5]))
    assert torch.allclose(pool(maps, PoolingSpec(name="quantile", q=0.5)), torch.tensor([49.5, 149.5]))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        pool(maps[0], PoolingSpec())


def test_pixel_metrics_match_sklearn_and_ignore_void() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 8, 8))
    anomaly = (rng.random((3, 8, 8)) < 0.2).astype(np.uint8)
    maps[anomaly == 1] -= 1.0
    anomaly[0, 0, :4] = VOID
    maps[0, 0, :4] = 1e9  # void pixels must not count
    m = pixel_metrics(maps, anomaly)
    keep = anomaly != VOID
    y, s = anomaly[keep], maps[keep]
    assert m["ap"] == pytest.approx(average_precision_score(y, -s))
    assert m["auroc"] == pytest.approx(roc_auc_score(1 - y, s))
    assert 0 <= m["fpr95"] <= 1


def test_mean_iou() -> None:
    labels = np.array([[0, 0, 1, 1], [2, 2, VOID, VOID]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    miou, per_class = mean_iou(pred, labels, num_classes=4)
    # class 0: tp 1, pred 0 on labelled px = {(0,0),(1,1)}, label 0 = {(0,0),(0,1)} -> 1/3
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(per_class[3])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


@pytest.mark.parametrize("name", ["fcn-tiny", "segformer"])
def test_segmenters_give_logits_at_input_size_and_rebuild_from_json(name: str) -> None:
    torch.manual_seed(0)
    options = (
        {"widths": [4, 8, 8]}
        if name == "fcn-tiny"
        else {"hidden_sizes": [8, 8, 16, 16], "decoder_hidden_size": 16}
    )
    seg = build_segmenter(SegmenterConfig(name=name, options=options), num_classes=5).eval()
    x = torch.randn(2, 3, 48, 40)
    assert seg(x).shape == (2, 5, 48, 40)
    clone = segmenter_from_architecture(seg.architecture()).eval()
    clone.load_state_dict(seg.state_dict())
    assert torch.allclose(clone(x), seg(x), atol=1e-6)


def test_segformer_from_pretrained_on_a_local_checkpoint(tmp_path) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_labels=3, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], decoder_hidden_size=16
    )
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    seg = build_segmenter(
        SegmenterConfig(name="segformer", pretrained=str(tmp_path / "segformer")), num_classes=7
    )
    assert seg(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32)
    with pytest.raises(ValueError, match="segformer only"):
        build_segmenter(SegmenterConfig(name="fcn-tiny", pretrained="x"), num_classes=7)
    with pytest.raises(KeyError, match="fcn-tiny"):
        build_segmenter(SegmenterConfig(name="unet"), num_classes=7)
