"""What the training programs share besides metrics: a progress bar and atomic file writes.

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

import contextlib
import json
import os
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


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file next to ``path`` for writing; on success, rename it over ``path``.

    The file is flushed to disk before ``os.replace`` (atomic), so a crash at any moment leaves
    either the previous file or the new one at ``path``, never a partial file; the temporary
    file is removed on failure.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
