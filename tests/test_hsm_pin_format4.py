"""ISO 9564-1 format 4 (AES) PIN blocks verified by both backends (software and SoftHSM2 over
PKCS#11), against published values and psec, an independent implementation.

The published format 4 blocks (psec's vectors, PIN 1234) are checked against the published
IBM 3624 offset of PIN 1234 (its validation data is given explicitly, so it does not depend
on the PAN); blocks psec builds for the published PVV vectors are checked against those PVVs;
blocks the backends and ``switch.acquirer`` build are deciphered by psec.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from psec import pinblock as psec_pinblock

from hsm.algorithms import pinblock
from hsm.api import (
    Hsm,
    Ibm3624Reference,
    KeyImport,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvReference,
    VerifyReason,
)
from hsm.errors import InvalidInput, KeyUsageError
from hsm.software import SoftKey, SoftwareCipher, SoftwareHsm
from switch.acquirer import encipher_pin

pytest.register_assert_rewrite("hsm_fixtures")
from hsm_fixtures import TEST_KEYS, ZPK_1, ZPK_AES, load_vectors  # noqa: E402

pytest_plugins = ["hsm_fixtures"]

ISO_4 = PinBlockFormat.ISO_4
PINBLOCK = {v["name"]: v for v in load_vectors("pinblock")}
DECIPHER = PINBLOCK["ISO4 psec decipher"]
DETERMINISTIC = PINBLOCK["ISO4 psec deterministic (random=FF..)"]
#: The published format 4 blocks: (name, block, PAN, PIN).
PUBLISHED_BLOCKS = [
    (
        DECIPHER["name"],
        DECIPHER["inputs"]["block"],
        DECIPHER["inputs"]["pan"],
        DECIPHER["expected"],
    ),
    (
        DETERMINISTIC["name"],
        DETERMINISTIC["expected"],
        DETERMINISTIC["inputs"]["pan"],
        DETERMINISTIC["inputs"]["pin"],
    ),
]
PVV = load_vectors("pvv")
IBM = {v["name"]: v for v in load_vectors("ibm3624")}
#: Published IBM 3624 offset of PIN 1234, and the published PIN of another offset (4524).
IBM_1234 = IBM["offset for PIN 1234 valdata 1122334455667788"]
IBM_4524 = IBM["PIN from offset 0000 valdata 1122334455667788"]
#: PANs of every length a format 4 PAN field encodes (its length indicator is len - 12).
PANS_BY_LENGTH = ["4123456789012345678"[:n] for n in range(12, 20)]


def _ibm(vector: dict[str, Any], offset: str) -> Ibm3624Reference:
    i = vector["inputs"]
    return Ibm3624Reference("pvk", offset, i["dectab"], i["validation_data"])


def _tdes(key: bytes, data: bytes) -> bytes:
    op = Cipher(TripleDES(key + key[:8]), modes.ECB()).encryptor()  # noqa: S305 - PIN block
    return op.update(data) + op.finalize()


def test_vector_file_has_both_format4_vectors_under_the_fixture_key() -> None:
    assert bytes.fromhex(DECIPHER["inputs"]["key"]) == ZPK_AES
    assert bytes.fromhex(DETERMINISTIC["inputs"]["key"]) == ZPK_AES
    assert IBM_1234["expected"] != IBM_4524["inputs"]["offset"]


@pytest.mark.parametrize(
    ("block", "pan", "pin"), [b[1:] for b in PUBLISHED_BLOCKS], ids=[b[0] for b in PUBLISHED_BLOCKS]
)
async def test_published_format4_block_verifies_against_the_published_ibm_offset(
    backend: Hsm, block: str, pan: str, pin: str
) -> None:
    assert pin == IBM_1234["inputs"]["pin"]
    req = PinVerification(
        "zpk-aes", bytes.fromhex(block), ISO_4, pan, _ibm(IBM_1234, IBM_1234["expected"])
    )
    assert (await backend.verify_pin(req)).ok


@pytest.mark.parametrize(
    ("block", "pan", "pin"), [b[1:] for b in PUBLISHED_BLOCKS], ids=[b[0] for b in PUBLISHED_BLOCKS]
)
async def test_published_format4_block_fails_against_the_offset_of_another_pin(
    backend: Hsm, block: str, pan: str, pin: str
) -> None:
    assert pin != IBM_4524["expected"]
    req = PinVerification(
        "zpk-aes", bytes.fromhex(block), ISO_4, pan, _ibm(IBM_4524, IBM_4524["inputs"]["offset"])
    )
    result = await backend.verify_pin(req)
    assert (result.ok, result.reason) == (False, VerifyReason.MISMATCH)


@pytest.mark.parametrize("vector", PVV, ids=[v["name"] for v in PVV])
async def test_psec_format4_block_verifies_against_the_published_pvv(
    backend: Hsm, vector: dict[str, Any]
) -> None:
    i = vector["inputs"]
    ref = PvvReference("pvk", i["pvki"], vector["expected"])
    block = psec_pinblock.encipher_pinblock_iso_4(ZPK_AES, i["pin"], i["pan"])
    assert (await backend.verify_pin(PinVerification("zpk-aes", block, ISO_4, i["pan"], ref))).ok
    wrong_pin = "0000" if i["pin"] != "0000" else "1111"
    wrong = psec_pinblock.encipher_pinblock_iso_4(ZPK_AES, wrong_pin, i["pan"])
    result = await backend.verify_pin(PinVerification("zpk-aes", wrong, ISO_4, i["pan"], ref))
    assert (result.ok, result.reason) == (False, VerifyReason.MISMATCH)


@pytest.mark.parametrize("pan", PANS_BY_LENGTH, ids=[f"pan{len(p)}" for p in PANS_BY_LENGTH])
async def test_format4_blocks_cross_psec_both_ways_for_every_pan_length(
    backend: Hsm, pan: str
) -> None:
    """A psec block verifies in the backend; the backend's block (psec's, translated with
    new random fill) and ``switch.acquirer``'s decipher in psec."""
    pin = IBM_1234["inputs"]["pin"]
    ref = _ibm(IBM_1234, IBM_1234["expected"])
    theirs = psec_pinblock.encipher_pinblock_iso_4(ZPK_AES, pin, pan)
    assert (await backend.verify_pin(PinVerification("zpk-aes", theirs, ISO_4, pan, ref))).ok
    ours = await backend.translate_pin(
        PinTranslation("zpk-aes", ISO_4, theirs, "zpk-aes", ISO_4, pan)
    )
    assert len(ours) == 16 and ours != theirs  # new random fill
    assert psec_pinblock.decipher_pinblock_iso_4(ZPK_AES, ours, pan) == pin
    sent = encipher_pin(pin, pan, ZPK_AES.hex(), fmt=ISO_4)
    assert psec_pinblock.decipher_pinblock_iso_4(ZPK_AES, sent, pan) == pin
    assert (await backend.verify_pin(PinVerification("zpk-aes", sent, ISO_4, pan, ref))).ok


def _ff(n: int) -> bytes:
    return b"\xff" * n


def test_format4_encipher_with_the_published_random_fill_gives_the_published_block() -> None:
    i = DETERMINISTIC["inputs"]
    assert bytes.fromhex(i["random"]) == _ff(8)
    digits = pinblock.pin_from_str(i["pin"])
    block = pinblock.encrypt(
        SoftwareCipher(), SoftKey(ZPK_AES, aes=True), ISO_4, digits, i["pan"], rng=_ff
    )
    assert block.hex().upper() == DETERMINISTIC["expected"]


async def test_software_backend_translates_to_the_published_deterministic_block() -> None:
    hsm = SoftwareHsm(rng=_ff)
    for label in ("zpk-1", "zpk-aes"):
        usage, value, algorithm = TEST_KEYS[label]
        await hsm.import_key(KeyImport(label, usage, value, algorithm))
    i = DETERMINISTIC["inputs"]
    iso0 = _tdes(ZPK_1, psec_pinblock.encode_pinblock_iso_0(i["pin"], i["pan"]))
    out = await hsm.translate_pin(
        PinTranslation("zpk-1", PinBlockFormat.ISO_0, iso0, "zpk-aes", ISO_4, i["pan"])
    )
    assert out.hex().upper() == DETERMINISTIC["expected"]


async def test_format4_block_bound_to_another_pan_is_an_invalid_pin_block(backend: Hsm) -> None:
    """The PAN enters format 4 between the two AES passes: with another PAN the PIN field
    does not decipher to a format 4 field, which is a PIN cryptographic failure."""
    block = bytes.fromhex(DECIPHER["inputs"]["block"])
    other_pan = DECIPHER["inputs"]["pan"][:-1] + "7"
    ref = _ibm(IBM_1234, IBM_1234["expected"])
    result = await backend.verify_pin(PinVerification("zpk-aes", block, ISO_4, other_pan, ref))
    assert (result.ok, result.reason) == (False, VerifyReason.PIN_BLOCK_INVALID)


async def test_format4_needs_an_aes_zone_pin_key(backend: Hsm) -> None:
    block = bytes.fromhex(DECIPHER["inputs"]["block"])
    ref = _ibm(IBM_1234, IBM_1234["expected"])
    with pytest.raises(KeyUsageError):
        await backend.verify_pin(
            PinVerification("zpk-1", block, ISO_4, DECIPHER["inputs"]["pan"], ref)
        )


async def test_format4_refuses_a_tdes_sized_block(backend: Hsm) -> None:
    block = bytes.fromhex(DECIPHER["inputs"]["block"])[:8]
    ref = _ibm(IBM_1234, IBM_1234["expected"])
    with pytest.raises(InvalidInput) as info:
        await backend.verify_pin(
            PinVerification("zpk-aes", block, ISO_4, DECIPHER["inputs"]["pan"], ref)
        )
    assert info.value.field == "pin_block"
