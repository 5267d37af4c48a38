"""Serve detectors with Ray Serve: replicas of the same FastAPI app behind Ray's HTTP proxy.

    pip install 'oodforge[ray]'
    ray start --head                                   # or let this command start a local Ray
    python -m api.ray_serve --detectors runs --replicas 2 [--config configs/serve/demo.yaml] [--set k=v]

Every replica builds the app with :func:`api.app.create_app` from the same settings as ``uvicorn
api.app:app`` (the YAML file, ``OODFORGE_*`` variables and ``--set`` are read once here, by the driver,
and shipped to the replicas), so ``/score``, ``/v2``, ``/readyz`` and ``/metrics`` answer as they do
under uvicorn, with Ray's proxy spreading requests over the replicas. Each replica reserves
``--cpus-per-replica`` CPUs of the Ray cluster and, unless the settings say otherwise, uses as many
torch and decode threads. ``/metrics`` is the metrics of the replica that answered (scrape the replicas
through Ray's own metrics, or run one replica per scrape target, for cluster totals).

The detectors directory must exist at the same path on every Ray node (a shared filesystem or the
same container image), and this project must be importable there (installed, or ``runtime_env``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from api.settings import ServeSettings, load_settings
from oodforge.config import ConfigError

APP_NAME = "oodforge"
INSTALL_HINT = "Ray Serve is not installed; install the extra: pip install 'oodforge[ray]'"


def _serve() -> Any:
    """The ``ray.serve`` module, or an ImportError that says how to install it."""
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return serve


def replica_settings(settings: ServeSettings, cpus_per_replica: float) -> ServeSettings:
    """``settings`` with the thread counts a replica of ``cpus_per_replica`` CPUs uses when none are set."""
    threads = max(1, int(cpus_per_replica))
    return settings.model_copy(
        update={
            "torch_threads": settings.torch_threads or threads,
            "decode_threads": settings.decode_threads or threads,
        }
    )


def build_application(settings: ServeSettings, replicas: int = 1, cpus_per_replica: float = 1.0) -> Any:
    """The Ray Serve application: ``replicas`` copies of the oodforge app, ``cpus_per_replica`` CPUs each."""
    serve = _serve()
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    if cpus_per_replica <= 0:
        raise ValueError(f"--cpus-per-replica must be positive, got {cpus_per_replica}")

    @serve.ingress()
    class OODForgeReplica:
        """One replica: the FastAPI app of :func:`api.app.create_app`, built on the replica's node."""

        def __init__(self, settings: ServeSettings) -> None:
            self.settings = settings

        def __serve_build_asgi_app__(self) -> Any:  # noqa: N807 (the name Ray Serve calls)
            from api.app import create_app

            return create_app(self.settings)

    deployment = serve.deployment(
        OODForgeReplica,
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind(replica_settings(settings, cpus_per_replica))


def run(
    settings: ServeSettings,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on ``host:port`` and deploy the app at ``/``.

    Returns once every replica has loaded its detectors (the app's startup ran); the application keeps
    running in the Ray cluster until :func:`shutdown`.
    """
    serve = _serve()  # first: without the extra, the error says how to install it
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(settings, replicas, cpus_per_replica), name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    """Remove the application and stop Serve (the Ray cluster itself keeps running)."""
    _serve().shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m api.ray_serve``: deploy, print the URL, serve until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(description="Serve oodforge detectors with Ray Serve (replicas).")
    parser.add_argument("--detectors", type=Path, help="directory of detector artifacts (detectors_dir)")
    parser.add_argument("--replicas", type=int, default=1, help="number of replicas (default 1)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    parser.add_argument(
        "--config", help="serve settings YAML (default: $OODFORGE_SERVE_CONFIG), as for uvicorn"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set limits.max_files=8")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"detectors_dir={args.detectors}"] if args.detectors else [])
    try:
        settings = load_settings(args.config, overrides=overrides)
        if not settings.detectors_dir.is_dir():
            raise ConfigError(
                f"detectors_dir {settings.detectors_dir} is not a directory; pass --detectors DIR "
                "(a directory of detector artifacts, e.g. runs/ after make demo)"
            )
        run(settings, args.replicas, args.cpus_per_replica, args.host, args.port, args.address)
    except (ConfigError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"serving {settings.detectors_dir} with {args.replicas} replica(s) on http://{args.host}:{args.port}"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
