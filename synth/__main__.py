"""``python -m synth {fit-generator,generate,reference} --config FILE --out DIR [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from oodforge.config import ConfigError, add_config_args, load_config


def _fit(args: argparse.Namespace) -> int:
    from synth.fit_generator import FitGeneratorConfig, main_fit

    return main_fit(load_config(args.config, FitGeneratorConfig, args.overrides), Path(args.out))


def _generate(args: argparse.Namespace) -> int:
    from synth.generate import SynthConfig, main_generate

    return main_generate(load_config(args.config, SynthConfig, args.overrides), Path(args.out))


def _reference(args: argparse.Namespace) -> int:
    from synth.generate import SynthConfig
    from synth.reference import main_reference

    return main_reference(load_config(args.config, SynthConfig, args.overrides), Path(args.out))


COMMANDS = {
    "fit-generator": (_fit, "configs/synth/tiny_mnist_open.yaml", "train the embedded SD generator"),
    "generate": (_generate, "configs/synth/mnist_open.yaml", "synthesise an outlier dataset"),
    "reference": (_reference, "configs/synth/mnist_open.yaml", "write generated ID images + VAE round trips"),
}


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m synth fit-generator|generate``; return the exit status (2 on a bad config or input)."""
    parser = argparse.ArgumentParser(
        prog="python -m synth", description="Outlier synthesis with Stable Diffusion."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, default, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_config_args(p, default=default)
        p.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][0](args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
