"""The detectors a server holds: found under one directory, loaded once, looked up by name in memory.

A name is a sub-directory of ``detectors_dir`` holding an artifact (``NAME/detector.json``) or a
training run (``NAME/detector/detector.json``); any kind loads through :meth:`Detector.load` (the
``kind`` of its ``detector.json`` picks the class; ``plugins`` names modules that register more
kinds). Requests only ever
index the in-memory table, so no request-supplied name touches the file system; discovery also skips
links that lead outside the directory.

Example:
    >>> table = DetectorTable.load(settings)
    >>> name, detector = table.get("oal")
    >>> detector.predict([image])
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from api.settings import ServeSettings
from oodforge.detector import SPEC_FILE, ArtifactError, Detector, load_plugins

log = logging.getLogger("oodforge.api")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREFERRED_DEFAULTS = ("oal", "ce")


class UnknownDetector(LookupError):
    """No detector of that name is served."""


def artifact_dir(entry: Path) -> Path | None:
    """The artifact inside ``entry`` (itself, or its ``detector/`` for a training run), if any."""
    for candidate in (entry, entry / "detector"):
        if (candidate / SPEC_FILE).is_file():
            return candidate
    return None


def discover(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Map detector name -> artifact directory for the entries of ``root`` (only ``names`` if given)."""
    root = root.resolve()
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or not NAME_PATTERN.match(entry.name) or entry.name.startswith("."):
            continue
        path = artifact_dir(entry)
        if path is None:
            continue
        if not path.resolve().is_relative_to(root):
            log.warning("skipping %s: it links outside %s", entry.name, root)
            continue
        found[entry.name] = path
    if names is not None:
        found = {n: p for n, p in found.items() if n in names}
    return found


@dataclass
class DetectorTable:
    """Loaded detectors by name, the default name, and the ones that failed to load (with why)."""

    detectors: dict[str, Detector]
    default: str | None
    failed: dict[str, str] = field(default_factory=dict)
    root: Path = Path(".")

    @classmethod
    def load(cls, settings: ServeSettings) -> DetectorTable:
        """Load the detectors under ``settings.detectors_dir``, recording failures instead of raising."""
        root = Path(settings.detectors_dir)
        load_plugins(settings.plugins)
        paths = discover(root, settings.detectors)
        failed: dict[str, str] = {}
        for name in settings.detectors or []:
            if name not in paths:
                failed[name] = f"no detector artifact at {root / name} (or {root / name / 'detector'})"
        detectors: dict[str, Detector] = {}
        for name, path in paths.items():
            try:
                detectors[name] = Detector.load(path, device=settings.device)
                log.info("loaded %s detector %s from %s", detectors[name].kind, name, path)
            except ArtifactError as err:
                failed[name] = str(err)
                log.error("cannot load detector %s: %s", name, err)
        default = settings.default_detector
        if default is None:
            default = next((n for n in PREFERRED_DEFAULTS if n in detectors), min(detectors, default=None))
        elif default not in detectors:
            failed.setdefault(
                default,
                f"default detector {default!r} is not among the loaded ones ({', '.join(sorted(detectors)) or 'none'}); "
                "set default_detector to one of them or export that detector",
            )
            log.error("default detector %s is not loaded", default)
        return cls(detectors=detectors, default=default, failed=failed, root=root)

    @property
    def ready(self) -> bool:
        """Whether the default detector is loaded, so requests without a name can be served."""
        return self.default is not None and self.default in self.detectors

    def names_with_maps(self) -> list[str]:
        """The sorted names of the loaded detectors whose kind returns per-pixel maps."""
        return sorted(n for n, d in self.detectors.items() if d.has_maps)

    def get(self, name: str | None) -> tuple[str, Detector]:
        """The detector called ``name`` (the default when ``None``), or :class:`UnknownDetector`."""
        name = name or self.default
        if name is None or name not in self.detectors:
            available = ", ".join(sorted(self.detectors)) or "none"
            raise UnknownDetector(
                f"unknown detector {name!r}; available: {available} (GET /detectors lists them)"
            )
        return name, self.detectors[name]
