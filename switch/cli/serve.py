"""``cardswitch serve``: run the switch in the foreground (``switch.app.serve``).

What lives here: the options of the command, logging set-up, the choice between one process
(``switch.app.serve``) and a supervisor of worker processes (``--workers N`` or ``[server]
workers``, ``switch.supervisor``), the hidden options a supervisor starts each worker with,
and the one-line report of a listening address that cannot be bound (busy port, no
permission). What does not: the wiring of the running switch and its signal handling
(``switch.app``), supervising workers (``switch.supervisor``).
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path
from typing import Any

from switch import app, supervisor
from switch import log as log_mod
from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner, single_leaf
from switch.config import MAX_WORKERS, Config

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
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run N worker processes sharing the listening ports under a supervisor "
        "(default: [server] workers of the configuration, 1: one process)",
    )
    # Set by the supervisor on each worker's command line (switch.supervisor).
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-port", action="append", default=[], help=argparse.SUPPRESS)
    p.set_defaults(func=runner(_serve))


async def _serve(args: argparse.Namespace, cfg: Config) -> int:
    log_mod.configure(cfg.log.level, cfg.log.format)
    workers = cfg.server.workers if args.workers is None else args.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    try:
        if args.worker_index is not None:
            role = app.WorkerRole(
                args.worker_index,
                args.supervisor_pid or 0,
                supervisor.worker_ports(args.worker_port),
            )
            await app.serve(cfg, args.ready_file, not args.no_engine, worker=role)
        elif workers > 1:
            boss = supervisor.Supervisor(
                cfg, args.config, workers, ready_file=args.ready_file, engine=not args.no_engine
            )
            return await boss.run()
        else:
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
