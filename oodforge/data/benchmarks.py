"""``load_benchmark``: the benchmark a :class:`DataConfig` names, plus the OOD folders it lists."""

from __future__ import annotations

from oodforge.data import folders, mnist_open  # noqa: F401  (register the built-in benchmarks)
from oodforge.data.base import BENCHMARKS, Benchmark, DataConfig, OODSet
from oodforge.data.folders import folder_ood_set


def load_benchmark(cfg: DataConfig) -> Benchmark:
    """Build the benchmark named by ``cfg.benchmark`` and add the OOD folders of ``cfg.ood``.

    Args:
        cfg: The data section of a config.

    Returns:
        The benchmark, with ``cfg.ood`` folders added as OOD sets of their configured shift.

    Raises:
        KeyError: ``cfg.benchmark`` is not registered.
        ValueError: An extra OOD set reuses the name of one the benchmark already has.
    """
    bench = BENCHMARKS.get(cfg.benchmark)(cfg)
    if not cfg.builtin_ood:  # the test OOD sets go; the validation OOD sets are not test data and stay
        bench.ood, bench.extra_ood = {}, {}
    for name, spec in cfg.ood.items():
        if name in bench.ood:
            raise ValueError(
                f"data.ood.{name}: benchmark {bench.name!r} already has an OOD set called {name!r}; "
                "give the folder another name"
            )
        bench.ood[name] = OODSet(folder_ood_set(name, spec.path), spec.shift)
    return bench
