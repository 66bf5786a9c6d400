"""Command-line pieces the procedures' subcommands share (distill, study, sweep)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from moe_dist.errors import ConfigError

__all__ = ["comma_ints", "IntermixedParser", "add_leaf_parser", "reject_overrides"]


def comma_ints(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: the argparse type of the procedures' list options."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options between positionals, as in
    ``distill SOURCE_RUN --config FILE key=value ...``: argparse before Python 3.13 stops
    filling positionals at the first option and rejects the overrides after it. Leaf
    parsers only (argparse's intermixed parsing does not support subparsers)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_leaf_parser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` returning an :class:`IntermixedParser` (the top-level
    subparsers of cli.py create plain parsers; this one adds no state, so it is re-classed)."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.__class__ = IntermixedParser
    return parser


def reject_overrides(overrides: Iterable[str], keys: Iterable[str], why: str) -> None:
    """Refuse overrides of keys a procedure sets itself, rather than silently ignore them."""
    owned = set(keys)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in owned:
            raise ConfigError(f"override {item!r}: {key} is set by this procedure ({why})")
