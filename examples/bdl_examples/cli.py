"""Command-line pieces the training programs share: which flags were given, resuming a run
with its saved arguments, and checking flags against their accepted ranges."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

# Accepted ranges: (what the error message says, the test).
POSITIVE = ("> 0", lambda v: v > 0)
AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
UNIT_INTERVAL_OPEN = ("in [0, 1)", lambda v: 0 <= v < 1)
Range = tuple[str, Callable[[object], bool]]


def check_ranges(args: argparse.Namespace, ranges: dict[str, Range], error=ValueError) -> None:
    """Raises ``error`` naming the first flag (by destination, in ``ranges``' order) whose
    value lies outside its range; a flag left at None (a default chosen later) passes.

    Example:
      >>> args = argparse.Namespace(lr=-1.0, steps=None)
      >>> check_ranges(args, {"steps": AT_LEAST_ONE, "lr": POSITIVE})
      Traceback (most recent call last):
      ...
      ValueError: argument --lr: must be > 0; got -1.0
    """
    for dest, (accepted, ok) in ranges.items():
        value = getattr(args, dest)
        if value is not None and not ok(value):
            flag = "--" + dest.replace("_", "-")
            raise error(f"argument {flag}: must be {accepted}; got {value}")


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags given on the command line (not defaulted).

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = parser.add_argument("--lr", type=float, default=0.1)
      >>> _ = parser.add_argument("--epochs", type=int, default=1)
      >>> sorted(explicit_flags(parser, ["--lr", "0.3"]))
      ['lr']
    """
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_true"
            elif action.nargs is not None:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def merge_saved_arguments(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv,
    saved: dict,
    may_change: Iterable[str],
    error: type[Exception] = ValueError,
) -> argparse.Namespace:
    """The ``saved`` arguments of a run, with the flags in ``may_change`` taken from the
    command line; a flag given with a value other than the saved one raises ``error``."""
    may_change = tuple(may_change)
    given = explicit_flags(parser, argv)
    conflicts = [
        f"--{name.replace('_', '-')} (saved {saved[name]!r}, given {getattr(args, name)!r})"
        for name in sorted(given - set(may_change))
        if name in saved and saved[name] != getattr(args, name)
    ]
    if conflicts:
        raise error(
            "--resume continues a run with its saved arguments; these differ: "
            + ", ".join(conflicts)
        )
    merged = argparse.Namespace(**saved)
    for name in may_change:
        if name in given or name not in saved:
            setattr(merged, name, getattr(args, name))
    return merged


def kl_weight_list(text: str) -> tuple[float, ...]:
    """An argparse type: KL weights >= 0 (the library's range; 0 drops the prior and the
    entropy) separated by commas, e.g. ``"0.1,0.01"``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be numbers >= 0 separated by commas, got {text!r}")
    return values


def seed_list(text: str) -> list[int]:
    """An argparse type: distinct seeds >= 0 separated by commas, e.g. ``"0,1,2"``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0: {text!r}")
    return seeds
