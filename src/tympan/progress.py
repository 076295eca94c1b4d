"""Progress of long loops: a tqdm bar in a terminal, a few whole lines anywhere else.

A tqdm bar redraws itself with carriage returns, many times a second. In a terminal that is
one line that moves; in a log (`dvc repro > log`, CI, a captured subprocess) every redraw is
kept, and an epoch bar with its metrics writes two long lines per epoch. Outside a terminal
`progress` prints a line each time another `step_percent` of the total is done, at most one
per `MIN_INTERVAL_S`, and always the last, e.g. `featurize: 1200/2400 clips (50%), 14 s`: a
loop of a few seconds is one line, a long one at most 100 / `step_percent` + 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import IO, Any, Protocol

from tqdm import tqdm

MIN_INTERVAL_S = 5.0


class Progress(Protocol):
    """What the loops use of a progress display (tqdm's own names)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None: ...


def progress(
    total: int,
    desc: str,
    unit: str,
    *,
    initial: int = 0,
    step_percent: int = 10,
    enabled: bool = True,
    stream: IO[str] | None = None,
) -> Progress:
    """A progress display for `total` units, to `stream` (default stderr): tqdm's bar if the
    stream is a terminal, else `Lines`. `enabled=False` shows nothing."""
    stream = sys.stderr if stream is None else stream
    if enabled and not _is_terminal(stream):
        return Lines(total, desc, unit, initial=initial, step_percent=step_percent, stream=stream)
    return tqdm(
        total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, file=stream
    )


def track(
    items: Iterable[Any], total: int, desc: str, unit: str, *, enabled: bool = True
) -> Iterator[Any]:
    """Iterate over `items` (`total` of them), showing progress as `progress` does."""
    with progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Lines:
    """Progress as whole lines: one per `step_percent` of `total` reached (at most one per
    `MIN_INTERVAL_S`), and the last."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        step_percent: int = 10,
        stream: IO[str],
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.step = max(1, step_percent)
        self.n = self.shown = initial
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.next_percent = self._percent(initial) // self.step * self.step + self.step

    def _percent(self, n: int) -> int:
        return 100 if self.total <= 0 else int(100 * n / self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.total or (
            self._percent(self.n) >= self.next_percent
            and time.monotonic() - self.last >= MIN_INTERVAL_S
        ):
            self._line()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None) -> None:
        """Shown with the next line (tqdm shows it at once)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in (ordered_dict or {}).items())

    def close(self) -> None:
        if self.n != self.shown:  # stopped before the total (early stopping): say where
            self._line()

    def _line(self) -> None:
        percent = self._percent(self.n)
        self.next_percent = percent // self.step * self.step + self.step
        self.shown = self.n
        self.last = time.monotonic()
        elapsed = self.last - self.started
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s ({percent}%), {elapsed:.0f} s"
        print(text + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)

    def __enter__(self) -> Lines:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
