"""The one runner of every ``cardswitch`` command, and the exit statuses they share.

What lives here: ``ExitStatus`` (the documented exit statuses), ``CommandError`` (a failure a
command reports as one line and a status), ``UsageError``, and ``runner``, which turns an
async command ``(args, cfg) -> status`` into the ``func(args) -> int`` argparse calls: it
loads the configuration with ``switch.config``, runs the command under ``trio.run`` and maps
every expected error to ONE line ``cardswitch: ...`` on stderr (scrubbed of card data) and
its status. Unexpected exceptions are bugs and keep their traceback.

What does not: parsing (``switch.__main__`` and the command modules), the operations.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from enum import IntEnum
from pathlib import Path

import trio

from hsm.errors import HsmConfigError, HsmError, HsmTimeout, HsmUnavailable, InvalidInput
from hsm.pan import scrub
from switch.config import Config, ConfigError, load_default_or_embedded
from switch.provision import ProvisionError
from switch.store import StoreError


class ExitStatus(IntEnum):
    """Exit statuses of ``cardswitch`` (README, Commands); a script may branch on them."""

    #: The command did what was asked (``send``: an answer arrived, whatever its DE39).
    OK = 0
    #: The operation ran and failed: an HSM or store error, a mismatch (``hsm arqc
    #: --verify``), rows rejected by ``cards import``, no such account.
    FAILED = 1
    #: Bad arguments or configuration; nothing was attempted (argparse exits 2 too). Also what
    #: the configuration names that does not exist (``HsmConfigError``): ``serve`` refuses to
    #: start when the PKCS#11 module (``hsm.module``: softhsm2 not installed), the SoftHSM
    #: configuration (``hsm.softhsm_conf``), the token (``hsm.token_label``) or a key it
    #: needs (each listener's ``zpk``, ``card-data`` keys) is missing.
    USAGE = 2
    #: ``send``: no answer within ``--timeout`` (connect, handshake or response).
    TIMEOUT = 3
    #: ``send``: the connection was refused or the host is unreachable (nothing listening).
    REFUSED = 4
    #: ``send``: the TLS handshake failed (certificate not trusted, protocol mismatch).
    TLS = 5
    #: ``send``: the switch closed the connection without an answer (for instance a client
    #: certificate not on the listener's allow-list).
    CLOSED = 6
    #: A resource the command needs is not available: ``serve`` cannot bind its port, the
    #: HSM cannot be opened or does not answer in time.
    UNAVAILABLE = 7
    #: Interrupted by Ctrl-C (128 + SIGINT, as shells report it).
    INTERRUPTED = 130


class CommandError(Exception):
    """A failure a command reports as one line on stderr and an exit status."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.FAILED) -> None:
        super().__init__(message)
        self.status = status


class UsageError(CommandError):
    """Bad command-line input; the message names the option, never a secret value."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitStatus.USAGE)


#: Expected errors of the library and their statuses, most specific first. ``CommandError``
#: carries its own status and is matched before these.
_EXPECTED: tuple[tuple[type[Exception], ExitStatus], ...] = (
    (ConfigError, ExitStatus.USAGE),
    (InvalidInput, ExitStatus.USAGE),
    (HsmConfigError, ExitStatus.USAGE),
    (HsmUnavailable, ExitStatus.UNAVAILABLE),
    (HsmTimeout, ExitStatus.UNAVAILABLE),
    (HsmError, ExitStatus.FAILED),
    (ProvisionError, ExitStatus.FAILED),
    (StoreError, ExitStatus.FAILED),
    # Files that cannot be read or written (permissions, missing directories, full disk).
    (OSError, ExitStatus.FAILED),
)

#: An async command: the parsed arguments and the loaded configuration -> exit status.
AsyncCommand = Callable[[argparse.Namespace, Config], Awaitable[int]]
#: What argparse calls (``set_defaults(func=...)``).
Func = Callable[[argparse.Namespace], int]


def fail(message: str, status: ExitStatus) -> ExitStatus:
    """Print ``cardswitch: message`` (scrubbed, first line only) on stderr; return ``status``."""
    line = scrub(message).strip().splitlines()[0] if message.strip() else status.name.lower()
    print(f"cardswitch: {line}", file=sys.stderr)
    return status


def runner(command: AsyncCommand) -> Func:
    """Wrap ``command`` as an argparse ``func``: config, ``trio.run``, errors -> statuses.

    The configuration comes from ``args.config`` (None: ``config/switch.toml`` if present,
    else the built-in defaults).
    """

    def func(args: argparse.Namespace) -> int:
        path: Path | None = getattr(args, "config", None)
        try:
            cfg = load_default_or_embedded(path)
            return int(trio.run(command, args, cfg))
        except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
            return handle(exc)

    return func


def handle(exc: BaseException) -> int:
    """The exit status of ``exc`` after printing its line; re-raises unexpected errors."""
    leaf = single_leaf(exc)
    if isinstance(leaf, KeyboardInterrupt):
        return ExitStatus.INTERRUPTED
    if isinstance(leaf, BrokenPipeError):
        return stdout_closed()
    if isinstance(leaf, CommandError):
        return fail(str(leaf), leaf.status)
    for kind, status in _EXPECTED:
        if isinstance(leaf, kind):
            return fail(str(leaf) or type(leaf).__name__, status)
    raise exc


def single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def stdout_closed() -> ExitStatus:
    """The reader of stdout went away (``cardswitch cards list | head``): stop quietly.

    Points stdout at /dev/null so the interpreter's final flush does not fail again, and
    returns OK: the reader had what it wanted.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return ExitStatus.OK
