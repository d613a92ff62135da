"""The ``cardswitch`` command line: one entry point over the command modules of ``switch.cli``.

What lives here: the top-level parser (``--version`` and the command groups), ``main(argv)``
and ``entry()`` (the ``cardswitch`` script). What does not: the commands (``switch.cli.*``,
one module per group), running them and their exit statuses (``switch.cli.runner``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import metadata

from switch.cli import bench, db, devsetup, events, holds, hsm, operate, pki, provision, send, serve
from switch.cli.common import Parser
from switch.cli.runner import handle, stdout_closed

#: Command modules in the order ``cardswitch --help`` lists them; each has ``register(sub)``
#: and sets ``func(args) -> int`` on the parsers it adds.
COMMAND_MODULES = (serve, send, pki, hsm, provision, holds, operate, events, db, devsetup, bench)


def version() -> str:
    """The installed distribution's version, or ``unknown`` when run from a bare checkout."""
    try:
        return metadata.version("cardswitch")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> Parser:
    parser = Parser(prog="cardswitch", description="ISO 8583 issuer authorization switch")
    parser.add_argument("--version", action="version", version=f"cardswitch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    Usage errors exit through argparse (``SystemExit(2)``, like ``ExitStatus.USAGE``).
    """
    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt as exc:
        return handle(exc)
    return status


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
