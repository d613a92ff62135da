"""Fixtures of the HSM tests: a SoftHSM2 token in a temporary directory and both backends.

What lives here: the module-scoped dev token (created through ``hsm.token``, as the switch
does), the PKCS#11 and software backends loaded with the same published test keys, the
published vectors, and the polls of a token lost and back (``until_unavailable``,
``until_ok``). Registered with ``pytest_plugins = ["hsm_fixtures"]`` (tests/ is on sys.path).

What does not: tests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio

#: The published vectors (shared/ sits beside the repository).
from data_paths import VECTORS_PATH

from hsm.api import Hsm, KeyAlgorithm, KeyImport, KeyUsage
from hsm.config import HsmConfig
from hsm.errors import HsmUnavailable
from hsm.pkcs11 import KEY_RECHECK, Pkcs11Hsm
from hsm.software import SoftwareHsm
from hsm.token import ensure_token

#: Public test key of the Visa CVV table, psec and pyemv vectors (CVK, PVK, IMK).
TEST_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
#: Two TDES zone PIN keys and the AES one of psec's format 4 vectors; an HMAC and a data key.
ZPK_1 = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZPK_2 = bytes.fromhex("FEDCBA98765432100123456789ABCDEF")
ZPK_AES = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
HMAC_KEY = bytes(range(32))
DATA_KEY = bytes(range(32, 64))

T = TypeVar("T")

#: Seconds between polls of ``until_unavailable`` and ``until_ok``, and their bound on them.
POLL = 0.05
MAX_POLLS = 600

#: label -> (usage, value, algorithm) imported into both backends.
TEST_KEYS: dict[str, tuple[KeyUsage, bytes, KeyAlgorithm | None]] = {
    "cvk": (KeyUsage.CVK, TEST_KEY, None),
    "pvk": (KeyUsage.PVK, TEST_KEY, None),
    "imk": (KeyUsage.IMK_AC, TEST_KEY, None),
    "zpk-1": (KeyUsage.ZPK, ZPK_1, None),
    "zpk-2": (KeyUsage.ZPK, ZPK_2, None),
    "zpk-aes": (KeyUsage.ZPK, ZPK_AES, KeyAlgorithm.AES_128),
    "fp": (KeyUsage.HMAC, HMAC_KEY, None),
    "pan": (KeyUsage.DATA, DATA_KEY, None),
}


def load_vectors(category: str) -> list[dict[str, Any]]:
    """The published vectors of one category."""
    doc = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return [v for v in doc["vectors"] if v["category"] == category]


async def _load_keys(hsm: Hsm) -> None:
    for label, (usage, value, algorithm) in TEST_KEYS.items():
        await hsm.import_key(KeyImport(label, usage, value, algorithm))


@pytest.fixture(scope="module")
def hsm_config(tmp_path_factory: pytest.TempPathFactory) -> HsmConfig:
    """An HSM configuration whose SoftHSM token lives in a temporary directory."""
    var = tmp_path_factory.mktemp("var")
    return HsmConfig(softhsm_conf=var / "softhsm" / "softhsm2.conf", timeout=5.0)


@pytest.fixture(scope="module")
def pkcs11_hsm(hsm_config: HsmConfig) -> Iterator[Pkcs11Hsm]:
    """The PKCS#11 backend on a fresh SoftHSM token, with ``TEST_KEYS`` imported.

    Module-scoped and closed at the end of the module: the process has one session, and other
    test modules may use a SoftHSM configuration of their own.
    """
    status = ensure_token(hsm_config)
    assert status.created
    # Offloaded, so that the suite runs both modes (the default, inline, is tested apart).
    hsm = Pkcs11Hsm.open(
        hsm_config.module, hsm_config.token_label, hsm_config.user_pin, timeout=5.0, offload=True
    )
    trio.run(_load_keys, hsm)
    yield hsm
    trio.run(hsm.aclose)


@pytest.fixture(scope="session")
def software_hsm() -> Iterator[SoftwareHsm]:
    """The software backend with ``TEST_KEYS`` imported."""
    hsm = SoftwareHsm()
    trio.run(_load_keys, hsm)
    yield hsm


@pytest.fixture(params=["software", "pkcs11"])
def backend(request: pytest.FixtureRequest) -> Hsm:
    """Each backend in turn."""
    name = request.param
    fixture = "software_hsm" if name == "software" else "pkcs11_hsm"
    hsm = request.getfixturevalue(fixture)
    assert isinstance(hsm, Hsm)
    return hsm


async def until_unavailable(call: Callable[[], Awaitable[object]]) -> int:
    """Poll ``call`` until it fails with ``HsmUnavailable``; how many polls it answered first.

    Commands run on session copies of the keys, which outlive the token objects: a loss is
    seen at the next read of the token objects, at most ``KEY_RECHECK`` seconds later, so the
    count is asserted to be at most what fits in that window.
    """
    for answered in range(MAX_POLLS):
        try:
            await call()
        except HsmUnavailable:
            assert answered <= KEY_RECHECK / POLL + 1, "answered after the recheck window"
            return answered
        await trio.sleep(POLL)
    raise AssertionError(f"the loss was not seen within {MAX_POLLS} polls")


async def until_ok(call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """Poll ``call`` until it no longer fails with ``HsmUnavailable`` (the session is back);
    its result and how many polls failed first. Any other error propagates."""
    for failures in range(MAX_POLLS):
        try:
            return await call(), failures
        except HsmUnavailable:
            await trio.sleep(POLL)
    raise AssertionError(f"the session did not come back within {MAX_POLLS} polls")
