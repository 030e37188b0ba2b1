"""Timing for the benchmarks: candidates that take turns within one run, the minimum and the
median over repeats, ratios to a reference timed in the same run, and the JSON report.

Speed on a shared machine drifts by up to 2x between days and by tens of per cent within a
run, so a comparison is only made between candidates timed in the same run: every candidate
runs once in every repeat, in an order that reverses from one repeat to the next (a drift, or
an advantage of going first, hits all of them alike). The minimum over repeats is the stable
figure, the median the typical one; a ratio is given both as the median of the per-repeat
ratios (each from one repeat) and as the ratio of the minima.

Every bench script imports this module from its own folder (``import timing``); it needs only
JAX (to wait for asynchronous results) and the examples' harness (atomic JSON files).

Example:
  >>> seconds = alternate({"a": lambda: None, "b": lambda: None}, repeats=3)
  >>> [len(seconds["a"]), len(seconds["b"])]
  [3, 3]
  >>> summarize([0.3, 0.1, 0.2], reference=[0.1, 0.1, 0.1])["ratio_of_minima"]
  1.0
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from bdl_examples.checkpoints import write_json as _write_json_atomically

Clock = Callable[[], float]


def time_call(fn: Callable, *args, clock: Clock = time.perf_counter) -> tuple[float, Any]:
    """Seconds of one call ``fn(*args)`` until its (possibly asynchronous) result is ready,
    and the result."""
    start = clock()
    out = jax.block_until_ready(fn(*args))
    return clock() - start, out


def turn_order(names: Sequence[str], repeat: int) -> list[str]:
    """The order of the candidates in repeat ``repeat`` (0-based): as given in even repeats,
    reversed in odd ones.

    Example:
      >>> [turn_order(["a", "b", "c"], r) for r in range(2)]
      [['a', 'b', 'c'], ['c', 'b', 'a']]
    """
    return list(names) if repeat % 2 == 0 else list(names)[::-1]


def alternate(
    candidates: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    steps: int = 1,
    on_repeat: Callable[[int, dict[str, list[float]]], None] | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, list[float]]:
    """Times every candidate once per repeat, the candidates taking turns (``turn_order``).

    Args:
      candidates: name -> a function without arguments that does the work to time (compiled
        and warmed up beforehand); its result is waited for (``jax.block_until_ready``).
      repeats: how many times each candidate runs.
      steps: how many steps one call runs; the seconds returned are per step.
      on_repeat: called after every repeat with its index and the seconds so far (to print
        progress).
      clock: the clock (``time.perf_counter``; a test passes its own).

    Returns:
      name -> seconds per step in each repeat, in the order of the repeats.
    """
    if repeats < 1 or steps < 1:
        raise ValueError(f"repeats and steps must be >= 1, got {repeats} and {steps}")
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for repeat in range(repeats):
        for name in turn_order(list(candidates), repeat):
            elapsed, _ = time_call(candidates[name], clock=clock)
            seconds[name].append(elapsed / steps)
        if on_repeat is not None:
            on_repeat(repeat, seconds)
    return seconds


def median_time(
    fn: Callable, *args, repeats: int, warmup: int = 2, clock: Clock = time.perf_counter
) -> tuple[float, list[float]]:
    """The median seconds of ``fn(*args)`` over ``repeats`` calls, and every call's seconds,
    after ``warmup`` untimed calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = [time_call(fn, *args, clock=clock)[0] for _ in range(repeats)]
    return statistics.median(times), times


def summarize(seconds: Sequence[float], reference: Sequence[float] | None = None) -> dict:
    """Minimum, median and maximum of one candidate's ``seconds`` (its value in each repeat),
    and, against a ``reference`` timed in the same repeats, the median of the per-repeat
    ratios and the ratio of the minima.

    Example:
      >>> summary = summarize([4.0, 1.0, 3.0], reference=[2.0, 2.0, 1.0])
      >>> summary["min"], summary["median"], summary["max"], summary["median_of_ratios"]
      (1.0, 3.0, 4.0, 2.0)
    """
    seconds = [float(s) for s in seconds]
    if not seconds:
        raise ValueError("summarize needs at least one time")
    summary = {
        "min": min(seconds),
        "median": statistics.median(seconds),
        "max": max(seconds),
        "all": seconds,
    }
    if reference is not None:
        if len(reference) != len(seconds):
            raise ValueError(
                f"the reference has {len(reference)} repeats, the candidate {len(seconds)}"
            )
        summary["median_of_ratios"] = statistics.median(s / r for s, r in zip(seconds, reference))
        summary["ratio_of_minima"] = min(seconds) / min(reference)
    return summary


def machine() -> dict:
    """Where and when a benchmark ran: date (UTC), command, OS, processor, CPU count, JAX's
    backend, device and version."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, report: dict) -> str:
    """Write ``report`` as indented JSON to ``path`` (folders created, the file replaced
    atomically); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_json_atomically(path, report)
    return path
