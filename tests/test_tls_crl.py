"""Client-certificate revocation: ``[tls] crl`` over real mutual TLS, and its reload.

A client whose certificate the CA's CRL lists is refused, one it does not list is served;
after the CA revokes a certificate and the holder reloads (what SIGHUP does), new
connections with it are refused. A CRL the switch cannot trust (another CA's, expired, not
a CRL) is a one-line ``ConfigError`` naming the file, at start and on reload (which then
keeps the context in use).

TLS 1.3: a refused client often sees the failure only on its first read; ``echo_ok`` sends
and reads.
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
from cryptography import x509
from server_fixtures import make_config
from test_limits import echo_ok

from switch.config import Config, ConfigError, from_mapping
from switch.handler import Dispatcher, UnavailableEngine
from switch.pki import PkiPaths, init_pki, issue_cert, issue_crl, load_ca, new_ca, write_pair
from switch.server import Server
from switch.tls import TlsContextHolder, client_context, server_context


def serial_of(cert_pem_path: Path) -> int:
    return x509.load_pem_x509_certificate(cert_pem_path.read_bytes()).serial_number


def write_crl(pki: PkiPaths, path: Path, *revoked: int) -> Path:
    ca_cert, ca_key = load_ca(pki)
    path.write_bytes(issue_crl(ca_cert, ca_key, revoked))
    return path


def second_client(pki: PkiPaths, tmp: Path) -> tuple[ssl.SSLContext, int]:
    ca_cert, ca_key = load_ca(pki)
    cert, key = issue_cert(ca_cert, ca_key, "acquirer-two", san_dns=("acquirer-two",))
    write_pair(cert, key, tmp / "two.pem", tmp / "two.key")
    return client_context(pki.ca, tmp / "two.pem", tmp / "two.key"), serial_of(tmp / "two.pem")


def with_crl(pki: PkiPaths, crl: Path) -> Config:
    cfg = make_config(pki)
    return replace(cfg, tls=replace(cfg.tls, crl=str(crl)))


@asynccontextmanager
async def serving(cfg: Config) -> AsyncIterator[tuple[TlsContextHolder, int]]:
    holder = TlsContextHolder(cfg.tls)
    server = Server(cfg, Dispatcher(UnavailableEngine()), holder.get)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.serve))[0][2]
        try:
            yield holder, port
        finally:
            server.shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + 5


@pytest.fixture
def own_pki(tmp_path: Path) -> PkiPaths:
    """A PKI of this test alone (its CA revokes certificates)."""
    return init_pki(tmp_path / "pki")


async def test_a_revoked_client_is_refused_and_others_served(
    own_pki: PkiPaths, tmp_path: Path
) -> None:
    dev = client_context(own_pki.ca, own_pki.client_cert, own_pki.client_key)
    two, two_serial = second_client(own_pki, tmp_path)
    crl = write_crl(own_pki, tmp_path / "ca.crl", two_serial)
    async with serving(with_crl(own_pki, crl)) as (_, port):
        assert await echo_ok(port, dev)
        assert not await echo_ok(port, two)


async def test_revoking_then_reloading_refuses_new_connections(
    own_pki: PkiPaths, tmp_path: Path
) -> None:
    dev = client_context(own_pki.ca, own_pki.client_cert, own_pki.client_key)
    two, _ = second_client(own_pki, tmp_path)
    crl = write_crl(own_pki, tmp_path / "ca.crl")  # nothing revoked yet
    async with serving(with_crl(own_pki, crl)) as (holder, port):
        assert await echo_ok(port, dev) and await echo_ok(port, two)
        write_crl(own_pki, crl, serial_of(own_pki.client_cert))
        assert await echo_ok(port, dev)  # the files changed, the context not yet
        outcome = holder.reload()
        assert outcome.reloaded and outcome.generation == 2
        assert not await echo_ok(port, dev)
        assert await echo_ok(port, two)


async def test_without_crl_a_revoked_certificate_is_not_checked(
    own_pki: PkiPaths, tmp_path: Path
) -> None:
    # The control case: the same revoked certificate passes when no CRL is configured.
    dev = client_context(own_pki.ca, own_pki.client_cert, own_pki.client_key)
    write_crl(own_pki, tmp_path / "ca.crl", serial_of(own_pki.client_cert))
    async with serving(make_config(own_pki)) as (_, port):
        assert await echo_ok(port, dev)


def test_crl_of_another_ca_is_refused(own_pki: PkiPaths, tmp_path: Path) -> None:
    other_cert, other_key = new_ca("Some Other CA")
    crl = tmp_path / "other.crl"
    crl.write_bytes(issue_crl(other_cert, other_key, [1]))
    with pytest.raises(ConfigError, match=r"other\.crl: tls\.crl: CRL not signed by a CA"):
        server_context(with_crl(own_pki, crl).tls)


def test_expired_crl_is_refused(own_pki: PkiPaths, tmp_path: Path) -> None:
    ca_cert, ca_key = load_ca(own_pki)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    crl = tmp_path / "old.crl"
    crl.write_bytes(issue_crl(ca_cert, ca_key, [], next_update=past))
    with pytest.raises(ConfigError, match=r"old\.crl: tls\.crl: CRL expired at"):
        server_context(with_crl(own_pki, crl).tls)


@pytest.mark.parametrize("content", [b"", b"not a crl\n", b"-----BEGIN X509 CRL-----\nAA\n"])
def test_unreadable_crl_is_refused(own_pki: PkiPaths, tmp_path: Path, content: bytes) -> None:
    crl = tmp_path / "bad.crl"
    crl.write_bytes(content)
    with pytest.raises(ConfigError, match=r"bad\.crl: tls\.crl: not a PEM CRL file"):
        server_context(with_crl(own_pki, crl).tls)


def test_missing_crl_names_the_file(own_pki: PkiPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.crl: tls\.crl: file not found"):
        server_context(with_crl(own_pki, tmp_path / "absent.crl").tls)


def test_a_bad_crl_on_reload_keeps_the_context_in_use(own_pki: PkiPaths, tmp_path: Path) -> None:
    crl = write_crl(own_pki, tmp_path / "ca.crl")
    holder = TlsContextHolder(with_crl(own_pki, crl).tls)
    before = holder.context
    crl.write_bytes(b"garbage")
    outcome = holder.reload()
    assert not outcome.reloaded and "ca.crl: tls.crl: not a PEM CRL file" in outcome.error
    assert holder.context is before and holder.generation == 1


def test_crl_key_is_read_from_the_config_file() -> None:
    cfg = from_mapping({"tls": {"crl": "var/pki/ca.crl"}})
    assert cfg.tls.crl == "var/pki/ca.crl"
    assert from_mapping({}).tls.crl == ""
