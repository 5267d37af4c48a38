"""``python -m api``: start uvicorn with the worker count of the serve settings.

    python -m api --host 0.0.0.0 --port 8000 [--config configs/serve/demo.yaml] [--set workers=2 ...]

The settings are read here first (a wrong key stops the start with its message), then handed to the
worker processes through the environment (``OODFORGE_SERVE_CONFIG``, ``OODFORGE_*`` for each ``--set``,
``OODFORGE_WORKERS`` for the resolved count), so every worker resolves the same torch threads and
decode processes. With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is made (a temporary directory)
when unset, so ``/metrics`` adds up every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import uvicorn

from api.settings import ENV_PREFIX, load_settings, resources
from oodforge.config import ConfigError


def override_env(overrides: list[str]) -> dict[str, str]:
    """``["limits.max_files=8"]`` -> ``{"OODFORGE_LIMITS__MAX_FILES": "8"}`` (what the workers read)."""
    env = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set takes key=value (e.g. --set limits.max_files=8), got {item!r}")
        env[ENV_PREFIX + "__".join(part.upper() for part in key.strip().split("."))] = value
    return env


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, check the settings and run uvicorn with ``settings.workers`` workers."""
    p = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--config", default=None, help="serve YAML (default $OODFORGE_SERVE_CONFIG or none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    p.add_argument("--no-access-log", action="store_true", help="no uvicorn access log lines")
    args = p.parse_args(argv)
    if args.config:
        os.environ["OODFORGE_SERVE_CONFIG"] = args.config
    os.environ.update(override_env(args.overrides))
    try:
        settings = load_settings()
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    workers = resources(settings).workers
    os.environ[ENV_PREFIX + "WORKERS"] = str(workers)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="oodforge-metrics-")
    uvicorn.run(
        "api.app:app", host=args.host, port=args.port, workers=workers, access_log=not args.no_access_log
    )


if __name__ == "__main__":
    sys.exit(main())
