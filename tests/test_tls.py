"""Tests of the TLS contexts (switch/tls.py) over real loopback handshakes inside trio.

A tiny echo server (``trio.serve_ssl_over_tcp`` on 127.0.0.1, port 0) wraps connections with
``server_context``; each test reports what the server saw through a memory channel. Hostile
clients are built here directly on the stdlib ``ssl`` module, not with ``client_context``, so
that they can present what the switch must refuse. Refusal reasons are OpenSSL's own.

With TLS 1.3 the client finishes its handshake before the server has judged the client
certificate, so a refused client may only see the failure on its first read: every client
here handshakes, sends and reads.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from switch import pki
from switch.config import ConfigError, TlsConfig
from switch.tls import (
    TlsContextHolder,
    client_context,
    identity_allowed,
    peer_identities,
    server_context,
)

#: Upper bound on any single exchange in these tests (loopback handshakes take milliseconds).
TIMEOUT = 10.0
#: What the echo server prefixes to the bytes it received.
ECHO = b"echo:"
VERSIONS = ("1.2", "1.3")
_TLS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Seen:
    """What the server saw on one connection."""

    identities: frozenset[str] | None = None
    version: str | None = None
    error: BaseException | None = None

    @property
    def ssl_error(self) -> ssl.SSLError:
        """The OpenSSL error behind a failed handshake."""
        cause = self.error.__cause__ if self.error is not None else None
        assert isinstance(cause, ssl.SSLError), repr(self.error)
        return cause


@dataclass(frozen=True)
class Server:
    port: int
    seen: trio.MemoryReceiveChannel[Seen]

    async def next(self) -> Seen:
        with trio.fail_after(TIMEOUT):
            return await self.seen.receive()


@asynccontextmanager
async def echo_server(ctx: ssl.SSLContext | TlsContextHolder) -> AsyncIterator[Server]:
    """Serve TLS on 127.0.0.1 with ``ctx`` (or the holder's current context per connection)."""
    send, receive = trio.open_memory_channel[Seen](64)

    async def handler(tcp: trio.SocketStream) -> None:
        current = ctx.context if isinstance(ctx, TlsContextHolder) else ctx
        stream = trio.SSLStream(tcp, current, server_side=True)
        try:
            with trio.fail_after(TIMEOUT):
                await stream.do_handshake()
                ids = peer_identities(stream)
                version = stream.version()
                data = await stream.receive_some(1024)
                await stream.send_all(ECHO + data)
            send.send_nowait(Seen(identities=ids, version=version))
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            send.send_nowait(Seen(error=exc))
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, handler, 0, host="127.0.0.1", handler_nursery=nursery)
        )
        port = listeners[0].socket.getsockname()[1]
        yield Server(port=port, seen=receive)
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class Exchange:
    reply: bytes
    server_identities: frozenset[str]
    version: str | None
    cipher: tuple[str, str, int] | None
    compression: str | None
    has_ticket: bool


async def exchange(port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> Exchange:
    """Connect, handshake, send one message and read the reply."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=hostname)
    try:
        with trio.fail_after(TIMEOUT):
            await stream.do_handshake()
            await stream.send_all(b"ping")
            reply = await stream.receive_some(1024)
        session = stream.session
        return Exchange(
            reply=bytes(reply),
            server_identities=peer_identities(stream),
            version=stream.version(),
            cipher=stream.cipher(),
            compression=stream.compression(),
            has_ticket=bool(session is not None and session.has_ticket),
        )
    finally:
        await trio.aclose_forcefully(stream)


async def refused(port: int, ctx: ssl.SSLContext) -> BaseException:
    """Run an exchange that the server must refuse; return the client-side failure."""
    with pytest.raises(trio.BrokenResourceError) as err:
        await exchange(port, ctx)
    return err.value


def raw_client(
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    version: str | None = None,
) -> ssl.SSLContext:
    """A client context on the bare stdlib, able to present anything (or nothing)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = _TLS[version]
    return ctx


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiPaths:
    return pki.init_pki(tmp_path_factory.mktemp("pki"))


def tls_cfg(paths: pki.PkiPaths, min_version: Any = "1.2") -> TlsConfig:
    return TlsConfig(
        ca=paths.ca, cert=paths.server_cert, key=paths.server_key, min_version=min_version
    )


def dev_client(paths: pki.PkiPaths, **kw: Any) -> ssl.SSLContext:
    return client_context(paths.ca, paths.client_cert, paths.client_key, **kw)


def write_leaf(
    dir: Path,
    name: str,
    ca: tuple[Any, Any],
    common_name: str,
    **kw: Any,
) -> tuple[Path, Path]:
    cert_pem, key_pem = pki.issue_cert(ca[0], ca[1], common_name, **kw)
    cert, key = dir / f"{name}.pem", dir / f"{name}.key"
    pki.write_pair(cert_pem, key_pem, cert, key)
    return cert, key


# ---------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("version", VERSIONS)
async def test_mutual_tls_happy_path(dev: pki.PkiPaths, version: str) -> None:
    async with echo_server(server_context(tls_cfg(dev))) as server:
        ctx = dev_client(dev, min_version=version, max_version=version)
        result = await exchange(server.port, ctx)
        seen = await server.next()
    assert result.reply == ECHO + b"ping"
    assert result.version == f"TLSv{version}"
    assert seen.version == f"TLSv{version}"
    # Server side: the client's CN and DNS SAN. Client side: the server's CN and DNS SAN,
    # without the IP SAN.
    assert seen.identities == frozenset({"acquirer-dev"})
    assert result.server_identities == frozenset({"localhost"})
    assert result.cipher is not None
    assert "GCM" in result.cipher[0] or "CHACHA20" in result.cipher[0]
    assert result.compression is None
    assert not result.has_ticket


async def test_client_verifies_server_by_ip_and_refuses_a_wrong_name(dev: pki.PkiPaths) -> None:
    async with echo_server(server_context(tls_cfg(dev))) as server:
        ok = await exchange(server.port, dev_client(dev), hostname="127.0.0.1")
        assert ok.reply == ECHO + b"ping"
        await server.next()
        with pytest.raises(trio.BrokenResourceError) as err:
            await exchange(server.port, dev_client(dev), hostname="switch.example")
    assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(err.value.__cause__.verify_message)


async def test_client_refuses_a_server_from_another_ca(dev: pki.PkiPaths, tmp_path: Path) -> None:
    rogue = pki.new_ca("rogue CA")
    cert, key = write_leaf(
        tmp_path, "rogue-server", rogue, "localhost", san_dns=("localhost",), server=True
    )
    rogue_ca = tmp_path / "rogue-ca.pem"
    rogue_ca.write_bytes(pki.cert_to_pem(rogue[0]))
    async with echo_server(server_context(TlsConfig(ca=dev.ca, cert=cert, key=key))) as server:
        with pytest.raises(trio.BrokenResourceError) as err:
            await exchange(server.port, dev_client(dev))
    assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(err.value.__cause__.verify_message)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("version", VERSIONS)
async def test_client_without_certificate_is_refused(dev: pki.PkiPaths, version: str) -> None:
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, raw_client(dev.ca, version=version))
        seen = await server.next()
    assert seen.identities is None
    assert seen.ssl_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


@pytest.mark.parametrize("version", VERSIONS)
async def test_client_from_another_ca_is_refused(
    dev: pki.PkiPaths, tmp_path: Path, version: str
) -> None:
    cert, key = write_leaf(
        tmp_path, "rogue", pki.new_ca("rogue CA"), "acquirer-dev", san_dns=("acquirer-dev",)
    )
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, raw_client(dev.ca, cert, key, version=version))
        seen = await server.next()
    assert isinstance(seen.ssl_error, ssl.SSLCertVerificationError)
    assert seen.ssl_error.verify_message == "unable to get local issuer certificate"


@pytest.mark.parametrize("version", VERSIONS)
async def test_expired_client_certificate_is_refused(
    dev: pki.PkiPaths, tmp_path: Path, version: str
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = write_leaf(
        tmp_path,
        "expired",
        pki.load_ca(dev),
        "acquirer-dev",
        san_dns=("acquirer-dev",),
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, raw_client(dev.ca, cert, key, version=version))
        seen = await server.next()
    assert isinstance(seen.ssl_error, ssl.SSLCertVerificationError)
    assert seen.ssl_error.verify_message == "certificate has expired"


async def test_server_only_certificate_is_refused_as_a_client(
    dev: pki.PkiPaths,
) -> None:
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, raw_client(dev.ca, dev.server_cert, dev.server_key))
        seen = await server.next()
    assert isinstance(seen.ssl_error, ssl.SSLCertVerificationError)
    assert seen.ssl_error.verify_message == "unsuitable certificate purpose"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_client_offering_only_tls_1_1_is_refused(dev: pki.PkiPaths) -> None:
    ctx = raw_client(dev.ca, dev.client_cert, dev.client_key)
    # Security level 0 lets this OpenSSL build send a TLS 1.1 ClientHello at all, so the
    # refusal observed is the server's, not the client's own policy.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, ctx)
        seen = await server.next()
    assert seen.ssl_error.reason == "UNSUPPORTED_PROTOCOL"


async def test_tls_1_2_client_without_aead_ecdhe_suites_is_refused(dev: pki.PkiPaths) -> None:
    ctx = raw_client(dev.ca, dev.client_cert, dev.client_key, version="1.2")
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA")  # CBC only
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await refused(server.port, ctx)
        seen = await server.next()
    assert seen.ssl_error.reason == "NO_SHARED_CIPHER"


async def test_min_version_1_3_refuses_a_tls_1_2_client(dev: pki.PkiPaths) -> None:
    async with echo_server(server_context(tls_cfg(dev, "1.3"))) as server:
        await refused(server.port, dev_client(dev, max_version="1.2"))
        seen = await server.next()
        ok = await exchange(server.port, dev_client(dev))
    assert seen.ssl_error.reason == "UNSUPPORTED_PROTOCOL"
    assert ok.version == "TLSv1.3"


# ---------------------------------------------------------------------------- identities


async def test_peer_identities_cn_dns_and_uri_but_not_ip(dev: pki.PkiPaths, tmp_path: Path) -> None:
    uri = "spiffe://cardswitch/acquirer/other"
    cert, key = write_leaf(
        tmp_path,
        "other",
        pki.load_ca(dev),
        "acquirer-other",
        san_dns=("other.example",),
        san_uri=(uri,),
        san_ip=("192.0.2.7",),
    )
    cn_only, cn_only_key = write_leaf(tmp_path, "cn-only", pki.load_ca(dev), "cn-only")
    async with echo_server(server_context(tls_cfg(dev))) as server:
        await exchange(server.port, client_context(dev.ca, cert, key))
        other = await server.next()
        await exchange(server.port, client_context(dev.ca, cn_only, cn_only_key))
        bare = await server.next()
    assert other.identities == frozenset({"acquirer-other", "other.example", uri})
    assert bare.identities == frozenset({"cn-only"})
    assert other.identities is not None
    assert not identity_allowed(other.identities, ("acquirer-dev",))
    assert identity_allowed(other.identities, ("acquirer-dev", uri))
    assert identity_allowed(other.identities, ())


def test_identity_allowed_is_exact() -> None:
    ids = frozenset({"acquirer-dev"})
    assert identity_allowed(ids, ())
    assert identity_allowed(frozenset(), ())
    assert identity_allowed(ids, ("acquirer-dev",))
    assert not identity_allowed(frozenset(), ("acquirer-dev",))
    assert not identity_allowed(ids, ("ACQUIRER-DEV",))
    assert not identity_allowed(ids, ("*.dev", "acquirer"))


async def test_peer_identities_before_handshake_raises(dev: pki.PkiPaths) -> None:
    obj = server_context(tls_cfg(dev)).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    with pytest.raises(ValueError):
        peer_identities(obj)


# ---------------------------------------------------------------------------- file errors


def test_missing_ca_names_the_file(dev: pki.PkiPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as err:
        server_context(replace(tls_cfg(dev), ca=missing))
    assert str(err.value) == f"{missing}: tls.ca: file not found"


@pytest.mark.parametrize("field", ["ca", "cert", "key"])
def test_garbage_file_names_the_file(dev: pki.PkiPaths, tmp_path: Path, field: str) -> None:
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN NOTHING-----\nAAAA\n-----END NOTHING-----\n")
    changes: dict[str, Any] = {field: bad}
    with pytest.raises(ConfigError) as err:
        server_context(replace(tls_cfg(dev), **changes))
    assert str(err.value).startswith(f"{bad}: tls.{field}: ")


def test_key_of_another_certificate_is_refused(dev: pki.PkiPaths) -> None:
    with pytest.raises(ConfigError) as err:
        server_context(replace(tls_cfg(dev), key=dev.client_key))
    assert str(dev.client_key) in str(err.value)
    assert "does not match" in str(err.value)


def test_expired_server_certificate_is_refused(dev: pki.PkiPaths, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = write_leaf(
        tmp_path,
        "old-server",
        pki.load_ca(dev),
        "localhost",
        san_dns=("localhost",),
        server=True,
        client=False,
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(seconds=1),
    )
    with pytest.raises(ConfigError, match="expired") as err:
        server_context(TlsConfig(ca=dev.ca, cert=cert, key=key))
    assert str(cert) in str(err.value)


def test_client_context_errors(dev: pki.PkiPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        client_context(dev.ca, tmp_path / "none.pem", dev.client_key)
    assert str(tmp_path / "none.pem") in str(err.value)
    with pytest.raises(ValueError, match=r"'1\.1'"):
        client_context(dev.ca, dev.client_cert, dev.client_key, min_version="1.1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- reload


async def test_reload_keeps_the_old_context_when_the_new_files_are_bad(
    dev: pki.PkiPaths, tmp_path: Path
) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(dev.server_key.read_bytes())
    holder = TlsContextHolder(replace(tls_cfg(dev), key=key))
    first = holder.context
    key.write_text("not a key\n")
    outcome = holder.reload()
    assert not outcome.reloaded
    assert not outcome
    assert outcome.generation == 1
    assert str(key) in outcome.error
    assert holder.context is first
    async with echo_server(holder) as server:
        result = await exchange(server.port, dev_client(dev))
        await server.next()
    assert result.reply == ECHO + b"ping"


async def test_reload_switches_to_a_new_ca_and_server_certificate(
    dev: pki.PkiPaths, tmp_path: Path
) -> None:
    holder = TlsContextHolder(tls_cfg(dev))
    new = pki.init_pki(tmp_path / "rotated")
    async with echo_server(holder) as server:
        before = await exchange(server.port, dev_client(dev))
        await server.next()

        outcome = holder.reload(tls_cfg(new))
        assert outcome and outcome.reloaded and outcome.generation == 2 and outcome.error == ""
        assert holder.get() is holder.context
        assert holder.cfg == tls_cfg(new)

        after = await exchange(server.port, dev_client(new))
        await server.next()
        # The old client trusts the old CA only: it refuses the rotated server certificate.
        with pytest.raises(trio.BrokenResourceError) as err:
            await exchange(server.port, dev_client(dev))
        seen = await server.next()
    assert before.reply == after.reply == ECHO + b"ping"
    assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)
    assert seen.error is not None
