"""A CSV tracker for Accelerate (``log_with: [csv]``), next to Accelerate's own TensorBoard tracker."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process


class CSVTracker(GeneralTracker):
    """Appends ``step,name,value`` rows to ``<logging_dir>/metrics.csv`` (long format survives resumes)."""

    name = "csv"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.run_name = run_name
        self.dir = Path(logging_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.csv"
        if not self.path.exists():
            self.path.write_text("step,name,value\n")

    @property
    def tracker(self) -> Path:
        """The CSV file the rows go to."""
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Write the run's hyper-parameters to ``hparams.json``."""
        (self.dir / "hparams.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Append a ``step,name,value`` row per numeric value (other values are skipped)."""
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    writer.writerow([step if step is not None else "", key, value])
