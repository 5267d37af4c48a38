"""``python -m api.ray_serve`` errors that need no Ray cluster (and run whether or not the extra is installed)."""

from __future__ import annotations

import sys

import pytest

from api import ray_serve


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert ray_serve.main(["--detectors", str(tmp_path)]) == 2
    assert "pip install 'oodforge[ray]'" in capsys.readouterr().err


def test_a_missing_detectors_dir_is_named(tmp_path, capsys):
    assert ray_serve.main(["--detectors", str(tmp_path / "nope")]) == 2
    assert f"detectors_dir {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(("replicas", "cpus"), [(0, 1.0), (1, 0.0)])
def test_bad_replica_counts_are_refused(replicas, cpus):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'oodforge[ray]'")
    from api.settings import load_settings

    with pytest.raises(ValueError, match="must be"):
        ray_serve.build_application(load_settings(environ={}), replicas, cpus)
