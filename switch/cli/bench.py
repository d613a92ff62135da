"""``cardswitch bench``: the load generator of ``benchmarks/`` against any ISO 8583 target.

What lives here: only the registration of the command. The generator (open and closed loop,
scenario mixes, HDR latencies, JSON and plots) lives in ``benchmarks.generator`` and is
imported when the parser is built; in an installation without the source tree's
``benchmarks/`` (or without the ``bench`` extra) the command is still listed and says so in
one line with exit status ``UNAVAILABLE``.

What does not: measuring anything itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from switch.cli.runner import ExitStatus

#: One line for ``cardswitch --help``.
HELP = "load generator: open/closed loop against any ISO 8583 target (source checkout)"


def register(sub: Any) -> None:
    parser = sub.add_parser("bench", help=HELP, description=HELP)
    try:
        from benchmarks import generator  # noqa: PLC0415 (a source checkout only)
    except ImportError as exc:
        missing = str(exc)

        def unavailable(args: argparse.Namespace) -> int:
            print(
                f"cardswitch bench: not available here ({missing}); run it from a source "
                "checkout with `pip install -e .[bench]`",
                file=sys.stderr,
            )
            return int(ExitStatus.UNAVAILABLE)

        parser.set_defaults(func=unavailable)
        return
    generator.add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        try:
            return generator.run_cli(args)
        except (ValueError, OSError) as exc:  # MixError is a ValueError
            print(f"cardswitch bench: {exc}", file=sys.stderr)
            return int(ExitStatus.USAGE)

    parser.set_defaults(func=run)
