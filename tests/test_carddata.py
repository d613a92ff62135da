"""``HsmVault``: PAN fingerprint and sealing through the HSM interface, on both backends.

Expected values come from ``hmac``/``hashlib`` and ``cryptography``'s AES-GCM run on keys the
test imported in clear, not from the vault's own code. ``KmsVault`` is tested against a moto
server in test_hsm_kms.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator

import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm.api import Hsm, KeyImport, KeyUsage
from hsm.carddata import CardVault, HsmVault, KmsVault, open_vault
from hsm.config import CardDataConfig, HsmConfig
from hsm.errors import DecryptionFailed, HsmError, InvalidInput, KeyNotFound
from hsm.pkcs11 import Pkcs11Hsm
from hsm.software import SoftwareHsm
from hsm.token import ensure_token
from switch.config import Config

#: Public test PANs (from the published CVV vectors).
PAN = "4123456789012345"
OTHER_PAN = "4999988887777000"
#: Test keys: arbitrary public values imported in clear so the test can recompute results.
HMAC_KEY = bytes(range(32))
AES_KEY = bytes(range(100, 132))
CONTEXT = {"card_id": "card-0001"}


async def _load_keys(hsm: Hsm) -> None:
    await hsm.import_key(KeyImport("pan-fingerprint", KeyUsage.HMAC, HMAC_KEY))
    await hsm.import_key(KeyImport("pan-encryption", KeyUsage.DATA, AES_KEY))


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pkcs11Hsm]:
    """A SoftHSM token of this module, created through ``hsm.token`` as the switch does.

    Closed when the module ends: SoftHSM allows one logged-in session per process.
    """
    var = tmp_path_factory.mktemp("carddata-var")
    cfg = HsmConfig(softhsm_conf=var / "softhsm" / "softhsm2.conf", timeout=5.0)
    assert ensure_token(cfg).created
    hsm = Pkcs11Hsm.open(cfg.module, cfg.token_label, cfg.user_pin, timeout=5.0)
    try:
        trio.run(_load_keys, hsm)
        yield hsm
    finally:
        trio.run(hsm.aclose)


@pytest.fixture(params=["software", "pkcs11"])
def hsm(request: pytest.FixtureRequest) -> Hsm:
    """Each backend in turn: a fresh software HSM, or this module's SoftHSM token."""
    if request.param == "pkcs11":
        token: Hsm = request.getfixturevalue("softhsm")
        return token
    software = SoftwareHsm()
    trio.run(_load_keys, software)
    return software


@pytest.fixture
def vault(hsm: Hsm) -> HsmVault:
    return HsmVault(hsm, "pan-fingerprint", "pan-encryption")


async def test_vault_satisfies_protocol(vault: HsmVault) -> None:
    assert isinstance(vault, CardVault)


async def test_fingerprint_is_hmac_sha256_of_the_pan(vault: HsmVault) -> None:
    expected = hmac.new(HMAC_KEY, PAN.encode(), hashlib.sha256).digest()
    assert await vault.fingerprint(PAN) == expected
    assert await vault.fingerprint(PAN) == expected
    assert await vault.fingerprint(OTHER_PAN) != expected


async def test_round_trip(vault: HsmVault) -> None:
    blob = await vault.seal(PAN, CONTEXT)
    assert PAN.encode() not in blob
    assert await vault.unseal(blob, CONTEXT) == PAN


async def test_blob_layout_opens_with_cryptography(vault: HsmVault) -> None:
    """The documented layout, opened with ``cryptography`` and the clear test key."""
    blob = await vault.seal(PAN, CONTEXT)
    assert blob[0] == 0x11
    label_len = blob[1]
    assert blob[2 : 2 + label_len] == b"pan-encryption"
    header = blob[: 2 + label_len]
    nonce, body = blob[2 + label_len : 14 + label_len], blob[14 + label_len :]
    aad = header + json.dumps({"card_id": "card-0001", "purpose": "pan"}).replace(" ", "").encode()
    assert AESGCM(AES_KEY).decrypt(nonce, body, aad) == PAN.encode()


@pytest.mark.parametrize(
    "context", [{"card_id": "card-0002"}, {}, {"card_id": "card-0001", "x": "y"}]
)
async def test_wrong_context_fails(vault: HsmVault, context: dict[str, str]) -> None:
    blob = await vault.seal(PAN, CONTEXT)
    with pytest.raises(DecryptionFailed) as info:
        await vault.unseal(blob, context)
    assert PAN not in str(info.value)


async def test_tampered_blob_fails(vault: HsmVault) -> None:
    blob = await vault.seal(PAN, CONTEXT)
    label_end = 2 + blob[1]
    for index in (0, label_end, label_end + 12, len(blob) - 1):
        tampered = blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]
        with pytest.raises(DecryptionFailed):
            await vault.unseal(tampered, CONTEXT)
    for cut in (0, 1, label_end, len(blob) - 1):
        with pytest.raises(DecryptionFailed):
            await vault.unseal(blob[:cut], CONTEXT)
    # A changed key label names a key that does not exist (or another key): a failure either way.
    renamed = blob[:2] + b"q" + blob[3:]
    with pytest.raises((KeyNotFound, DecryptionFailed)):
        await vault.unseal(renamed, CONTEXT)


async def test_blob_opens_after_key_rotation(hsm: Hsm, vault: HsmVault) -> None:
    """The blob names its key, so a vault configured with a newer key still opens old blobs."""
    blob = await vault.seal(PAN, CONTEXT)
    await hsm.import_key(KeyImport("pan-encryption-2", KeyUsage.DATA, bytes(32)))
    try:
        rotated = HsmVault(hsm, "pan-fingerprint", "pan-encryption-2")
        assert await rotated.unseal(blob, CONTEXT) == PAN
        assert (await rotated.seal(PAN, CONTEXT))[2 : 2 + 16] == b"pan-encryption-2"
    finally:
        await hsm.delete_key("pan-encryption-2")


async def test_bad_pan_is_refused_without_echo(vault: HsmVault) -> None:
    bad = "4123 4567 8901 2345"
    for call in (vault.fingerprint(bad), vault.seal(bad, CONTEXT)):
        with pytest.raises(InvalidInput) as info:
            await call
        assert bad not in str(info.value)
        assert "4123" not in str(info.value)


async def test_missing_key_is_an_hsm_error(hsm: Hsm) -> None:
    vault = HsmVault(hsm, "no-such-hmac", "no-such-aes")
    with pytest.raises(KeyNotFound):
        await vault.fingerprint(PAN)
    with pytest.raises(HsmError):
        await vault.seal(PAN, CONTEXT)


async def test_repr_names_keys_only(vault: HsmVault) -> None:
    assert (
        repr(vault)
        == "HsmVault(fingerprint_key='pan-fingerprint', encryption_key='pan-encryption')"
    )


async def test_open_vault_chooses_by_backend() -> None:
    hsm = SoftwareHsm()
    chosen = open_vault(Config().card_data, hsm)
    assert isinstance(chosen, HsmVault)
    kms_cfg = Config(card_data=CardDataConfig(backend="kms", kms_endpoint="http://127.0.0.1:9"))
    assert isinstance(open_vault(kms_cfg.card_data, None), KmsVault)
    with pytest.raises(ValueError, match="needs an open HSM"):
        open_vault(Config().card_data, None)
