"""Progress that suits where it is shown: a tqdm bar in a terminal or a notebook, a timed line in a log file.

    with progress(total=n_cells, desc="predicting", unit="cells", enabled=verbose) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

Every reporter `progress` returns has `update(n)`, `set_description(text)` and `close()`, and is a context manager.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm.auto import tqdm

LOG_EVERY_SECONDS = 10.0


def progress(total: int | None, *, desc: str, unit: str = "cells", enabled: bool = True,
             every: float = LOG_EVERY_SECONDS, file: IO[str] | None = None) -> Any:
    """A progress reporter for `total` units of work.

    A tqdm.auto bar when `file` (default stderr) is a terminal or the code runs in a notebook; a `LogProgress`
    printing one line every `every` seconds otherwise (a log file has no use for a bar's carriage returns);
    a silent tqdm when not `enabled`.
    """
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(total=total, disable=True)
    if interactive(stream):
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=file)
    return LogProgress(total, desc=desc, unit=unit, every=every, file=stream)


class LogProgress:
    """One line every `every` seconds: done/total, rate and time left, e.g.
    'predicting: 12,800/70,000 cells (18%), 1,270 cells/s, 0:45 left'; a last line on close when any was printed."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "cells", every: float = LOG_EVERY_SECONDS,
                 file: IO[str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.file = file
        self.clock = clock
        self.done = 0
        self.started = self.last = clock()
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._print(self._status(now))

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.lines:  # short work printed nothing and needs no closing line either
            elapsed = self.clock() - self.started
            self._print(f"{self.done:,} {self.unit} in {_duration(elapsed)} "
                        f"({self.done / max(elapsed, 1e-9):,.0f} {self.unit}/s)")

    def _status(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        if not self.total:
            return f"{self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}), {rate:,.0f} {self.unit}/s, "
                f"{_duration(left)} left")

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.file if self.file is not None else sys.stderr, flush=True)
        self.lines += 1

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether a bar can be drawn: `stream` (default stderr) is a terminal, or the code runs in a notebook."""
    return _is_terminal(sys.stderr if stream is None else stream) or _in_notebook()


def time_left(elapsed: float, done: int, total: int) -> str:
    """'0:42 left' for `total` steps of which `done` took `elapsed` seconds (steps of similar cost)."""
    return f"{_duration(elapsed / done * (total - done)) if done else '?'} left"


def _duration(seconds: float) -> str:
    """0:45, 12:03 or 1:02:03."""
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _in_notebook() -> bool:
    """Inside a Jupyter (or Colab, VS Code) kernel, where tqdm.auto draws a widget."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")
