"""Command-line pieces the training programs share: which flags were given, and resuming a
run with its saved arguments."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


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
