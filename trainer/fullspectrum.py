"""Full-spectrum evaluation (OpenOOD v1.5 FS-OOD): covariate-shifted ID, validation OOD and extra test families.

Beside the classic numbers (ID test vs each OOD set), every report carries:

* ``csid`` — for each covariate shift of ID test (:mod:`oodforge.data.shifts`, the benchmark's raw source
  form, and, with a generator reference, the VAE round trip and generated ID-class images): the share
  accepted at the served threshold (calibrated on ID val as the exported detector is) and the label
  accuracy. csID is ID: a detector that rejects it is wrong, not strict;
* ``fs`` — near / far AUROC and FPR@95 (both conventions) with ID test ∪ every csID test set as the
  positive class;
* ``extra`` — the extra test OOD families (reported only, outside the near/far means);
* ``val`` — the validation view: ID val ∪ csID-val against the validation OOD sets. This, ID val and
  held-out synthetic data are all that score selection and recipe choices may read.

Key layout of the collected outputs: ``csid/<shift>``, ``csid-val/<shift>``, ``extra/<set>``,
``valood/<set>`` next to ``train``, ``val``, ``test`` and the test OOD sets' own names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from oodforge.data import Benchmark, ImageSet
from oodforge.data.shifts import csid_sets
from oodforge.metrics import summarize, threshold_at_tpr
from oodforge.reference import Reference

RAW_SOURCE = "raw-source"
ROUNDTRIP = "vae-roundtrip"
GENERATED = "generated-id"


class _RawForm(ImageSet):
    """A benchmark split in its raw source form (e.g. mnist-open's 28x28 digits before the padding)."""

    def __init__(self, base: ImageSet, raw: Any) -> None:
        self.base, self.raw = base, raw
        self.name = f"{base.name}/{RAW_SOURCE}"
        self.labels = base.labels

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i]
        return self.raw.raw_form(image), label


def csid_suite(
    bench: Benchmark, split: str, reference: Reference | None, seed: int = 0
) -> dict[str, ImageSet]:
    """Every covariate-shifted copy of ID ``split`` (``test`` or ``val``), keyed by the shift's name."""
    base = getattr(bench, split)
    sets: dict[str, ImageSet] = {}
    if bench.raw is not None:
        sets[RAW_SOURCE] = _RawForm(base, bench.raw)
    sets.update(csid_sets(base, seed=seed))
    if reference is not None:
        roundtrip, generated = reference.get("roundtrip", split), reference.get("generated", split)
        if roundtrip is not None and len(roundtrip) == len(base):
            sets[ROUNDTRIP] = roundtrip
        if generated is not None and len(generated):
            sets[GENERATED] = generated
    return sets


def suite_sets(bench: Benchmark, reference: Reference | None, seed: int = 0) -> dict[str, ImageSet]:
    """The extra image sets a full-spectrum evaluation collects, under their output keys."""
    sets: dict[str, ImageSet] = {}
    for split, prefix in (("test", "csid"), ("val", "csid-val")):
        sets.update({f"{prefix}/{k}": v for k, v in csid_suite(bench, split, reference, seed).items()})
    sets.update({f"extra/{k}": v.images for k, v in bench.extra_ood.items()})
    sets.update({f"valood/{k}": v.images for k, v in bench.val_ood.items()})
    return sets


def _under(outputs: dict[str, Any], prefix: str) -> list[str]:
    return [k.split("/", 1)[1] for k in outputs if k.startswith(prefix + "/")]


def csid_table(
    values: dict[str, np.ndarray], outputs: dict[str, Any], threshold: float, prefix: str = "csid"
) -> dict[str, dict[str, float]]:
    """Per shift: ``accept`` (share with score >= threshold), ``accuracy`` (labels right) and ``n``."""
    table = {}
    for shift in _under(outputs, prefix):
        out = outputs[f"{prefix}/{shift}"]
        scores = values[f"{prefix}/{shift}"]
        table[shift] = {
            "accept": float(np.mean(scores >= threshold)),
            "accuracy": float((out.logits.argmax(1) == out.labels).float().mean()),
            "n": len(scores),
        }
    return table


def fullspectrum_metrics(
    values: dict[str, np.ndarray], outputs: dict[str, Any], bench: Benchmark, tpr: float = 0.95
) -> dict[str, Any]:
    """The ``csid`` / ``fs`` / ``extra`` / ``val`` blocks of one score (``values``: its scores per output key)."""
    threshold = threshold_at_tpr(values["val"], tpr)
    csid_keys = [f"csid/{s}" for s in _under(outputs, "csid")]
    test_ood = {n: (values[n], bench.ood[n].shift) for n in bench.ood}
    block: dict[str, Any] = {"threshold": threshold, "csid": csid_table(values, outputs, threshold)}
    block["csid_val"] = csid_table(values, outputs, threshold, prefix="csid-val")
    if csid_keys and test_ood:
        positives = np.concatenate([values["id"], *(values[k] for k in csid_keys)])
        block["fs"] = summarize(positives, test_ood, tpr=tpr)
    extra = {
        n: (values[f"extra/{n}"], bench.extra_ood[n].shift) for n in bench.extra_ood if f"extra/{n}" in values
    }
    if extra:
        block["extra"] = summarize(values["id"], extra, tpr=tpr)
        if csid_keys:
            block["extra_fs"] = summarize(
                np.concatenate([values["id"], *(values[k] for k in csid_keys)]), extra, tpr=tpr
            )
    val_ood = {
        n: (values[f"valood/{n}"], bench.val_ood[n].shift) for n in bench.val_ood if f"valood/{n}" in values
    }
    if val_ood:
        val_pos = np.concatenate(
            [values["val"], *(values[f"csid-val/{s}"] for s in _under(outputs, "csid-val"))]
        )
        block["val"] = summarize(val_pos, val_ood, tpr=tpr)
    return block
