"""HSM commands through both backends: mismatches are values, bad inputs and keys are typed
errors, PIN translation across formats, Mastercard CVN 16 and Option B against pyemv, card
data, key management, and no card data in reprs or messages.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from psec import pinblock as psec_pinblock

from hsm.api import (
    ArpcGeneration,
    ArpcRequest,
    ArqcGeneration,
    ArqcVerification,
    CardDataCrypto,
    Cvn,
    CvvGeneration,
    CvvVerification,
    Decryption,
    EmvCard,
    Encryption,
    Fingerprint,
    Hsm,
    Ibm3624Reference,
    IbmOffsetGeneration,
    KeyAdmin,
    KeyAlgorithm,
    KeyGeneration,
    KeyImport,
    KeyUsage,
    PaymentHsm,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvGeneration,
    PvvReference,
    VerifyReason,
    arqc_data,
)
from hsm.errors import (
    DecryptionFailed,
    HsmError,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    KeyUsageError,
)

pytest.register_assert_rewrite("hsm_fixtures")
from hsm_fixtures import DATA_KEY, HMAC_KEY, TEST_KEY, ZPK_1, ZPK_2  # noqa: E402

pytest_plugins = ["hsm_fixtures"]

PAN = "4123456789012345"
PIN = "4321"
#: The transaction of pyemv's CVN tests (tags 9F02..9F36).
TAGS = {
    "9F02": bytes.fromhex("000000004000"),
    "9F03": bytes.fromhex("000000000000"),
    "9F1A": bytes.fromhex("0124"),
    "95": bytes.fromhex("8000048000"),
    "5F2A": bytes.fromhex("0124"),
    "9A": bytes.fromhex("191105"),
    "9C": bytes.fromhex("01"),
    "9F37": bytes.fromhex("52BF4585"),
    "82": bytes.fromhex("1800"),
    "9F36": bytes.fromhex("001C"),
}
ATC = TAGS["9F36"]
UN = TAGS["9F37"]


def _tdes(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(TripleDES(key + key[:8]), modes.ECB())  # noqa: S305 - PIN block cipher
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def _iso0(pin: str, pan: str = PAN, key: bytes = ZPK_1) -> bytes:
    return _tdes(key, psec_pinblock.encode_pinblock_iso_0(pin, pan))


# ------------------------------------------------------------------------------ mismatches


async def test_wrong_cvv_is_a_mismatch(backend: Hsm) -> None:
    good = await backend.generate_cvv(CvvGeneration("cvk", PAN, "2512", "101"))
    wrong = f"{(int(good) + 1) % 1000:03d}"
    result = await backend.verify_cvv(CvvVerification("cvk", PAN, "2512", "101", wrong))
    assert not result.ok and result.reason is VerifyReason.MISMATCH


async def test_cvv2_and_icvv_differ_from_cvv(backend: Hsm) -> None:
    values = {
        sc: await backend.generate_cvv(CvvGeneration("cvk", PAN, "2512", sc))
        for sc in ("101", "000", "999")
    }
    assert len(set(values.values())) == 3
    assert (await backend.verify_cvv(CvvVerification("cvk", PAN, "2512", "000", values["000"]))).ok


async def test_wrong_pin_is_a_mismatch_pvv(backend: Hsm) -> None:
    pvv = await backend.generate_pvv(PvvGeneration("pvk", PAN, "1", PIN))
    ref = PvvReference("pvk", "1", pvv)
    good = PinVerification("zpk-1", _iso0(PIN), PinBlockFormat.ISO_0, PAN, ref)
    assert (await backend.verify_pin(good)).ok
    bad = PinVerification("zpk-1", _iso0("4322"), PinBlockFormat.ISO_0, PAN, ref)
    result = await backend.verify_pin(bad)
    assert not result.ok and result.reason is VerifyReason.MISMATCH


async def test_wrong_pin_is_a_mismatch_ibm(backend: Hsm) -> None:
    offset = await backend.generate_ibm_offset(
        IbmOffsetGeneration("pvk", PAN, PIN, "0123456789012345", "N")
    )
    ref = Ibm3624Reference("pvk", offset, "0123456789012345", "N")
    good = PinVerification("zpk-1", _iso0(PIN), PinBlockFormat.ISO_0, PAN, ref)
    assert (await backend.verify_pin(good)).ok
    bad = PinVerification("zpk-1", _iso0("9321"), PinBlockFormat.ISO_0, PAN, ref)
    assert (await backend.verify_pin(bad)).reason is VerifyReason.MISMATCH


async def test_pin_block_under_another_key_is_invalid_not_an_error(backend: Hsm) -> None:
    pvv = await backend.generate_pvv(PvvGeneration("pvk", PAN, "1", PIN))
    block = _iso0(PIN, key=ZPK_2)  # sent under zpk-2, verified as if under zpk-1
    req = PinVerification("zpk-1", block, PinBlockFormat.ISO_0, PAN, PvvReference("pvk", "1", pvv))
    result = await backend.verify_pin(req)
    assert not result.ok
    assert result.reason is VerifyReason.PIN_BLOCK_INVALID


async def test_pin_block_of_another_pan_does_not_verify(backend: Hsm) -> None:
    pvv = await backend.generate_pvv(PvvGeneration("pvk", PAN, "1", PIN))
    block = _iso0(PIN, pan="4999988887777000")
    req = PinVerification("zpk-1", block, PinBlockFormat.ISO_0, PAN, PvvReference("pvk", "1", pvv))
    assert not (await backend.verify_pin(req)).ok


def _pyemv_cvn(cvn: Cvn, pan: str, psn: str):  # type: ignore[no-untyped-def]
    pyemv_cvn = pytest.importorskip("pyemv.cvn")
    classes = {
        Cvn.VISA_10: pyemv_cvn.VisaCVN10,
        Cvn.VISA_18: pyemv_cvn.VisaCVN18,
        Cvn.MC_16: pyemv_cvn.MasterCardCVN16,
    }
    return classes[cvn](TEST_KEY, TEST_KEY, TEST_KEY, pan, psn)


IAD = {
    Cvn.VISA_10: bytes.fromhex("06010A03A06010"),
    Cvn.VISA_18: bytes.fromhex("06011203A0B800"),
    Cvn.MC_16: bytes.fromhex("0110A04003220000000000"),
}


@pytest.mark.parametrize("cvn", list(Cvn))
async def test_tampered_arqc_is_a_mismatch(backend: Hsm, cvn: Cvn) -> None:
    card = EmvCard("imk", cvn, PAN, "01")
    data = arqc_data(cvn, {**TAGS, "9F10": IAD[cvn]})
    arqc = await backend.generate_arqc(ArqcGeneration(card, ATC, data, UN))
    assert (await backend.verify_arqc(ArqcVerification(card, ATC, data, arqc, UN))).ok
    flipped = bytes([arqc[0] ^ 0x01]) + arqc[1:]
    result = await backend.verify_arqc(ArqcVerification(card, ATC, data, flipped, UN))
    assert not result.ok and result.reason is VerifyReason.MISMATCH and result.arpc is None
    amount = bytearray(data)
    amount[5] ^= 0x10  # the amount the card signed is not the amount presented
    result = await backend.verify_arqc(ArqcVerification(card, ATC, bytes(amount), arqc, UN))
    assert not result.ok


# ------------------------------------------------------------------------------ pyemv oracle


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("cvn", list(Cvn))
@pytest.mark.parametrize(
    ("pan", "psn"), [("5413330089600010", "01"), ("4761739001010010123", "02")]
)
async def test_arqc_and_arpc_match_pyemv(backend: Hsm, cvn: Cvn, pan: str, psn: str) -> None:
    """pyemv (an independent implementation) agrees on AC and ARPC, including Mastercard
    CVN 16 (MC SKD) and Option B for a 19-digit PAN under CVN 18."""
    ref = _pyemv_cvn(cvn, pan, psn)
    tags = {**TAGS, "9F10": IAD[cvn]}
    data = arqc_data(cvn, tags)
    common = {f"tag_{t.lower()}": v for t, v in TAGS.items()}
    if cvn is Cvn.VISA_10:
        expected = ref.generate_ac(**common, cvr=IAD[cvn][3:7])
    elif cvn is Cvn.VISA_18:
        expected = ref.generate_ac(**common, tag_9f10=IAD[cvn])
    else:
        expected = ref.generate_ac(**common, cvr=IAD[cvn][2:8])
    card = EmvCard("imk", cvn, pan, psn)
    assert await backend.generate_arqc(ArqcGeneration(card, ATC, data, UN)) == expected
    if cvn is Cvn.VISA_18:
        req = ArpcRequest(csu=bytes.fromhex("00800000"), proprietary_auth_data=b"\x01\x02")
        ref_arpc = ref.generate_arpc(expected, ATC, req.csu, req.proprietary_auth_data)
    else:
        req = ArpcRequest(arc=b"00")
        ref_arpc = ref.generate_arpc(expected, b"00")
    result = await backend.verify_arqc(ArqcVerification(card, ATC, data, expected, UN, req))
    assert result.ok and result.arpc == ref_arpc
    assert await backend.generate_arpc(ArpcGeneration(card, ATC, expected, req, UN)) == ref_arpc


# ------------------------------------------------------------------------------ translation


@pytest.mark.parametrize("src", list(PinBlockFormat))
@pytest.mark.parametrize("dst", list(PinBlockFormat))
async def test_translate_between_all_formats(
    backend: Hsm, src: PinBlockFormat, dst: PinBlockFormat
) -> None:
    zpk = {PinBlockFormat.ISO_4: "zpk-aes"}
    # Start from a psec-built ISO 0 block, go to src, then to dst, then back to ISO 0.
    start = _iso0(PIN)
    a = await backend.translate_pin(
        PinTranslation("zpk-1", PinBlockFormat.ISO_0, start, zpk.get(src, "zpk-2"), src, PAN)
    )
    b = await backend.translate_pin(
        PinTranslation(zpk.get(src, "zpk-2"), src, a, zpk.get(dst, "zpk-1"), dst, PAN)
    )
    c = await backend.translate_pin(
        PinTranslation(zpk.get(dst, "zpk-1"), dst, b, "zpk-2", PinBlockFormat.ISO_0, PAN)
    )
    assert psec_pinblock.decode_pinblock_iso_0(_tdes(ZPK_2, c, decrypt=True), PAN) == PIN


async def test_random_fill_formats_differ_each_time(backend: Hsm) -> None:
    req = PinTranslation(
        "zpk-1", PinBlockFormat.ISO_0, _iso0(PIN), "zpk-2", PinBlockFormat.ISO_3, PAN
    )
    assert await backend.translate_pin(req) != await backend.translate_pin(req)


async def test_translate_rejects_a_malformed_block(backend: Hsm) -> None:
    req = PinTranslation(
        "zpk-1", PinBlockFormat.ISO_0, _iso0(PIN, key=ZPK_2), "zpk-2", PinBlockFormat.ISO_0, PAN
    )
    with pytest.raises(InvalidInput) as info:
        await backend.translate_pin(req)
    assert info.value.field == "pin_block"


# ------------------------------------------------------------------------------ errors


async def test_unknown_key(backend: Hsm) -> None:
    with pytest.raises(KeyNotFound):
        await backend.generate_cvv(CvvGeneration("nope", PAN, "2512", "101"))


async def test_key_usage_is_enforced(backend: Hsm) -> None:
    with pytest.raises(KeyUsageError):
        await backend.generate_cvv(CvvGeneration("pvk", PAN, "2512", "101"))
    with pytest.raises(KeyUsageError):
        await backend.generate_pvv(PvvGeneration("cvk", PAN, "1", PIN))
    with pytest.raises(KeyUsageError):  # format 4 needs an AES ZPK
        await backend.translate_pin(
            PinTranslation(
                "zpk-1", PinBlockFormat.ISO_0, _iso0(PIN), "zpk-2", PinBlockFormat.ISO_4, PAN
            )
        )
    with pytest.raises(KeyUsageError):
        await backend.fingerprint(Fingerprint("pan", b"x"))


@pytest.mark.parametrize(
    ("pan", "expiry", "sc", "field"),
    [
        ("41234567890123X5", "2512", "101", "pan"),
        ("41234567890", "2512", "101", "pan"),
        (PAN, "251", "101", "expiry"),
        (PAN, "2512", "1O1", "service_code"),
    ],
)
async def test_invalid_cvv_inputs(backend: Hsm, pan: str, expiry: str, sc: str, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await backend.generate_cvv(CvvGeneration("cvk", pan, expiry, sc))
    assert info.value.field == field
    assert pan not in str(info.value)


@pytest.mark.parametrize(("pin", "pvki"), [("123", "1"), ("12a4", "1"), ("1234", "12")])
async def test_invalid_pvv_inputs(backend: Hsm, pin: str, pvki: str) -> None:
    with pytest.raises(InvalidInput):
        await backend.generate_pvv(PvvGeneration("pvk", PAN, pvki, pin))


async def test_invalid_emv_inputs(backend: Hsm) -> None:
    card = EmvCard("imk", Cvn.MC_16, PAN, "01")
    with pytest.raises(InvalidInput):  # MC CVN 16 needs the unpredictable number
        await backend.generate_arqc(ArqcGeneration(card, ATC, b"data"))
    with pytest.raises(InvalidInput):
        await backend.generate_arqc(ArqcGeneration(card, b"\x00", b"data", UN))
    with pytest.raises(InvalidInput):  # method 1 needs an ARC, not a CSU
        await backend.generate_arpc(
            ArpcGeneration(card, ATC, bytes(8), ArpcRequest(csu=bytes(4)), UN)
        )
    with pytest.raises(InvalidInput):
        await backend.verify_arqc(ArqcVerification(card, ATC, b"data", bytes(7), UN))


async def test_invalid_pin_block_length(backend: Hsm) -> None:
    ref = PvvReference("pvk", "1", "1234")
    with pytest.raises(InvalidInput):
        await backend.verify_pin(PinVerification("zpk-1", bytes(7), PinBlockFormat.ISO_0, PAN, ref))


# ------------------------------------------------------------------------------ card data


async def test_fingerprint_is_hmac_sha256(backend: Hsm) -> None:
    expected = hmac.new(HMAC_KEY, PAN.encode(), hashlib.sha256).digest()
    assert await backend.fingerprint(Fingerprint("fp", PAN.encode())) == expected


async def test_encrypt_round_trip_and_layout(backend: Hsm) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = await backend.encrypt(Encryption("pan", PAN.encode(), b"card-1"))
    assert PAN.encode() not in blob
    assert await backend.decrypt(Decryption("pan", blob, b"card-1")) == PAN.encode()
    # nonce || ciphertext || tag, as AES-GCM in cryptography reads it
    assert AESGCM(DATA_KEY).decrypt(blob[:12], blob[12:], b"card-1") == PAN.encode()
    assert await backend.encrypt(Encryption("pan", PAN.encode(), b"card-1")) != blob
    with pytest.raises(DecryptionFailed):
        await backend.decrypt(Decryption("pan", blob, b"card-2"))
    with pytest.raises(DecryptionFailed):
        await backend.decrypt(Decryption("pan", blob[:-1] + bytes([blob[-1] ^ 1]), b"card-1"))


# ------------------------------------------------------------------------------ keys


async def test_import_reports_kcv_and_list_never_shows_values(backend: Hsm) -> None:
    infos = {i.label: i for i in await backend.list_keys()}
    # TDES KCV: first 3 bytes of TDES(K, 0^8), computed here with cryptography.
    assert infos["cvk"].kcv == _tdes(TEST_KEY, bytes(8))[:3].hex().upper()
    assert infos["zpk-aes"].algorithm is KeyAlgorithm.AES_128
    assert await backend.key_check_value("zpk-1") == _tdes(ZPK_1, bytes(8))[:3].hex().upper()
    text = repr(await backend.list_keys())
    assert TEST_KEY.hex() not in text.lower()


async def test_import_existing_label_and_bad_lengths(backend: Hsm) -> None:
    with pytest.raises(KeyExists):
        await backend.import_key(KeyImport("cvk", KeyUsage.CVK, TEST_KEY))
    with pytest.raises(InvalidInput):
        await backend.import_key(KeyImport("short", KeyUsage.CVK, bytes(8)))
    with pytest.raises(InvalidInput):
        await backend.import_key(
            KeyImport("aes-cvk", KeyUsage.CVK, bytes(16), KeyAlgorithm.AES_128)
        )


@pytest.mark.parametrize("usage", list(KeyUsage))
async def test_generate_use_and_delete(backend: Hsm, usage: KeyUsage) -> None:
    label = f"gen-{usage}-{id(backend)}"
    info = await backend.generate_key(KeyGeneration(label, usage))
    assert info.usage is usage and len(info.kcv) == 6
    assert await backend.key_check_value(label) == info.kcv
    if usage is KeyUsage.CVK:
        cvv = await backend.generate_cvv(CvvGeneration(label, PAN, "2512", "101"))
        assert (await backend.verify_cvv(CvvVerification(label, PAN, "2512", "101", cvv))).ok
    elif usage is KeyUsage.IMK_AC:
        card = EmvCard(label, Cvn.VISA_18, PAN, "00")
        arqc = await backend.generate_arqc(ArqcGeneration(card, ATC, b"abc"))
        assert (await backend.verify_arqc(ArqcVerification(card, ATC, b"abc", arqc))).ok
    elif usage is KeyUsage.HMAC:
        assert len(await backend.fingerprint(Fingerprint(label, b"x"))) == 32
    await backend.delete_key(label)
    with pytest.raises(KeyNotFound):
        await backend.key_check_value(label)


# ------------------------------------------------------------------------------ no card data


def test_reprs_mask_pan_and_hide_secrets() -> None:
    block = bytes.fromhex("1122334455667788")
    reqs = [
        PinVerification("z", block, PinBlockFormat.ISO_0, PAN, PvvReference("p", "1", "9876")),
        PinTranslation("a", PinBlockFormat.ISO_0, block, "b", PinBlockFormat.ISO_3, PAN),
        ArqcVerification(EmvCard("i", Cvn.VISA_18, PAN), ATC, b"\x99" * 20, block),
        PvvGeneration("p", PAN, "1", "9876"),
        IbmOffsetGeneration("p", PAN, "9876", "0123456789012345", "N"),
        CvvGeneration("c", PAN, "9876", "101"),
        CvvVerification("c", PAN, "2512", "101", "9876"),
    ]
    without_pan = [
        Fingerprint("f", PAN.encode()),
        Encryption("d", PAN.encode(), b"card-1"),
        Decryption("d", block * 4, PAN.encode()),
        KeyImport("k", KeyUsage.ZPK, block * 2),
    ]
    for req in [*reqs, *without_pan]:
        text = repr(req)
        assert PAN not in text
        assert "412345******2345" in text or req in without_pan
        assert "1122334455667788" not in text and "9876" not in text
        assert block.hex() not in text and "\\x11" not in text


async def test_error_messages_carry_no_card_data(backend: Hsm) -> None:
    try:
        await backend.verify_pin(
            PinVerification(
                "zpk-1", bytes(9), PinBlockFormat.ISO_0, PAN, PvvReference("pvk", "1", "1234")
            )
        )
    except HsmError as exc:
        assert PAN not in str(exc) and "00000000" not in str(exc)
    else:
        pytest.fail("a 9-byte PIN block was accepted")


def test_backends_are_the_three_command_families(backend: Hsm) -> None:
    assert isinstance(backend, PaymentHsm)
    assert isinstance(backend, CardDataCrypto)
    assert isinstance(backend, KeyAdmin)


async def test_arqc_verification_from_de55_tags(backend: Hsm) -> None:
    card = EmvCard("imk", Cvn.VISA_18, PAN, "00")
    tags = {**TAGS, "9F10": IAD[Cvn.VISA_18]}
    arqc = await backend.generate_arqc(
        ArqcGeneration(card, tags["9F36"], arqc_data(Cvn.VISA_18, tags))
    )
    lower_case = {name.lower(): value for name, value in {**tags, "9F26": arqc}.items()}
    req = ArqcVerification.from_tags(card, lower_case)
    assert req.transaction_data == arqc_data(Cvn.VISA_18, tags) and req.un == tags["9F37"]
    assert (await backend.verify_arqc(req)).ok
    with pytest.raises(InvalidInput, match="9F26"):
        ArqcVerification.from_tags(card, tags)
