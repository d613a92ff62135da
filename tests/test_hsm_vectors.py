"""Every published vector of categories cvv, pvv, ibm3624, pinblock and emv, through both
the software and the PKCS#11 backend.

Encrypted PIN blocks the backends are fed are built from the *published* clear blocks (or
from psec, an independent implementation) with ``cryptography``; the EMV context (keys, PAN,
PSN, ATC) the vector file leaves out is that of the cited source, pyemv tests/test_cvn_hsm.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from psec import pinblock as psec_pinblock

from hsm.api import (
    ArpcGeneration,
    ArpcRequest,
    ArqcGeneration,
    ArqcVerification,
    Cvn,
    CvvGeneration,
    CvvVerification,
    EmvCard,
    EmvKeyCheck,
    Hsm,
    Ibm3624Reference,
    IbmOffsetGeneration,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvGeneration,
    PvvReference,
)

pytest.register_assert_rewrite("hsm_fixtures")
from hsm_fixtures import TEST_KEY, ZPK_1, ZPK_2, ZPK_AES, load_vectors  # noqa: E402

pytest_plugins = ["hsm_fixtures"]

#: EMV context of the cited source (pyemv tests/test_cvn_hsm.py).
EMV_PAN = "1234567890123456"
EMV_PSN = "00"
EMV_ATC = bytes.fromhex("001C")
#: PAN used with the IBM 3624 vectors, whose validation data is given explicitly.
IBM_PAN = "1122334455667788"


def _tdes(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(TripleDES(key + key[:8]), modes.ECB())  # noqa: S305 - PIN block cipher
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def _aes_decrypt(key: bytes, data: bytes) -> bytes:
    op = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305
    return op.update(data) + op.finalize()


def _by_name(category: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in load_vectors(category)}


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


CVV = load_vectors("cvv")
PVV = load_vectors("pvv")
IBM = load_vectors("ibm3624")
IBM_OFFSETS = [v for v in IBM if "pin" in v["inputs"]]
IBM_PINS = [v for v in IBM if "offset" in v["inputs"]]
PINBLOCK = _by_name("pinblock")
EMV = _by_name("emv")


def test_vector_file_has_the_expected_categories() -> None:
    assert len(CVV) >= 5 and len(PVV) >= 3 and len(IBM) >= 4
    assert len(PINBLOCK) >= 5 and len(EMV) >= 6


# ------------------------------------------------------------------------------ CVV


@pytest.mark.parametrize("vector", CVV, ids=_ids(CVV))
async def test_cvv_vectors(backend: Hsm, vector: dict[str, Any]) -> None:
    i = vector["inputs"]
    assert bytes.fromhex(i["cvk"]) == TEST_KEY
    cvv = await backend.generate_cvv(CvvGeneration("cvk", i["pan"], i["expiry"], i["service_code"]))
    assert cvv == vector["expected"]
    result = await backend.verify_cvv(
        CvvVerification("cvk", i["pan"], i["expiry"], i["service_code"], vector["expected"])
    )
    assert result.ok


# ------------------------------------------------------------------------------ PVV


@pytest.mark.parametrize("vector", PVV, ids=_ids(PVV))
async def test_pvv_vectors(backend: Hsm, vector: dict[str, Any]) -> None:
    i = vector["inputs"]
    assert bytes.fromhex(i["pvk"]) == TEST_KEY
    assert (
        await backend.generate_pvv(PvvGeneration("pvk", i["pan"], i["pvki"], i["pin"]))
        == vector["expected"]
    )


@pytest.mark.parametrize("vector", PVV, ids=_ids(PVV))
async def test_pvv_vectors_verify_from_encrypted_pin_block(
    backend: Hsm, vector: dict[str, Any]
) -> None:
    """The published PVV verifies the PIN inside an ISO 0 block built by psec."""
    i = vector["inputs"]
    block = _tdes(ZPK_1, psec_pinblock.encode_pinblock_iso_0(i["pin"], i["pan"]))
    ref = PvvReference("pvk", i["pvki"], vector["expected"])
    req = PinVerification("zpk-1", block, PinBlockFormat.ISO_0, i["pan"], ref)
    assert (await backend.verify_pin(req)).ok


# ------------------------------------------------------------------------------ IBM 3624


@pytest.mark.parametrize("vector", IBM_OFFSETS, ids=_ids(IBM_OFFSETS))
async def test_ibm3624_offset_vectors(backend: Hsm, vector: dict[str, Any]) -> None:
    i = vector["inputs"]
    offset = await backend.generate_ibm_offset(
        IbmOffsetGeneration("pvk", IBM_PAN, i["pin"], i["dectab"], i["validation_data"])
    )
    assert offset == vector["expected"]


@pytest.mark.parametrize("vector", IBM_PINS, ids=_ids(IBM_PINS))
async def test_ibm3624_pin_from_offset_vectors(backend: Hsm, vector: dict[str, Any]) -> None:
    """The published PIN verifies against the published offset; its neighbour does not."""
    i = vector["inputs"]
    ref = Ibm3624Reference("pvk", i["offset"], i["dectab"], i["validation_data"])
    pin = vector["expected"]
    wrong = pin[:-1] + str((int(pin[-1]) + 1) % 10)
    for candidate, ok in ((pin, True), (wrong, False)):
        block = _tdes(ZPK_2, psec_pinblock.encode_pinblock_iso_0(candidate, IBM_PAN))
        req = PinVerification("zpk-2", block, PinBlockFormat.ISO_0, IBM_PAN, ref)
        assert (await backend.verify_pin(req)).ok is ok


# ------------------------------------------------------------------------------ PIN blocks


async def test_pinblock_iso0_vector(backend: Hsm) -> None:
    """The published ISO 0 block verifies as PIN 1234 and not as 1235."""
    v = PINBLOCK["ISO0 psec"]
    pan, pin = v["inputs"]["pan"], v["inputs"]["pin"]
    block = _tdes(ZPK_1, bytes.fromhex(v["expected"]))
    pvv = await backend.generate_pvv(PvvGeneration("pvk", pan, "1", pin))
    req = PinVerification("zpk-1", block, PinBlockFormat.ISO_0, pan, PvvReference("pvk", "1", pvv))
    assert (await backend.verify_pin(req)).ok
    other = await backend.generate_pvv(PvvGeneration("pvk", pan, "1", "1235"))
    assert other != pvv
    req = PinVerification(
        "zpk-1", block, PinBlockFormat.ISO_0, pan, PvvReference("pvk", "1", other)
    )
    assert not (await backend.verify_pin(req)).ok


async def test_pinblock_iso0_twelve_digit_vector(backend: Hsm) -> None:
    """The published 12-digit ISO 0 block verifies digit for digit (IBM offset of 12)."""
    v = PINBLOCK["ISO0 12-digit PIN psec"]
    pan, pin = v["inputs"]["pan"], v["inputs"]["pin"]
    dec, val = "0123456789012345", "N"
    offset = await backend.generate_ibm_offset(IbmOffsetGeneration("pvk", pan, pin, dec, val))
    assert len(offset) == 12
    block = _tdes(ZPK_2, bytes.fromhex(v["expected"]))
    ref = Ibm3624Reference("pvk", offset, dec, val)
    assert (
        await backend.verify_pin(PinVerification("zpk-2", block, PinBlockFormat.ISO_0, pan, ref))
    ).ok
    wrong = _tdes(ZPK_2, psec_pinblock.encode_pinblock_iso_0("123456789013", pan))
    assert not (
        await backend.verify_pin(PinVerification("zpk-2", wrong, PinBlockFormat.ISO_0, pan, ref))
    ).ok


async def test_pinblock_iso3_vector_translates_to_published_iso0(backend: Hsm) -> None:
    """Published ISO 3 block in, published ISO 0 block (same PAN, PIN 1234) out."""
    v3 = PINBLOCK["ISO3 decode psec"]
    v0 = PINBLOCK["ISO0 psec"]
    pan = v3["inputs"]["pan"]
    assert pan == v0["inputs"]["pan"] and v3["expected"] == v0["inputs"]["pin"]
    source = _tdes(ZPK_1, bytes.fromhex(v3["inputs"]["block"]))
    out = await backend.translate_pin(
        PinTranslation("zpk-1", PinBlockFormat.ISO_3, source, "zpk-2", PinBlockFormat.ISO_0, pan)
    )
    assert _tdes(ZPK_2, out, decrypt=True).hex().upper() == v0["expected"]


async def test_pinblock_iso4_decipher_vector(backend: Hsm) -> None:
    """The published format 4 block under the published AES key holds PIN 1234."""
    v = PINBLOCK["ISO4 psec decipher"]
    pan = v["inputs"]["pan"]
    assert bytes.fromhex(v["inputs"]["key"]) == ZPK_AES
    out = await backend.translate_pin(
        PinTranslation(
            "zpk-aes",
            PinBlockFormat.ISO_4,
            bytes.fromhex(v["inputs"]["block"]),
            "zpk-1",
            PinBlockFormat.ISO_0,
            pan,
        )
    )
    clear = _tdes(ZPK_1, out, decrypt=True)
    assert psec_pinblock.decode_pinblock_iso_0(clear, pan) == v["expected"]


async def test_pinblock_iso4_deterministic_vector(backend: Hsm) -> None:
    """The published enciphered format 4 block (random fill FF..) holds PIN 1234; and our
    format 4 output for that PIN deciphers (with psec) to it.
    """
    v = PINBLOCK["ISO4 psec deterministic (random=FF..)"]
    pan, pin = v["inputs"]["pan"], v["inputs"]["pin"]
    out = await backend.translate_pin(
        PinTranslation(
            "zpk-aes",
            PinBlockFormat.ISO_4,
            bytes.fromhex(v["expected"]),
            "zpk-1",
            PinBlockFormat.ISO_0,
            pan,
        )
    )
    assert psec_pinblock.decode_pinblock_iso_0(_tdes(ZPK_1, out, decrypt=True), pan) == pin
    back = await backend.translate_pin(
        PinTranslation("zpk-1", PinBlockFormat.ISO_0, out, "zpk-aes", PinBlockFormat.ISO_4, pan)
    )
    assert psec_pinblock.decipher_pinblock_iso_4(ZPK_AES, back, pan) == pin


# ------------------------------------------------------------------------------ EMV


def _card(cvn: Cvn) -> EmvCard:
    return EmvCard("imk", cvn, EMV_PAN, EMV_PSN)


async def test_emv_icc_master_key_kcv_vector(backend: Hsm) -> None:
    v = EMV["Option A ICC MK-AC KCV (PAN 1234567890123456 PSN 00)"]
    assert (v["inputs"]["pan"], v["inputs"]["psn"]) == (EMV_PAN, EMV_PSN)
    for cvn in Cvn:
        kcvs = await backend.emv_key_check_values(EmvKeyCheck(_card(cvn), EMV_ATC, bytes(4)))
        assert kcvs.icc_master_key.startswith(v["expected"])


async def test_emv_cvn10_arqc_and_arpc_vectors(backend: Hsm) -> None:
    arqc_v = EMV["Visa CVN10 ARQC (key = ICC MK, zero pad)"]
    arpc_v = EMV["Visa CVN10 ARPC method 1 ARC 3030"]
    data = bytes.fromhex(arqc_v["inputs"]["data_hex"])
    arqc = bytes.fromhex(arqc_v["expected"])
    card = _card(Cvn.VISA_10)
    assert await backend.generate_arqc(ArqcGeneration(card, EMV_ATC, data)) == arqc
    arc = bytes.fromhex(arpc_v["inputs"]["arc"])
    result = await backend.verify_arqc(
        ArqcVerification(card, EMV_ATC, data, arqc, arpc=ArpcRequest(arc=arc))
    )
    assert result.ok and result.arpc == bytes.fromhex(arpc_v["expected"])
    arpc = await backend.generate_arpc(ArpcGeneration(card, EMV_ATC, arqc, ArpcRequest(arc=arc)))
    assert arpc == bytes.fromhex(arpc_v["expected"])


async def test_emv_cvn18_vectors(backend: Hsm) -> None:
    sk_v = EMV["Visa CVN18 session key KCV (ATC 001C)"]
    arqc_v = EMV["Visa CVN18 ARQC (9F10 06011203A0B800, 0x80 pad)"]
    arpc_v = EMV["Visa CVN18 ARPC method 2 CSU 00000000"]
    card = _card(Cvn.VISA_18)
    atc = bytes.fromhex(sk_v["inputs"]["atc"])
    kcvs = await backend.emv_key_check_values(EmvKeyCheck(card, atc))
    assert kcvs.session_key.startswith(sk_v["expected"])
    data = bytes.fromhex(arqc_v["inputs"]["data_hex"])
    arqc = bytes.fromhex(arqc_v["expected"])
    assert await backend.generate_arqc(ArqcGeneration(card, atc, data)) == arqc
    csu = bytes.fromhex(arpc_v["inputs"]["csu"])
    result = await backend.verify_arqc(
        ArqcVerification(card, atc, data, arqc, arpc=ArpcRequest(csu=csu))
    )
    assert result.ok and result.arpc == bytes.fromhex(arpc_v["expected"])
