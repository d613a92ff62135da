"""The ``cardswitch`` command line: one entry point, subcommands registered by their modules.

What lives here: argument parsing glue and the mapping of errors to exit statuses (0 success,
1 operation failed, 2 usage or configuration error). What does not: the commands themselves,
each of which lives beside the code it drives and exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from switch.config import ConfigError

#: Modules that contribute subcommands, each exposing ``register(subparsers) -> None`` and
#: setting ``func(args) -> int`` on the parsers it adds.
COMMAND_MODULES = (
    "switch.app",  # serve
    "switch.send",  # send
    "switch.pki",  # pki init
    "switch.cli.hsm",  # hsm ..., keys ...
    "switch.provision",  # cards ..., accounts ...
    "switch.devsetup",  # dev-setup
)

#: Exit status for usage and configuration errors (argparse uses the same).
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cardswitch", description="ISO 8583 issuer authorization switch"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"cardswitch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
