"""The text-aligned teacher: cosine head against a generator's class anchors, trained and exported."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from oodforge.backbones import ANCHORS_KEY, BackboneConfig, HeadConfig, build_classifier
from oodforge.detector import Detector
from oodforge.tokens import load_class_anchors

REPO = Path(__file__).resolve().parents[1]
TINY = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
CLASSES = ["0", "1", "2", "3", "4", "5"]
WORDS = ["a", "high", "quality", "image", "of", "the", "-", *CLASSES]
WIDTH = 32  # the tiny text encoder's token-embedding width D
TINY_RUN = [
    "model.options={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}",
    "train.batch_size=64",
    "train.eval_batch_size=1024",
]


def whole_word_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP vocab and merges in which every word is one token (``word</w>``)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        for part in parts:
            vocab.setdefault(part, len(vocab))
        merged = parts[0]
        for part in parts[1:]:
            if f"{merged} {part}" not in merges:
                merges.append(f"{merged} {part}")
            merged += part
            vocab.setdefault(merged, len(vocab))
    return vocab, merges


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generator directory with only what the teacher reads: ``tokenizer/`` and ``text_encoder/``."""
    tmp = tmp_path_factory.mktemp("gen")
    vocab, merges = whole_word_bpe(WORDS)
    (tmp / "bpe").mkdir()
    (tmp / "bpe" / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "bpe" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "bpe"))
    ids = tokenizer("a high-quality image of the 3", add_special_tokens=False).input_ids
    assert len(ids) == 8 and tokenizer.unk_token_id not in ids  # whole words, nothing unknown
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    tokenizer.save_pretrained(tmp / "gen" / "tokenizer")
    CLIPTextModel(config).save_pretrained(tmp / "gen" / "text_encoder")
    return tmp / "gen"


def test_cosine_logits_follow_the_formula(generator: Path) -> None:
    anchors = load_class_anchors(generator, CLASSES)
    assert anchors.shape == (6, WIDTH)
    head = HeadConfig(name="cosine", tau=0.1)
    clf = build_classifier(BackboneConfig(options=TINY, head=head), 6, anchors=anchors).eval()
    assert clf.feature_dim == WIDTH and clf.head_config.embed_dim == WIDTH
    assert torch.equal(clf.state_dict()[ANCHORS_KEY], anchors)  # saved with the weights

    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        logits, features = clf(x)
        h = clf.body(pixel_values=x).logits.flatten(1)
        z = h @ clf.neck.weight.T + clf.neck.bias  # z = P(h)
    cos = (z @ anchors.T) / (z.norm(dim=1, keepdim=True) * anchors.norm(dim=1))
    assert features.shape == (5, WIDTH)
    torch.testing.assert_close(features, z)
    torch.testing.assert_close(logits, cos / 0.1)
    assert logits.abs().max() <= 10 + 1e-4  # |cos| <= 1


def test_cosine_detector_round_trip(generator: Path, tmp_path: Path) -> None:
    """The artifact stores the head config in detector.json and the anchors in model.safetensors."""
    from safetensors.torch import load_file, save_file

    from oodforge.data.transforms import Preprocess
    from oodforge.detector import ArtifactError, ClassifierDetector
    from oodforge.scores import build_score

    anchors = load_class_anchors(generator, CLASSES)
    cfg = BackboneConfig(options=TINY, head=HeadConfig(name="cosine", tau=0.05))
    model = build_classifier(cfg, 6, anchors=anchors).eval()
    score = build_score("knn", k=3).fit(torch.randn(30, WIDTH), torch.arange(30) % 6)
    original = ClassifierDetector.create(
        name="cos",
        model=model,
        score=score,
        preprocess=Preprocess(),
        class_names=CLASSES,
        val_scores=np.full(10, -1.0),
    )
    path = original.save(tmp_path / "det")
    assert json.loads((path / "detector.json").read_text())["head"]["head"] == {
        "name": "cosine",
        "tau": 0.05,
        "embed_dim": WIDTH,
    }
    x = torch.rand(4, 3, 32, 32)
    loaded = Detector.load(path)
    torch.testing.assert_close(loaded.model.head.anchors, anchors, rtol=0, atol=0)
    for a, b in zip(original.forward_batch(x), loaded.forward_batch(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    tensors = load_file(path / "model.safetensors")
    del tensors[f"model.{ANCHORS_KEY}"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ArtifactError, match="needs class anchors"):
        Detector.load(path, verify=False)


def test_cosine_head_needs_fitting_anchors(generator: Path) -> None:
    cosine = BackboneConfig(options=TINY, head=HeadConfig(name="cosine"))
    with pytest.raises(ValueError, match="needs class anchors"):
        build_classifier(cosine, 6)
    with pytest.raises(ValueError, match=r"expected \[6, D\]"):
        build_classifier(cosine, 6, anchors=torch.randn(4, WIDTH))
    with pytest.raises(ValueError, match="embed_dim is 16"):
        cfg = BackboneConfig(options=TINY, head=HeadConfig(name="cosine", embed_dim=16))
        build_classifier(cfg, 6, anchors=torch.randn(6, WIDTH))
    with pytest.raises(ValueError, match="takes no class anchors"):
        build_classifier(BackboneConfig(options=TINY), 6, anchors=torch.randn(6, WIDTH))


def run_teacher(tmp_path: Path, *extra: str) -> int:
    """``trainer.train_oal.main`` on configs/train/teacher.yaml with the tiny backbone of test_train.py."""
    from trainer.train_oal import main

    sets = [f"output_dir={tmp_path / 'runs'}", *TINY_RUN, *extra]
    return main(
        ["--config", str(REPO / "configs/train/teacher.yaml"), *[a for s in sets for a in ("--set", s)]]
    )


@pytest.mark.slow
def test_teacher_run_learns_and_exports_an_embedding_detector(generator: Path, tmp_path: Path) -> None:
    extra = ("name=teacher", "train.epochs=1", "eval.plots=false", f"method_args.generator={generator}")
    assert run_teacher(tmp_path, *extra) == 0
    run = tmp_path / "runs" / "teacher"
    report = json.loads((run / "report.json").read_text())
    assert report["id_accuracy"] > 0.5  # chance is 1/6

    detector = Detector.load(run / "detector")
    spec = detector.spec
    assert detector.head.head == HeadConfig(name="cosine", tau=0.1, embed_dim=WIDTH)
    assert spec.score.name == "knn" and spec.provenance.training["method"] == "teacher"
    torch.testing.assert_close(detector.model.head.anchors, load_class_anchors(generator, CLASSES))

    from oodforge.data import DataConfig, load_benchmark
    from oodforge.metrics import auroc

    bench = load_benchmark(DataConfig())
    pixels = torch.stack([detector.preprocess(bench.test[i][0]) for i in range(len(bench.test))])
    logits, features = detector.forward_batch(pixels)
    assert features.shape == (len(bench.test), WIDTH)  # the D-dim embedding z
    # the restored artifact gives the scores of training time: same accuracy, same AUROC
    test = detector.predict_from_outputs(logits, features)
    assert (test.labels == bench.test.labels).mean() == pytest.approx(report["id_accuracy"], abs=1e-9)
    near = bench.ood["digits-6-9"].images
    ood = detector.predict([near[i][0] for i in range(len(near))])
    expected = report["scores"]["knn"]["ood"]["digits-6-9"]["auroc"]
    assert auroc(test.scores, ood.scores) == pytest.approx(expected, abs=1e-9)
    # and a second save/load round trip changes nothing
    again = Detector.load(detector.save(tmp_path / "copy"))
    np.testing.assert_array_equal(again.predict(pixels[:50]).scores, detector.predict(pixels[:50]).scores)


@pytest.mark.parametrize("layout", ["missing", "no_text_encoder"])
def test_missing_generator_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    gen = tmp_path / "generators" / "tiny-mnist-open"
    if layout == "no_text_encoder":
        (gen / "tokenizer").mkdir(parents=True)
    assert run_teacher(tmp_path, "name=nogen", f"method_args.generator={gen}") == 2
    err = capsys.readouterr().err
    assert str(gen) in err and "python -m synth fit-generator" in err
    if layout == "no_text_encoder":
        assert "text_encoder/" in err
    assert not (tmp_path / "runs").exists()


def test_teacher_sets_its_own_head(
    generator: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("name=head", f"method_args.generator={generator}", "model.head.name=cosine")
    assert run_teacher(tmp_path, *extra) == 2
    assert "method_args.tau" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
