"""Server settings: a YAML file (``configs/serve/*.yaml``) overridden by ``OODFORGE_*`` environment variables.

The same config system as every other stage (YAML -> typed objects, unknown keys are errors, named by
their dotted path). An environment variable ``OODFORGE_<KEY>`` sets a top-level key and ``__`` reaches
into a section: ``OODFORGE_LIMITS__MAX_FILES=8`` is the override ``limits.max_files=8``. API keys are a
comma-separated list (``OODFORGE_API_KEYS=key1,key2``). The YAML file is ``$OODFORGE_SERVE_CONFIG``
unless one is passed.

Example:
    >>> settings = load_settings("configs/serve/demo.yaml", overrides=["detectors_dir=runs"])
    >>> settings.limits.max_image_pixels
    16777216
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, SecretStr, field_validator

from oodforge.config import StrictModel, apply_overrides, read_yaml, validate
from oodforge.images import DEFAULT_FORMATS

ENV_PREFIX = "OODFORGE_"
CONFIG_ENV = "OODFORGE_SERVE_CONFIG"
RAW_ENV_KEYS = ("api_keys",)  # taken verbatim: a key such as "yes" or "0123" must stay a string

IMAGE_FORMATS = DEFAULT_FORMATS
CORES_PER_WORKER = 4  # default workers = cores // 4: each worker's loop + model beside its decode processes


class Limits(StrictModel):
    """What one request may carry; anything above gets a 4xx that names the limit.

    Attributes:
        max_body_bytes: Largest request body; larger ones get 413 before they are read.
        max_files: Most images in one request.
        max_image_pixels: Largest width x height of one image, checked before decoding (decompression bombs).
        image_formats: Image formats the decoder may open. Every common mode of them is converted to RGB
            (:mod:`oodforge.images` has the table: alpha composited, 16-bit scaled, EXIF applied).
        jpeg_draft: Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
            the model input's: several times faster for photos. ``Detector.predict`` on bytes does the
            same, so served scores equal the library's; ``false`` decodes every pixel (then scores equal
            ``Detector.decode(data, draft=False)``, i.e. a full PIL decode).
    """

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_files: int = Field(64, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    image_formats: list[str] = list(IMAGE_FORMATS)
    jpeg_draft: bool = True

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        upper = [f.upper() for f in formats]
        unknown = sorted(set(upper) - set(IMAGE_FORMATS))
        if unknown:
            raise ValueError(
                f"limits.image_formats {unknown} are not supported; choose from {list(IMAGE_FORMATS)}"
            )
        return upper


class Batching(StrictModel):
    """Micro-batching: a batch runs when it holds ``max_batch_size`` images or ``max_wait_ms`` after its first."""

    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)


class ServeSettings(StrictModel):
    """Everything the server needs; ``configs/serve/demo.yaml`` is a commented example.

    Attributes:
        detectors_dir: Directory whose sub-directories are detector artifacts (``NAME/detector.json``) or
            training runs (``NAME/detector/detector.json``); the sub-directory name is the detector name.
        detectors: Serve only these names (default: every artifact found).
        default_detector: Used when a request names none (default: ``oal`` or ``ce`` if present, else
            the first name in sorted order).
        api_keys: When non-empty, ``/score`` and ``/detectors*`` need ``Authorization: Bearer <key>``.
        device: torch device for inference.
        workers: uvicorn worker processes sharing the machine (``python -m api`` starts that many; with
            plain ``uvicorn --workers N`` set it, or ``$WEB_CONCURRENCY``, to ``N``). Default:
            ``$WEB_CONCURRENCY``, else one per 4 CPU cores this process may use (at least 1).
        torch_threads: Intra-op threads per worker. Default: half of a worker's share of the cores (at
            least 1), so that the models and the decode processes do not oversubscribe the cores.
        decode_processes: Processes per worker that decode and pre-process uploads, each with its own GIL,
            so decoding never stalls the event loop or the model (BENCHMARKS "Serving" has the profile that
            chose this). 0 decodes in ``decode_threads`` threads of the worker itself. Default: the
            worker's share of the cores (cores // workers).
        decode_threads: Threads per worker that decode uploads when ``decode_processes`` is 0 (PIL and
            torch release the GIL there); default 1.
        decode_inline_bytes: Requests whose images add up to at most this many bytes are decoded on the
            event loop (sending a few small images elsewhere costs more than decoding them); 0 sends
            every request to the decode processes or threads.
        plugins: Python modules imported at startup that register more detector kinds
            (``OODFORGE_PLUGINS=mypkg.kinds``); installed ``oodforge.detector_kinds`` entry points load too.
    """

    detectors_dir: Path = Path("runs")
    detectors: list[str] | None = None
    default_detector: str | None = None
    api_keys: list[SecretStr] = []
    device: str = "cpu"
    workers: int | None = Field(None, ge=1)
    torch_threads: int | None = Field(None, ge=1)
    decode_processes: int | None = Field(None, ge=0)
    decode_threads: int | None = Field(None, ge=1)
    decode_inline_bytes: int = Field(16 * 1024, ge=0)
    plugins: list[str] = []
    limits: Limits = Limits()
    batching: Batching = Batching()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            value = [str(k).strip() for k in value if str(k).strip()]
        return value

    @field_validator("detectors", "plugins", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: ``taskset`` and cpusets count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not every platform has sched_getaffinity
        return max(1, os.cpu_count() or 1)


class Resources(NamedTuple):
    """How one worker process uses the machine, every ``None`` setting resolved (see :func:`resources`).

    Attributes:
        cores: CPU cores this process may use.
        workers: Worker processes sharing them.
        torch_threads: Intra-op threads of this worker's models.
        decode_processes: Decode processes of this worker (0: it decodes in its own threads).
        decode_threads: Decode threads of this worker when ``decode_processes`` is 0.
    """

    cores: int
    workers: int
    torch_threads: int
    decode_processes: int
    decode_threads: int


def _env_workers(environ: Mapping[str, str]) -> int | None:
    value = environ.get("WEB_CONCURRENCY", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def resources(
    settings: ServeSettings, environ: Mapping[str, str] | None = None, cores: int | None = None
) -> Resources:
    """The worker count, torch threads and decoders of ``settings``, defaults derived from the cores.

    ``workers`` = setting, else ``$WEB_CONCURRENCY``, else cores // 4 (at least 1); a worker's share is
    cores // workers (at least 1); ``torch_threads`` = setting, else half the share (at least 1);
    ``decode_processes`` = setting, else the share; ``decode_threads`` = setting, else 1.
    """
    environ = os.environ if environ is None else environ
    cores = cores or available_cores()
    workers = settings.workers or _env_workers(environ) or max(1, cores // CORES_PER_WORKER)
    share = max(1, cores // workers)
    processes = settings.decode_processes
    return Resources(
        cores=cores,
        workers=workers,
        torch_threads=settings.torch_threads or max(1, share // 2),
        decode_processes=share if processes is None else processes,
        decode_threads=settings.decode_threads or 1,
    )


def inference_threads(settings: ServeSettings, environ: Mapping[str, str] | None = None) -> int:
    """``settings.torch_threads``, else the CPU cores shared out among the workers."""
    return resources(settings, environ).torch_threads


def decode_threads(settings: ServeSettings, environ: Mapping[str, str] | None = None) -> int:
    """``settings.decode_threads``, else 1 (used when ``decode_processes`` is 0)."""
    return resources(settings, environ).decode_threads


def env_overrides(environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``OODFORGE_A__B=v`` -> override ``a.b=v``; keys in :data:`RAW_ENV_KEYS` come back separately, verbatim."""
    overrides, raw = [], {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if key in RAW_ENV_KEYS:
            raw[key] = value
        else:
            overrides.append(f"{key}={value}")
    return overrides, raw


def load_settings(
    yaml_file: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeSettings:
    """Build the server settings from a YAML file, the environment and command-line overrides.

    Later sources win: ``yaml_file`` (default ``$OODFORGE_SERVE_CONFIG``; none = defaults), then the
    ``OODFORGE_*`` environment, then ``overrides`` (``["limits.max_files=8", ...]``).

    Raises:
        ConfigError: a missing file or a wrong key/value, naming the key and where it came from.
    """
    environ = os.environ if environ is None else environ
    yaml_file = yaml_file or environ.get(CONFIG_ENV) or None
    data = read_yaml(yaml_file) if yaml_file else {}
    env, raw = env_overrides(environ)
    data = apply_overrides(data, env)
    data.update(raw)
    data = apply_overrides(data, overrides or [])
    source = f"{yaml_file or '(defaults)'} + {ENV_PREFIX}* environment"
    return validate(ServeSettings, data, source=source)
