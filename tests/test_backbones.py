"""Backbones give logits and features; a saved transformers model loads through the `hf` path."""

from pathlib import Path

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from oodforge.backbones import (
    BACKBONES,
    BackboneConfig,
    build_classifier,
    classifier_from_config,
    config_to_dict,
)

TINY = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}


def test_registry_and_outputs() -> None:
    assert {"resnet-tiny", "hf"} <= set(BACKBONES.names())
    clf = build_classifier(BackboneConfig(options=TINY), num_classes=6).eval()
    x = torch.randn(4, 3, 32, 32)
    logits, features = clf(x)
    assert logits.shape == (4, 6) and features.shape == (4, 16) and clf.feature_dim == 16
    # logits are exactly the head applied to the features
    torch.testing.assert_close(logits, clf.head(features))


def test_config_round_trip_gives_identical_outputs() -> None:
    clf = build_classifier(BackboneConfig(options=TINY), num_classes=3).eval()
    again = classifier_from_config(config_to_dict(clf.hf_config)).eval()
    again.load_state_dict(clf.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clf(x)[0], again(x)[0])


def test_hf_backbone_from_local_directory(tmp_path: Path) -> None:
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10
    )
    ResNetForImageClassification(config).save_pretrained(tmp_path / "model")
    clf = build_classifier(BackboneConfig(name="hf", pretrained=str(tmp_path / "model")), num_classes=4)
    logits, features = clf(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and features.shape == (2, 16)


def test_hf_backbone_needs_a_path() -> None:
    with pytest.raises(ValueError, match="model.pretrained"):
        build_classifier(BackboneConfig(name="hf"), num_classes=2)
