"""Progress bars for long jobs that also show in logs: a live tqdm bar on a terminal, lines elsewhere.

On a terminal ``progress(...)`` is a plain ``tqdm`` bar. When stderr is not a terminal (a log file, CI,
``nohup``), tqdm would hide its bar or fill the log with carriage returns; here it writes one plain line
at most every ``OODFORGE_PROGRESS_SECONDS`` (default 30) and one at the end, so a log shows that a job
moves and how fast; short inner bars (``leave=False``) stay out of logs. ``OODFORGE_PROGRESS=0``
silences every bar.

Example:
    >>> for batch in progress(loader, desc="embed ID train"):
    ...     ...
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file-like that turns tqdm's carriage-return refreshes into whole lines (no cursor codes)."""

    def __init__(self, stream: TextIO) -> None:
        """Write to ``stream``."""
        self.stream = stream

    def write(self, text: str) -> None:
        """Write each refresh as its own line."""
        for part in _ANSI.sub("", text).replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        """Flush the underlying stream."""
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for logs: postfix and description changes wait for the next timed line."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        """Update the postfix without writing a line."""
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = False) -> None:
        """Update the description without writing a line."""
        super().set_description(desc, refresh=refresh)


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` that is visible on a terminal and in logs (see the module docstring)."""
    if os.environ.get("OODFORGE_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    if kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    kwargs.pop("disable", None)  # tqdm's None means "off unless a terminal": here logs get lines
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    if kwargs.pop("leave", True) is False:  # a short inner bar (one split of an evaluation): not in logs
        return tqdm(iterable, disable=True, **kwargs)
    seconds = float(os.environ.get("OODFORGE_PROGRESS_SECONDS", "30"))
    return _LogBar(
        iterable, file=_Lines(sys.stderr), mininterval=seconds, maxinterval=seconds, ascii=True, **kwargs
    )
