"""A one-line progress bar for the examples' long loops.

Example:
  >>> import io
  >>> log = io.StringIO()
  >>> bar = ProgressBar(4, "epoch 1/3", stream=log, width=8)
  >>> for step in range(1, 5):
  ...     bar.update(step, lambda: "loss 0.50")
  >>> print(log.getvalue().splitlines()[-1])
  epoch 1/3 [########] 4/4 loss 0.50
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class ProgressBar:
    """A one-line progress bar: ``epoch 1/3 [#####...] 120/250 loss 1.234 1.9k img/s``.

    On a terminal the line is redrawn in place (at most every ``interval`` seconds); in a log
    file a line is printed at every tenth of the way, so logs stay short.

    Args:
      total: the number of steps.
      prefix: text before the bar.
      stream: where to write (default ``sys.stdout``).
      width: characters of the bar.
      interval: seconds between redraws on a terminal.
    """

    def __init__(self, total: int, prefix: str, stream=None, width: int = 24, interval=0.5):
        self.total, self.prefix, self.width, self.interval = max(total, 1), prefix, width, interval
        self.stream = stream or sys.stdout
        self.is_terminal = self.stream.isatty()
        self.last_draw = -float("inf")
        self.last_tenth = 0

    def update(self, done: int, describe: Callable[[], str] | str = "") -> None:
        """Show ``done`` of ``total``, followed by ``describe`` (a string, or a function called
        only when the line is drawn, so that device values are fetched only then)."""
        now = time.perf_counter()
        tenth = 10 * done // self.total
        if self.is_terminal:
            if now - self.last_draw < self.interval and done < self.total:
                return
            end = "\r"
        else:
            if tenth == self.last_tenth and done < self.total:
                return
            end = "\n"
        self.last_draw, self.last_tenth = now, tenth
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        text = describe() if callable(describe) else describe
        line = f"{self.prefix} [{bar}] {done:{len(str(self.total))}d}/{self.total} {text}".rstrip()
        self.stream.write(line.ljust(100) + end if self.is_terminal else line + end)
        self.stream.flush()

    def close(self) -> None:
        if self.is_terminal:
            self.stream.write("\n")
            self.stream.flush()
