"""Progress that reads well in a terminal and in a log file.

A terminal gets a tqdm bar. Anywhere else (a log file, a pipe, a batch job) a bar is one long line
of carriage returns, so there the same calls print a plain line at every tenth of the work and at
most every ``PLAIN_EVERY_S`` seconds in between.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """The part of tqdm's interface the stages use, printing whole lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
                 stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S) -> None:
        self.total, self.n, self.desc, self.unit, self.disable = int(total), int(initial), desc, unit, disable
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.last_time = self.started
        self.last_tenth = self._tenth()

    def _tenth(self) -> int:
        return 10 * self.n // max(self.total, 1)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if self._tenth() != self.last_tenth or now - self.last_time >= self.every_s:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def _print(self, now: float) -> None:
        self.last_tenth, self.last_time = self._tenth(), now
        if self.disable:
            return
        details = "".join(f" {k}={v}" for k, v in self.postfix.items())
        percent = 100.0 * self.n / max(self.total, 1)
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent:.0f}%) {now - self.started:.0f} s{details}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.total and not self.disable:
            self._print(time.perf_counter())

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
                 stream: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, :class:`PlainProgress` lines elsewhere (``stream`` defaults to stderr)."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                    file=stream)
    return PlainProgress(total, initial, desc, unit, disable, stream)
