"""Shared test helpers for the server: a dev PKI, a running server on port 0, clients.

What lives here: pytest fixtures and async context managers that start ``switch.server.Server``
on 127.0.0.1 with a temporary PKI, and build client TLS contexts (including bad ones).
What does not: assertions (the test modules), switch processes and configuration files
(``switch.testing``).
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from switch.config import Config, ListenerConfig, ServerConfig, TlsConfig
from switch.handler import Dispatcher, RequestHandler, UnavailableEngine
from switch.pki import PkiPaths, init_pki, issue_cert, load_ca, new_ca, write_pair
from switch.server import Server
from switch.tls import client_context, server_context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A dev PKI (CA, server and client certificates) shared by the session."""
    return init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def client_ctx(pki: PkiPaths) -> ssl.SSLContext:
    return client_context(pki.ca, pki.client_cert, pki.client_key)


def make_config(pki: PkiPaths, **listener: object) -> Config:
    """A configuration with one listener on an ephemeral loopback port."""
    lst = replace(ListenerConfig(port=0), **listener)  # type: ignore[arg-type]
    return Config(
        listeners=(lst,),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        server=ServerConfig(max_in_flight=1024, drain_timeout=5.0),
    )


@asynccontextmanager
async def running_server(
    cfg: Config, handler: RequestHandler | None = None
) -> AsyncIterator[tuple[Server, int]]:
    """Run a server for the duration of the block; yields it and its port."""
    server = Server(cfg, handler or Dispatcher(UnavailableEngine()), server_context(cfg.tls))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve)
        try:
            yield server, bound[0][2]
        finally:
            server.shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + 5


def foreign_client_ctx(pki: PkiPaths, tmp: Path) -> ssl.SSLContext:
    """A client whose certificate comes from another CA (it trusts the switch's CA)."""
    ca_cert, ca_key = new_ca("Some Other CA")
    cert, key = issue_cert(ca_cert, ca_key, "intruder", san_dns=("intruder",))
    write_pair(cert, key, tmp / "other.pem", tmp / "other.key")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(tmp / "other.pem", tmp / "other.key")
    return ctx


def expired_client_ctx(pki: PkiPaths, tmp: Path) -> ssl.SSLContext:
    """A client certificate from the right CA whose validity ended yesterday."""
    ca_cert, ca_key = load_ca(pki)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = issue_cert(
        ca_cert,
        ca_key,
        "acquirer-expired",
        san_dns=("acquirer-expired",),
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    write_pair(cert, key, tmp / "expired.pem", tmp / "expired.key")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(tmp / "expired.pem", tmp / "expired.key")
    return ctx


def anonymous_client_ctx(pki: PkiPaths) -> ssl.SSLContext:
    """A client that trusts the switch but presents no certificate."""
    return ssl.create_default_context(cafile=str(pki.ca))


def tls11_client_ctx(pki: PkiPaths) -> ssl.SSLContext:
    """A client that offers only TLS 1.1 (security level 0 so OpenSSL sends the hello)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx
