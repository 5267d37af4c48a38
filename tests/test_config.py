"""Config loading: YAML -> typed objects, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from oodforge.config import ConfigError, apply_overrides, load_config, parse_override
from trainer.config import TrainConfig
from trainer.methods import build_method

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_shipped_ce_config_loads() -> None:
    cfg = load_config(REPO / "configs/train/ce.yaml", TrainConfig)
    assert cfg.method == "ce" and cfg.data.benchmark == "mnist-open"
    assert cfg.run_dir == Path("runs/ce")


def test_misspelled_nested_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, TrainConfig)
    assert "train.epoch" in str(err.value) and "unknown key" in str(err.value)


def test_misspelled_method_arg_is_named(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "method: ce\nmethod_args:\n  alpah: 4\n"), TrainConfig)
    with pytest.raises(ConfigError, match=r"method_args\.alpah"):
        build_method(cfg.method, cfg.method_args)  # the first thing trainer.train does


def test_unknown_method_and_score_are_errors(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "method: cee\n"), TrainConfig)
    with pytest.raises(ConfigError, match="unknown method 'cee'"):
        build_method(cfg.method, cfg.method_args)
    with pytest.raises(ConfigError, match="unknown score 'enrgy'"):
        load_config(write(tmp_path, "export:\n  score: enrgy\n"), TrainConfig)


def test_bad_value_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(write(tmp_path, "train:\n  epochs: many\n"), TrainConfig)


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\n")
    cfg = load_config(
        path, TrainConfig, ["train.epochs=3", "optim.lr=0.1", "eval.scores=[msp,energy]", "name=b"]
    )
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.1
    assert cfg.eval.scores == ["msp", "energy"] and cfg.name == "b"
    with pytest.raises(ConfigError, match=r"train\.epohcs"):
        load_config(path, TrainConfig, ["train.epohcs=3"])


def test_override_parsing_errors() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", TrainConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"), TrainConfig)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), TrainConfig)
