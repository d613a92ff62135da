"""Pieces every ``cardswitch`` command module shares: the parser class and the --config option.

What lives here: ``Parser`` (an ``ArgumentParser`` whose help shows each option's default;
subcommand parsers inherit it), ``config_parent`` (the ``--config`` option as a parent
parser). What does not: running commands and exit statuses (``switch.cli.runner``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written; appends ``(default: X)`` to option help
    when the option has a meaningful default (not None, empty or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """The ``cardswitch`` parser; ``add_subparsers`` makes more of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def config_parent() -> argparse.ArgumentParser:
    """A parent parser with ``--config PATH``, the switch configuration a command reads."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="switch configuration (TOML); default: config/switch.toml if present, "
        "else the built-in defaults",
    )
    return parent
