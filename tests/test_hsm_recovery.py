"""A real SoftHSM token that goes away and comes back: the PKCS#11 backend recovers by itself.

The token lives in a temporary directory of this module (its own SoftHSM configuration, as
``hsm_fixtures`` makes them); "removed" is its token directory moved aside, "restored" is it
moved back, which is what SoftHSM sees when the volume holding the token disappears. Commands
run on session copies of the keys, which outlive the token directory, so the loss is seen at
the next read of the token objects, at most ``KEY_RECHECK`` after it (the readiness probe's
key check reads the token at once). From then on, while it is away, every command fails with
``HsmUnavailable`` (never ``KeyNotFound``, never an empty key list) and fails at once, without
waiting for the token; once it is back the backend reopens its session and logs in again,
and the same key gives the same answer.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from hsm import pkcs11 as backend_module
from hsm.api import Fingerprint, KeyImport, KeyUsage
from hsm.config import HsmConfig
from hsm.errors import HsmTimeout, HsmUnavailable, KeyNotFound
from hsm.pkcs11 import RECONNECT_INITIAL, RECONNECT_MAX, Pkcs11Hsm, reconnect_delay
from hsm.token import ensure_token, open_hsm, session_status

pytest.register_assert_rewrite("hsm_fixtures")
from hsm_fixtures import until_ok, until_unavailable  # noqa: E402

#: An HMAC key of our own (the values do not matter: the test compares the token with itself).
HMAC_VALUE = bytes(range(100, 132))
DATA = b"4000002000000001"


@pytest.fixture(scope="module")
def token_cfg(tmp_path_factory: pytest.TempPathFactory) -> HsmConfig:
    var = tmp_path_factory.mktemp("var-recovery")
    cfg = HsmConfig(softhsm_conf=var / "softhsm" / "softhsm2.conf", timeout=5.0)
    assert ensure_token(cfg).created
    return cfg


@pytest.fixture(params=[False, True], ids=["inline", "offload"])
async def token_hsm(
    token_cfg: HsmConfig, request: pytest.FixtureRequest
) -> AsyncIterator[Pkcs11Hsm]:
    hsm = Pkcs11Hsm.open(
        token_cfg.module,
        token_cfg.token_label,
        token_cfg.user_pin,
        timeout=5.0,
        offload=request.param,
    )
    try:
        if "fp" not in {k.label for k in await hsm.list_keys()}:
            await hsm.import_key(KeyImport("fp", KeyUsage.HMAC, HMAC_VALUE))
        yield hsm
    finally:
        await hsm.aclose()


@contextmanager
def token_away(cfg: HsmConfig) -> Iterator[None]:
    """The token directory moved aside for the duration of the block."""
    tokens = cfg.softhsm_conf.parent / "tokens"
    away = tokens.with_name("tokens.away")
    shutil.move(tokens, away)
    try:
        yield
    finally:
        shutil.move(away, tokens)


def test_backoff_doubles_from_half_a_second_up_to_ten() -> None:
    delays = [reconnect_delay(None)]
    for _ in range(7):
        delays.append(reconnect_delay(delays[-1]))
    assert (RECONNECT_INITIAL, RECONNECT_MAX) == (0.5, 10.0)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


async def test_token_removed_then_restored_recovers_without_reopening(
    token_cfg: HsmConfig, token_hsm: Pkcs11Hsm
) -> None:
    def fingerprint() -> Awaitable[bytes]:
        return token_hsm.fingerprint(Fingerprint("fp", DATA))

    before = await fingerprint()
    status = session_status(token_hsm)
    assert status is not None and status.up
    reconnects = status.reconnects
    with token_away(token_cfg):
        await until_unavailable(fingerprint)
        lost = token_hsm.session_status
        assert not lost.up and lost.error
        # Down: fails at once, without the token and without its lock (held here: a command
        # that waited for it would end in HsmTimeout, or hang inline).
        with backend_module._PROCESS_LOCK:
            for _ in range(3):
                with pytest.raises(HsmUnavailable) as raised:
                    await fingerprint()
                assert not isinstance(raised.value, HsmTimeout)
        # A key never seen and the key list: unavailable too, not "no such key" or "no keys".
        await trio.sleep(RECONNECT_INITIAL * 3)  # let attempts run and fail on the absent token
        with pytest.raises(HsmUnavailable):
            await token_hsm.key_check_value("never-created")
        with pytest.raises(HsmUnavailable):
            await token_hsm.list_keys()
        assert not token_hsm.session_status.up
    after, failed_polls = await until_ok(fingerprint)
    assert after == before
    back = token_hsm.session_status
    assert back.up and back.reconnects == reconnects + 1
    assert {k.label for k in await token_hsm.list_keys()} >= {"fp"}
    with pytest.raises(KeyNotFound):  # the token is back: a missing key is missing again
        await token_hsm.key_check_value("never-created")
    assert failed_polls >= 0


async def test_a_lost_session_seen_by_the_key_check_of_the_readiness_probe(
    token_cfg: HsmConfig, token_hsm: Pkcs11Hsm
) -> None:
    """The check value is read from the token, so a probe alone notices the loss and drives
    the reconnect: no authorization traffic is needed for readiness to come back."""
    kcv = await token_hsm.key_check_value("fp")
    with token_away(token_cfg):
        with pytest.raises(HsmUnavailable):
            await token_hsm.key_check_value("fp")
    again, _ = await until_ok(lambda: _kcv(token_hsm))
    assert again == kcv.encode()


async def _kcv(hsm: Pkcs11Hsm) -> bytes:
    return (await hsm.key_check_value("fp")).encode()


async def test_open_hsm_creates_nothing_and_names_the_key(tmp_path: Path) -> None:
    from hsm.errors import HsmConfigError

    conf = tmp_path / "softhsm" / "softhsm2.conf"
    with pytest.raises(HsmConfigError) as raised:
        open_hsm(HsmConfig(softhsm_conf=conf))
    assert raised.value.key == "hsm.softhsm_conf"
    assert not (tmp_path / "softhsm").exists()
    with pytest.raises(HsmConfigError) as raised:
        open_hsm(HsmConfig(module=tmp_path / "libsofthsm2.so", softhsm_conf=conf))
    assert raised.value.key == "hsm.module" and "softhsm2" in str(raised.value)
