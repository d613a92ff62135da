"""``cardswitch serve``: run the switch in the foreground (``switch.app.serve``).

What lives here: the options of the command, logging set-up, and the one-line report of a
listening address that cannot be bound (busy port, no permission). What does not: the wiring
of the running switch and its signal handling (``switch.app``).
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path
from typing import Any

from switch import app
from switch import log as log_mod
from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, runner, single_leaf
from switch.config import Config

#: Errors of bind(2) that mean "this address cannot be listened on".
_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        parents=[config_parent()],
        help="run the switch in the foreground",
        description="Serve until SIGTERM or SIGINT (drain, then exit 0); SIGHUP reloads "
        "the TLS certificates.",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the pid and bound listeners as JSON here once accepting connections",
    )
    p.add_argument(
        "--no-engine",
        action="store_true",
        help="answer every authorization with 91 (no HSM or store is opened)",
    )
    p.set_defaults(func=runner(_serve))


async def _serve(args: argparse.Namespace, cfg: Config) -> int:
    log_mod.configure(cfg.log.level, cfg.log.format)
    try:
        await app.serve(cfg, args.ready_file, not args.no_engine)
    except (OSError, BaseExceptionGroup) as exc:
        leaf = single_leaf(exc)
        if isinstance(leaf, OSError) and leaf.errno in _BIND_ERRORS:
            where = _unbindable(cfg) or "the configured listeners"
            raise CommandError(
                f"cannot listen on {where}: {leaf.strerror}", ExitStatus.UNAVAILABLE
            ) from None
        raise
    return ExitStatus.OK


def _unbindable(cfg: Config) -> str | None:
    """``host:port`` of the first configured address that cannot be bound now, if any.

    Listeners are tried first, then the metrics endpoint (already bound by this process when
    a listener failed, so only reported when no listener is at fault).
    """
    candidates = [(lst.host, lst.port) for lst in cfg.listeners if lst.port]
    if cfg.metrics.port:
        candidates.append((cfg.metrics.host, cfg.metrics.port))
    for host, port in candidates:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return f"{host}:{port}"
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError:
                    return f"{host}:{port}"
    return None
