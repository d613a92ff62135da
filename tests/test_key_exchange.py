"""Key exchange: a new ZPK under the zone master key, imported into the HSM and put in force.

Two levels. The HSM command (``import_wrapped_key``) on both backends: a key encrypted in
ECB under the KEK, and TR-31 blocks of version B (the published TR-31:2018 vector) and D
(built by psec, an independent implementation), with their check values computed here with
``cryptography``; and every refusal (wrong KCV, bad MAC, version A, wrong usage, a KEK that
is not one), after which nothing is left in the HSM. Then the dispatcher and the connection
over memory streams (software HSM, autojump clock): an 0800 161 puts the new key in force for
the requests read after it while a request read before keeps the old one, a refused key
leaves the old one, and sign-on/sign-off change what requests get.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import psec.tr31
import pytest
import trio
import trio.testing
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC
from hsm_fixtures import ZPK_1, ZPK_2, load_vectors

from hsm.api import (
    Hsm,
    KeyAlgorithm,
    KeyImport,
    KeyUsage,
    WrappedKeyFormat,
    WrappedKeyImport,
)
from hsm.errors import InvalidInput, KeyCheckFailed, KeyExists, KeyUsageError
from hsm.software import SoftwareHsm
from switch.acquirer import build_auth, echo
from switch.config import ListenerConfig
from switch.connection import Connection
from switch.decisions import Reason, profile
from switch.handler import Decision, Dispatcher, RequestContext
from switch.keys import ListenerSession, ListenerSessions, parse_key_data
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    NetworkRequest,
    ReversalRequest,
    ReversalResponse,
)

#: The demo zone master key: the TR-31:2018 annex example KBPK (config/demo/keys.json).
ZMK = bytes.fromhex("DD7515F2BFC17F85CE48F3CA25CB21F6")
#: psec wraps two-key TDES blocks with the TripleDES that cryptography deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
_labels = itertools.count(1)


def label(prefix: str) -> str:
    """A label no other test of the module's token uses."""
    return f"{prefix}-{next(_labels)}-{os.getpid()}"


def tdes_ecb(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    """TDES-ECB with ``cryptography`` (two-key keys as K1||K2||K1): the independent peer."""
    k = key + key[:8] if len(key) == 16 else key
    cipher = Cipher(TripleDES(k), modes.ECB())  # noqa: S305 - the scheme under test
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def tdes_kcv(key: bytes) -> str:
    return tdes_ecb(key, bytes(8))[:3].hex().upper()


def aes_kcv(key: bytes) -> str:
    mac = CMAC(algorithms.AES(key))
    mac.update(bytes(16))
    return mac.finalize()[:3].hex().upper()


async def new_kek(hsm: Hsm, value: bytes, algorithm: KeyAlgorithm | None = None) -> str:
    name = label("zmk")
    await hsm.import_key(KeyImport(name, KeyUsage.KEK, value, algorithm))
    return name


async def labels(hsm: Hsm) -> set[str]:
    return {info.label for info in await hsm.list_keys()}


# ------------------------------------------------------------------------ the HSM command


async def test_key_under_kek_in_ecb_is_imported_with_its_check_value(backend: Hsm) -> None:
    kek = await new_kek(backend, ZMK)
    wrapped = tdes_ecb(ZMK, ZPK_1).hex().upper()
    name = label("zpk")
    info = await backend.import_wrapped_key(
        WrappedKeyImport(
            name, KeyUsage.ZPK, kek, WrappedKeyFormat.ECB, wrapped, kcv=tdes_kcv(ZPK_1)
        )
    )
    assert (info.label, info.usage, info.algorithm) == (name, KeyUsage.ZPK, KeyAlgorithm.TDES_2KEY)
    assert info.kcv == tdes_kcv(ZPK_1) == await backend.key_check_value(name)


async def test_published_tr31_version_b_block_opens_under_the_kek(backend: Hsm) -> None:
    (vector,) = [v for v in load_vectors("tr31") if v["inputs"]["key_block"][0] == "B"]
    kek = await new_kek(backend, bytes.fromhex(vector["inputs"]["kbpk"]))
    expected = bytes.fromhex(vector["expected"])
    info = await backend.import_wrapped_key(
        WrappedKeyImport(
            label("zpk"), KeyUsage.ZPK, kek, WrappedKeyFormat.TR31, vector["inputs"]["key_block"]
        )
    )
    assert info.kcv == tdes_kcv(expected)
    assert info.algorithm is KeyAlgorithm.TDES_2KEY


@pytest.mark.parametrize("kek_len", [16, 24])
async def test_tr31_version_b_of_a_three_key_kek(backend: Hsm, kek_len: int) -> None:
    kbpk = os.urandom(kek_len)
    kek = await new_kek(backend, kbpk)
    block = psec.tr31.wrap(kbpk, "B0000P0TE00N0000", ZPK_2)
    info = await backend.import_wrapped_key(
        WrappedKeyImport(label("zpk"), KeyUsage.ZPK, kek, WrappedKeyFormat.TR31, block)
    )
    assert info.kcv == tdes_kcv(ZPK_2)


@pytest.mark.parametrize("kek_len", [16, 24, 32])
async def test_tr31_version_d_under_an_aes_kek_gives_an_aes_zpk(backend: Hsm, kek_len: int) -> None:
    kbpk = os.urandom(kek_len)
    aes = {16: KeyAlgorithm.AES_128, 24: KeyAlgorithm.AES_192, 32: KeyAlgorithm.AES_256}
    kek = await new_kek(backend, kbpk, aes[kek_len])
    zpk = os.urandom(16)
    block = psec.tr31.wrap(kbpk, "D0000P0AB00N0000", zpk)
    info = await backend.import_wrapped_key(
        WrappedKeyImport(
            label("zpk"), KeyUsage.ZPK, kek, WrappedKeyFormat.TR31, block, kcv=aes_kcv(zpk)
        )
    )
    assert (info.algorithm, info.kcv) == (KeyAlgorithm.AES_128, aes_kcv(zpk))


def _tampered(block: str) -> str:
    return block[:-1] + ("0" if block[-1] != "0" else "1")


async def test_refusals_leave_nothing_in_the_hsm(backend: Hsm) -> None:
    kek = await new_kek(backend, ZMK)
    ecb = tdes_ecb(ZMK, ZPK_1).hex()
    (vector_a,) = [v for v in load_vectors("tr31") if v["inputs"]["key_block"][0] == "A"]
    cases: list[tuple[WrappedKeyFormat, str, str | None, type[Exception]]] = [
        (WrappedKeyFormat.ECB, ecb, tdes_kcv(ZPK_2), KeyCheckFailed),
        (WrappedKeyFormat.ECB, ecb[:-2], None, InvalidInput),
        (WrappedKeyFormat.ECB, "XY" * 16, None, InvalidInput),
        (WrappedKeyFormat.TR31, _tampered(psec.tr31.wrap(ZMK, "B0000P0TE00N0000", ZPK_1)), None,
         InvalidInput),
        (WrappedKeyFormat.TR31, psec.tr31.wrap(ZMK, "B0000K0TE00N0000", ZPK_1), None, InvalidInput),
        (WrappedKeyFormat.TR31, psec.tr31.wrap(os.urandom(16), "B0000P0TE00N0000", ZPK_1), None,
         InvalidInput),
        (WrappedKeyFormat.TR31, vector_a["inputs"]["key_block"], None, InvalidInput),
        (WrappedKeyFormat.TR31, "not a key block", None, InvalidInput),
    ]  # fmt: skip
    before = await labels(backend)
    for fmt, wrapped, kcv, error in cases:
        with pytest.raises(error):
            await backend.import_wrapped_key(
                WrappedKeyImport(label("zpk"), KeyUsage.ZPK, kek, fmt, wrapped, kcv=kcv)
            )
    assert await labels(backend) == before


async def test_kek_must_be_a_kek_and_the_label_free(backend: Hsm) -> None:
    wrapped = tdes_ecb(ZPK_1, ZPK_2).hex()
    with pytest.raises(KeyUsageError):
        await backend.import_wrapped_key(
            WrappedKeyImport(label("zpk"), KeyUsage.ZPK, "zpk-1", WrappedKeyFormat.ECB, wrapped)
        )
    kek = await new_kek(backend, ZMK)
    with pytest.raises(KeyExists):
        await backend.import_wrapped_key(
            WrappedKeyImport("zpk-2", KeyUsage.ZPK, kek, WrappedKeyFormat.ECB, wrapped)
        )


def test_key_data_layouts() -> None:
    raw = parse_key_data("ab" * 16 + "0a1b2c", "raw")
    assert not isinstance(raw, str)
    assert (raw.format, raw.wrapped, raw.kcv) == (WrappedKeyFormat.ECB, "AB" * 16, "0A1B2C")
    block = psec.tr31.wrap(ZMK, "B0000P0TE00N0000", ZPK_1)
    for tail, kcv in (("", None), ("abc123", "ABC123")):
        parsed = parse_key_data(block + tail, "tr31")
        assert not isinstance(parsed, str)
        assert (parsed.format, parsed.wrapped, parsed.kcv) == (WrappedKeyFormat.TR31, block, kcv)
    for text, layout in [
        (None, "raw"),
        ("ab" * 15 + "0a1b2c", "raw"),
        ("zz" * 16 + "0a1b2c", "raw"),
        (block + "12", "tr31"),
        ("B9999P0TE00N0000", "tr31"),
        ("B", "tr31"),
    ]:
        assert isinstance(parse_key_data(text, layout), str)
    assert "AB" * 16 not in repr(raw)  # the key under the ZMK is never shown


# ------------------------------------------------------------------------ over a connection

PAN = "4123456789012345"
LISTENER = ListenerConfig(name="test", network="iso", zpk="zpk-1", zmk="zmk", frame_timeout=2)


@dataclass
class KeyEngine:
    """Records the ZPK each request's context carries; answers after ``delay`` seconds."""

    delay: float = 0.0
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        self.seen.append((request.stan, context.zpk))
        await trio.sleep(self.delay)
        code = context.profile.code(Reason.APPROVED)
        return Decision(AuthResponse.answer(request, code), Reason.APPROVED)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        self.seen.append((request.stan, context.zpk))
        code = context.profile.code(Reason.REVERSAL_UNMATCHED)
        return Decision(ReversalResponse.answer(request, code), Reason.REVERSAL_UNMATCHED)


@dataclass
class Link:
    stream: trio.abc.Stream
    session: ListenerSession
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    got: list[dict[str, str]] = field(default_factory=list)

    async def send(self, message: AuthRequest | NetworkRequest) -> None:
        await self.stream.send_all(encode_frame(codec.encode(message)))

    async def answer(self, stan: str) -> dict[str, str]:
        while not any(f["11"] == stan for f in self.got):
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            self.got += [codec.decode_fields(f) for f in self.decoder.feed(bytes(data))]
        return next(f for f in self.got if f["11"] == stan)


@asynccontextmanager
async def link(engine: KeyEngine, listener: ListenerConfig = LISTENER) -> AsyncIterator[Link]:
    hsm = SoftwareHsm()
    await hsm.import_key(KeyImport("zpk-1", KeyUsage.ZPK, ZPK_1))
    await hsm.import_key(KeyImport("zmk", KeyUsage.KEK, ZMK))
    session = ListenerSessions([listener])[listener.name]
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(ours, Dispatcher(engine, keys=hsm), listener, profile(listener.network),
                      linger=5.0, session=session)  # fmt: skip
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            yield Link(theirs, session)
            await theirs.aclose()


def key_change(stan: str, key: bytes, kcv: str, code: str = "161") -> NetworkRequest:
    data = tdes_ecb(ZMK, key).hex().upper() + kcv
    return replace(echo(stan, code), key_data=data)


def auth(stan: str) -> AuthRequest:
    return build_auth(PAN, 100, stan=stan)


async def test_new_key_applies_to_requests_read_after_it_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = KeyEngine(delay=3.0)
    async with link(engine) as net:
        await net.send(auth("000001"))  # in flight during the key change
        await trio.sleep(0.5)
        await net.send(key_change("000002", ZPK_2, tdes_kcv(ZPK_2)))
        answer = await net.answer("000002")
        assert (answer["0"], answer["39"], answer["70"]) == ("0810", "00", "161")
        assert net.session.zpk == "zpk-1@1"
        await net.send(auth("000003"))
        await net.answer("000003")
        assert (await net.answer("000001"))["39"] == "00"
    assert dict(engine.seen) == {"000001": "zpk-1", "000003": "zpk-1@1"}


async def test_wrong_check_value_is_refused_and_the_old_key_stays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = KeyEngine()
    async with link(engine) as net:
        await net.send(key_change("000001", ZPK_2, tdes_kcv(ZPK_1), code="101"))
        answer = await net.answer("000001")
        await net.send(auth("000002"))
        await net.answer("000002")
        # A good key after the refusal takes the next generation.
        await net.send(key_change("000003", ZPK_2, tdes_kcv(ZPK_2), code="101"))
        good = await net.answer("000003")
    assert answer["39"] == profile("iso").code(Reason.KEY_EXCHANGE_FAILED) == "63"
    assert good["39"] == "00"
    assert engine.seen == [("000002", "zpk-1")]


async def test_key_exchange_without_a_zmk_is_an_invalid_transaction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with link(KeyEngine(), replace(LISTENER, zmk="")) as net:
        await net.send(key_change("000001", ZPK_2, tdes_kcv(ZPK_2)))
        answer = await net.answer("000001")
        assert net.session.zpk == "zpk-1"
    assert answer["39"] == profile("iso").code(Reason.INVALID_TRANSACTION)


@pytest.mark.parametrize("policy", ["decide", "decline"])
async def test_sign_off_then_sign_on(autojump_clock: trio.testing.MockClock, policy: str) -> None:
    engine = KeyEngine()
    lst = replace(LISTENER, after_sign_off=policy)  # type: ignore[arg-type]
    async with link(engine, lst) as net:
        await net.send(echo("000001", "002"))
        assert (await net.answer("000001"))["39"] == "00"
        assert not net.session.signed_on
        await net.send(auth("000002"))
        after_off = (await net.answer("000002"))["39"]
        await net.send(echo("000003", "301"))  # echo is always served
        assert (await net.answer("000003"))["39"] == "00"
        await net.send(echo("000004", "001"))
        assert (await net.answer("000004"))["39"] == "00"
        assert net.session.signed_on
        await net.send(auth("000005"))
        assert (await net.answer("000005"))["39"] == "00"
    if policy == "decline":
        assert after_off == profile("iso").code(Reason.SIGNED_OFF) == "91"
        assert [stan for stan, _ in engine.seen] == ["000005"]
    else:
        assert after_off == "00"
        assert [stan for stan, _ in engine.seen] == ["000002", "000005"]


async def test_restore_puts_the_newest_generation_in_force() -> None:
    hsm = SoftwareHsm()
    for name in ("zpk-1", "zpk-1@1", "zpk-1@3", "zpk-1@x", "zpk-10@7"):
        await hsm.import_key(KeyImport(name, KeyUsage.ZPK, ZPK_1))
    await hsm.import_key(KeyImport("zpk-1@9", KeyUsage.KEK, ZMK))  # not a ZPK
    sessions = ListenerSessions([LISTENER, replace(LISTENER, name="other", zpk="zpk-2")])
    await sessions.restore(hsm)
    assert (sessions["test"].zpk, sessions["test"].generation) == ("zpk-1@3", 3)
    assert sessions["other"].zpk == "zpk-2"
