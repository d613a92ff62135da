"""The HSM command interface: what the switch asks of a hardware security module.

What lives here: three protocols, one async method per command in the spirit of a payment
HSM's host commands, and ``Hsm``, their union: ``PaymentHsm`` (PIN verification and
translation, CVV/CVV2/iCVV, EMV ARQC/ARPC, PVV/IBM offset generation for provisioning),
``CardDataCrypto`` (keyed fingerprint and AES-GCM for card data at rest) and ``KeyAdmin``
(key import in clear or under a key-encrypting key, generation, listing, check values,
deletion); the typed request object each
command takes and the result values it returns; assembling the ARQC's data from DE55 tags;
the input validation shared by every backend.

What does not: any cryptography (``hsm.algorithms`` composes it over a block cipher), the
command logic shared by the backends (``hsm.backend``), any backend (``hsm.pkcs11`` on
SoftHSM/PKCS#11, ``hsm.software`` on ``cryptography``), opening the configured backend
(``hsm.token.open_hsm``), KMS (``hsm.kms``), PAN bounds and masking (``hsm.pan``).

Conventions:
    * Keys are referenced by label; values never cross this interface outwards.
    * A mismatch (wrong PIN, CVV, tampered cryptogram) is a result value (``ok=False`` with a
      reason); failures are the exceptions of ``hsm.errors``.
    * The switch passes encrypted PIN blocks and reference data (PVV, IBM offset), never a
      clear PIN, so that a payment HSM backend keeps the PIN inside its boundary. Only the
      provisioning commands (``generate_pvv``, ``generate_ibm_offset``) take a clear PIN.
    * ``repr()`` of every request masks the PAN (first six, last four) and hides PINs, PIN
      blocks, CVVs, expiry dates, cryptograms, transaction data, key values and plaintexts.
    * All methods are safe to call concurrently from many trio tasks.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

from hsm.errors import InvalidInput
from hsm.pan import PAN_MAX_DIGITS, PAN_MIN_DIGITS, is_digits, mask_pan


class KeyUsage(enum.StrEnum):
    """What a key may be used for; checked by every command before it touches the key."""

    #: Zone PIN key: PIN blocks exchanged with a network (TDES for formats 0/1/3, AES for 4).
    ZPK = "zpk"
    #: PIN verification key: Visa PVV and IBM 3624 natural PIN/offset.
    PVK = "pvk"
    #: Card verification key (CVKA||CVKB): CVV, CVV2, iCVV.
    CVK = "cvk"
    #: EMV issuer master key for application cryptograms (ARQC/TC/AAC, ARPC).
    IMK_AC = "imk-ac"
    #: Key-encryption key (key blocks, key exchange).
    KEK = "kek"
    #: HMAC-SHA-256 key for the PAN fingerprint used in lookups.
    HMAC = "hmac"
    #: AES key encrypting card data at rest (AES-256-GCM).
    DATA = "data"


class KeyAlgorithm(enum.StrEnum):
    """Algorithm and length of a key."""

    TDES_2KEY = "tdes-2key"
    TDES_3KEY = "tdes-3key"
    AES_128 = "aes-128"
    AES_192 = "aes-192"
    AES_256 = "aes-256"
    HMAC_SHA256 = "hmac-sha256"


#: Key length in bytes of each fixed-length algorithm (HMAC keys: 16 to 64 bytes).
KEY_LENGTHS: dict[KeyAlgorithm, int] = {
    KeyAlgorithm.TDES_2KEY: 16,
    KeyAlgorithm.TDES_3KEY: 24,
    KeyAlgorithm.AES_128: 16,
    KeyAlgorithm.AES_192: 24,
    KeyAlgorithm.AES_256: 32,
}
#: AES-GCM nonce and tag lengths of ``CardDataCrypto.encrypt`` blobs, in bytes (NIST SP 800-38D
#: recommended 96-bit nonce, full 128-bit tag).
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
#: HMAC key length bounds in bytes (at least 128 bits, at most one SHA-256 block).
HMAC_KEY_MIN = 16
HMAC_KEY_MAX = 64
#: TDES and AES algorithms, for usage checks.
TDES_ALGORITHMS = frozenset({KeyAlgorithm.TDES_2KEY, KeyAlgorithm.TDES_3KEY})
AES_ALGORITHMS = frozenset({KeyAlgorithm.AES_128, KeyAlgorithm.AES_192, KeyAlgorithm.AES_256})

#: Algorithms each usage admits; the first is the default for ``generate_key`` and for
#: ``import_key`` when the value's length does not decide (a 16-byte ZPK is TDES unless
#: ``algorithm=KeyAlgorithm.AES_128`` is given).
USAGE_ALGORITHMS: dict[KeyUsage, tuple[KeyAlgorithm, ...]] = {
    KeyUsage.ZPK: (
        KeyAlgorithm.TDES_2KEY,
        KeyAlgorithm.TDES_3KEY,
        KeyAlgorithm.AES_128,
        KeyAlgorithm.AES_192,
        KeyAlgorithm.AES_256,
    ),
    # PVV, IBM 3624, CVV and EMV are defined on double-length TDES keys.
    KeyUsage.PVK: (KeyAlgorithm.TDES_2KEY,),
    KeyUsage.CVK: (KeyAlgorithm.TDES_2KEY,),
    KeyUsage.IMK_AC: (KeyAlgorithm.TDES_2KEY,),
    KeyUsage.KEK: (
        KeyAlgorithm.TDES_2KEY,
        KeyAlgorithm.TDES_3KEY,
        KeyAlgorithm.AES_128,
        KeyAlgorithm.AES_192,
        KeyAlgorithm.AES_256,
    ),
    KeyUsage.HMAC: (KeyAlgorithm.HMAC_SHA256,),
    KeyUsage.DATA: (KeyAlgorithm.AES_256, KeyAlgorithm.AES_128),
}


@dataclass(frozen=True)
class KeyInfo:
    """What may be known about a key without its value.

    ``kcv`` is the key check value, 6 hex digits: TDES encrypts 8 zero bytes, AES computes
    AES-CMAC of 16 zero bytes (ANSI X9.24-1:2017), HMAC computes HMAC-SHA-256 of 16 zero bytes;
    the first three bytes of the result.
    """

    label: str
    usage: KeyUsage
    algorithm: KeyAlgorithm
    kcv: str


class PinBlockFormat(enum.IntEnum):
    """ISO 9564-1 PIN block formats supported."""

    ISO_0 = 0
    ISO_1 = 1
    ISO_3 = 3
    #: AES, 16-byte block; the ZPK must be an AES key.
    ISO_4 = 4


class VerifyReason(enum.StrEnum):
    """Why a verification did not succeed (it is not an error)."""

    #: The value does not match the reference (wrong PIN, CVV, cryptogram).
    MISMATCH = "mismatch"
    #: The PIN block did not decrypt to a well-formed block of its format (wrong key, wrong
    #: format or corrupted block): a PIN cryptographic failure rather than a wrong PIN.
    PIN_BLOCK_INVALID = "pin-block-invalid"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification: ``ok`` or a reason."""

    ok: bool
    reason: VerifyReason | None = None

    @classmethod
    def success(cls) -> VerifyResult:
        return cls(True, None)

    @classmethod
    def failure(cls, reason: VerifyReason = VerifyReason.MISMATCH) -> VerifyResult:
        return cls(False, reason)


@dataclass(frozen=True)
class PvvReference:
    """Visa PIN Verification Value reference data, as stored with the card.

    Attributes:
        pvk: label of the PIN verification key.
        pvki: PIN verification key index, one digit.
        pvv: the stored 4-digit PVV.
    """

    pvk: str
    pvki: str
    pvv: str = field(repr=False)


@dataclass(frozen=True)
class Ibm3624Reference:
    """IBM 3624 offset reference data, as stored with the card.

    Attributes:
        pvk: label of the PIN verification key.
        offset: the stored offset; its length is the PIN check length (the leftmost
            ``len(offset)`` digits of the PIN are checked, as IBM 3624 defines).
        dec_table: 16-digit decimalization table.
        validation_data: 1 to 16 hex digits, right-padded with ``F``; a single ``N`` stands for
            the last five digits of the account number (the 12 rightmost PAN digits excluding
            the check digit), as payment HSMs allow.
    """

    pvk: str
    offset: str = field(repr=False)
    dec_table: str
    validation_data: str = field(repr=False)


@dataclass(frozen=True)
class PinVerification:
    """Verify the PIN inside an encrypted PIN block against reference data.

    Attributes:
        zpk: label of the zone PIN key the block is encrypted under.
        pin_block: the encrypted PIN block (8 bytes, 16 for format 4).
        format: its ISO 9564 format.
        pan: the card's PAN (the PIN block of formats 0, 3 and 4 is bound to it).
        reference: how the PIN is checked (Visa PVV or IBM 3624 offset).
    """

    zpk: str
    pin_block: bytes
    format: PinBlockFormat
    pan: str
    reference: PvvReference | Ibm3624Reference

    def __repr__(self) -> str:
        return (
            f"PinVerification(zpk={self.zpk!r}, format={self.format.name}, "
            f"pan={mask_pan(self.pan)!r}, reference={self.reference!r})"
        )


@dataclass(frozen=True)
class PinTranslation:
    """Re-encrypt a PIN block from one key and format to another without exposing the PIN.

    Attributes:
        source_zpk, source_format: key and format of ``pin_block``.
        pin_block: the encrypted PIN block.
        destination_zpk, destination_format: key and format of the result. Formats 1, 3 and 4
            get fresh random fill from the HSM.
        pan: the card's PAN; may be empty only when both formats are ISO 1.
    """

    source_zpk: str
    source_format: PinBlockFormat
    pin_block: bytes
    destination_zpk: str
    destination_format: PinBlockFormat
    pan: str

    def __repr__(self) -> str:
        return (
            f"PinTranslation(source_zpk={self.source_zpk!r}, "
            f"source_format={self.source_format.name}, "
            f"destination_zpk={self.destination_zpk!r}, "
            f"destination_format={self.destination_format.name}, pan={mask_pan(self.pan)!r})"
        )


class _MaskedRepr:
    """``repr()`` of a request: fields declared ``repr=False`` are left out and a field named
    ``pan`` is masked (first six, last four), so no request ever prints card data."""

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):  # type: ignore[arg-type]
            if not f.repr:
                continue
            value = getattr(self, f.name)
            text = repr(mask_pan(value)) if f.name == "pan" else repr(value)
            shown.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class PvvGeneration(_MaskedRepr):
    """Compute the Visa PVV of a clear PIN (provisioning).

    Attributes:
        pvk: label of the PIN verification key.
        pan: the card's PAN.
        pvki: PIN verification key index, one digit.
        pin: the clear PIN, 4 to 12 digits.
    """

    pvk: str
    pan: str
    pvki: str
    pin: str = field(repr=False)


@dataclass(frozen=True, repr=False)
class IbmOffsetGeneration(_MaskedRepr):
    """Compute the IBM 3624 offset of a clear PIN (provisioning).

    Attributes:
        pvk: label of the PIN verification key.
        pan: the card's PAN.
        pin: the clear PIN, 4 to 12 digits.
        dec_table: 16-digit decimalization table.
        validation_data: as ``Ibm3624Reference.validation_data`` (``N`` = last five digits of
            the account number taken from ``pan``).
    """

    pvk: str
    pan: str
    pin: str = field(repr=False)
    dec_table: str = ""
    validation_data: str = field(default="", repr=False)


@dataclass(frozen=True, repr=False)
class CvvGeneration(_MaskedRepr):
    """Compute a CVV (service code as on the stripe), CVV2 (``000``) or iCVV (``999``).

    Attributes:
        cvk: label of the card verification key.
        pan: the card's PAN.
        expiry: YYMM, as on the magnetic stripe.
        service_code: three digits.
    """

    cvk: str
    pan: str
    expiry: str = field(repr=False)
    service_code: str


@dataclass(frozen=True, repr=False)
class CvvVerification(_MaskedRepr):
    """Verify a CVV, CVV2 or iCVV: the fields of ``CvvGeneration`` and the value offered."""

    cvk: str
    pan: str
    expiry: str = field(repr=False)
    service_code: str
    cvv: str = field(repr=False)


class Cvn(enum.StrEnum):
    """EMV cryptogram versions supported, with what each one fixes.

    * ``VISA_10``: Option A ICC key; no session key (the ICC master key computes the AC);
      ISO 9797-1 MAC algorithm 3 with padding method 1 (zeros); ARPC method 1 (ARC).
    * ``VISA_18``: Option B ICC key (= Option A for a PAN of up to 16 digits); EMV common
      session key on ATC; padding method 2; ARPC method 2 (CSU) under the session key.
    * ``MC_16``: Option A ICC key; Mastercard proprietary SKD (EMV common derivation on
      ATC||0000||UN); padding method 2; ARPC method 1 under the ICC master key.
    """

    VISA_10 = "10"
    VISA_18 = "18"
    MC_16 = "mc16"


class ArpcMethod(enum.IntEnum):
    """EMV Book 2 ARPC methods."""

    #: ARPC = TDES(key, ARQC xor ARC||00..00), 8 bytes.
    METHOD_1 = 1
    #: ARPC = MAC(key, ARQC || CSU || proprietary data)[:4].
    METHOD_2 = 2


#: ARPC method each CVN uses.
CVN_ARPC_METHOD: dict[Cvn, ArpcMethod] = {
    Cvn.VISA_10: ArpcMethod.METHOD_1,
    Cvn.VISA_18: ArpcMethod.METHOD_2,
    Cvn.MC_16: ArpcMethod.METHOD_1,
}


@dataclass(frozen=True)
class EmvCard:
    """Which card key an EMV command works with: the issuer key, the scheme's CVN, the card.

    Attributes:
        imk: label of the issuer master key for AC (usage ``imk-ac``).
        cvn: cryptogram version (from the Issuer Application Data, tag 9F10).
        pan: application PAN (tag 5A).
        psn: PAN sequence number (tag 5F34), two digits.
    """

    imk: str
    cvn: Cvn
    pan: str
    psn: str = "00"

    def __repr__(self) -> str:
        return (
            f"EmvCard(imk={self.imk!r}, cvn={self.cvn.value!r}, pan={mask_pan(self.pan)!r}, "
            f"psn={self.psn!r})"
        )


@dataclass(frozen=True)
class ArpcRequest:
    """Data an ARPC is computed over, besides the ARQC.

    Method 1 (CVN 10, MC 16) takes ``arc`` (2 bytes, the authorisation response code the card
    sees); method 2 (CVN 18) takes ``csu`` (4 bytes) and optional proprietary authentication
    data (0 to 8 bytes).
    """

    arc: bytes | None = None
    csu: bytes | None = None
    proprietary_auth_data: bytes = b""


#: DE55 tags (hex names) the ARQC commands read: the tags every supported CVN MACs, in order
#: (EMV Book 2 recommended minimum set), then the cryptogram, ATC, unpredictable number and
#: Issuer Application Data.
ARQC_COMMON_TAGS = ("9F02", "9F03", "9F1A", "95", "5F2A", "9A", "9C", "9F37", "82", "9F36")
TAG_ARQC, TAG_ATC, TAG_UN, TAG_IAD = "9F26", "9F36", "9F37", "9F10"


def arqc_data(cvn: Cvn, tags: Mapping[str, bytes]) -> bytes:
    """Assemble the data the CVN's AC covers from DE55 tag values (tag names in hex).

    The common tags (``ARQC_COMMON_TAGS``) in order, then from the Issuer Application Data
    (9F10): the 4-byte CVR (Visa CVN 10, IAD bytes 4-7), the whole IAD (Visa CVN 18), or the
    6-byte CVR (Mastercard CVN 16, IAD bytes 3-8).

    Raises:
        InvalidInput: a tag is missing or the IAD is too short.
    """
    wanted = {name.upper(): value for name, value in tags.items()}
    for tag in (*ARQC_COMMON_TAGS, TAG_IAD):
        if tag not in wanted:
            raise InvalidInput(f"tag {tag}", "missing")
    parts = [wanted[tag] for tag in ARQC_COMMON_TAGS]
    iad = wanted[TAG_IAD]
    if cvn is Cvn.VISA_10:
        if len(iad) < 7:
            raise InvalidInput(f"tag {TAG_IAD}", "too short for CVN 10")
        parts.append(iad[3:7])
    elif cvn is Cvn.VISA_18:
        parts.append(iad)
    else:
        if len(iad) < 8:
            raise InvalidInput(f"tag {TAG_IAD}", "too short for CVN 16")
        parts.append(iad[2:8])
    return b"".join(parts)


@dataclass(frozen=True)
class ArqcVerification:
    """Verify an ARQC and, if asked and it verifies, compute the ARPC.

    Attributes:
        card: the card key (issuer key, CVN, PAN, PSN).
        atc: application transaction counter (tag 9F36), 2 bytes.
        transaction_data: the data the card MACed, assembled in the CVN's order (see
            ``arqc_data``; ``from_tags`` builds the whole request from DE55), unpadded.
        arqc: the cryptogram (tag 9F26), 8 bytes.
        un: unpredictable number (tag 9F37), 4 bytes; required by ``MC_16``.
        arpc: if given, the ARPC is returned in the result when the ARQC verifies.
    """

    card: EmvCard
    atc: bytes
    transaction_data: bytes = field(repr=False)
    arqc: bytes = field(repr=False)
    un: bytes = b""
    arpc: ArpcRequest | None = None

    @classmethod
    def from_tags(
        cls, card: EmvCard, tags: Mapping[str, bytes], arpc: ArpcRequest | None = None
    ) -> ArqcVerification:
        """The verification of the ARQC in DE55 tag values (tag names in hex).

        Takes the ARQC (9F26), the ATC (9F36), the unpredictable number (9F37, empty when
        absent) and the transaction data the card's CVN MACs (``arqc_data``).

        Raises:
            InvalidInput: a tag is missing or the IAD is too short.
        """
        wanted = {name.upper(): value for name, value in tags.items()}
        for tag in (TAG_ARQC, TAG_ATC):
            if tag not in wanted:
                raise InvalidInput(f"tag {tag}", "missing")
        return cls(
            card=card,
            atc=wanted[TAG_ATC],
            transaction_data=arqc_data(card.cvn, wanted),
            arqc=wanted[TAG_ARQC],
            un=wanted.get(TAG_UN, b""),
            arpc=arpc,
        )


@dataclass(frozen=True)
class ArqcGeneration:
    """Compute the ARQC a card would send (tests, CLI, acquirer simulators)."""

    card: EmvCard
    atc: bytes
    transaction_data: bytes = field(repr=False)
    un: bytes = b""


@dataclass(frozen=True)
class ArpcGeneration:
    """Compute an ARPC for an ARQC already verified (e.g. once the decision is known)."""

    card: EmvCard
    atc: bytes
    arqc: bytes = field(repr=False)
    arpc: ArpcRequest
    un: bytes = b""


@dataclass(frozen=True)
class ArqcResult:
    """Outcome of an ARQC verification; ``arpc`` is set when asked for and ``ok``."""

    ok: bool
    reason: VerifyReason | None = None
    arpc: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class EmvKeyCheckValues:
    """Check values of the keys an EMV command derives (personalisation and test checks).

    ``session_key`` is the key the AC is computed under: for CVN 10 it is the ICC master key.
    """

    icc_master_key: str
    session_key: str


@dataclass(frozen=True)
class EmvKeyCheck:
    """Ask for the check values of the keys an EMV command derives for ``card`` at ``atc``
    (and ``un``, which ``MC_16`` needs)."""

    card: EmvCard
    atc: bytes
    un: bytes = b""


@dataclass(frozen=True, repr=False)
class Fingerprint(_MaskedRepr):
    """HMAC-SHA-256 of ``data`` (a PAN's bytes, typically) under the ``hmac`` key ``key``."""

    key: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, repr=False)
class Encryption(_MaskedRepr):
    """AES-GCM encryption of ``plaintext`` bound to ``aad`` under the ``data`` key ``key``."""

    key: str
    plaintext: bytes = field(repr=False)
    aad: bytes = field(repr=False)


@dataclass(frozen=True, repr=False)
class Decryption(_MaskedRepr):
    """AES-GCM decryption of a blob ``Encryption`` produced, with the same ``aad``."""

    key: str
    blob: bytes = field(repr=False)
    aad: bytes = field(repr=False)


@dataclass(frozen=True, repr=False)
class KeyImport(_MaskedRepr):
    """Import the clear key ``value`` (development and test keys only).

    ``algorithm`` is needed only when the length does not decide (see ``USAGE_ALGORITHMS``).
    """

    label: str
    usage: KeyUsage
    value: bytes = field(repr=False)
    algorithm: KeyAlgorithm | None = None


class WrappedKeyFormat(enum.StrEnum):
    """How a key received under a key-encrypting key (KEK, a zone master key) is encoded."""

    #: Hex of the key's value encrypted in ECB mode under the KEK (TDES, or AES for an AES
    #: KEK), no key variant: the classic "key under ZMK" of network key exchange.
    ECB = "ecb"
    #: A TR-31 (ANSI X9.143) key block protected by the KEK: version B for a TDES KEK,
    #: D for an AES one (A and C, the variant method, are refused).
    TR31 = "tr31"


@dataclass(frozen=True, repr=False)
class WrappedKeyImport(_MaskedRepr):
    """Import a key sent encrypted under the KEK ``kek`` (network key exchange).

    ``algorithm`` is needed only when neither the length nor a TR-31 header decides it;
    ``kcv``, when given, is the check value the sender computed: the import is refused
    (``KeyCheckFailed``, nothing kept) unless the imported key has it.
    """

    label: str
    usage: KeyUsage
    kek: str
    format: WrappedKeyFormat
    wrapped: str = field(repr=False)
    algorithm: KeyAlgorithm | None = None
    kcv: str | None = None


@dataclass(frozen=True)
class KeyGeneration:
    """Generate a key inside the HSM; ``algorithm`` defaults to the usage's first."""

    label: str
    usage: KeyUsage
    algorithm: KeyAlgorithm | None = None


@runtime_checkable
class PaymentHsm(Protocol):
    """The payment-security commands: PIN, CVV, PVV/IBM offset and EMV; coroutines for trio.

    Every command checks the key's usage (``KeyUsageError``), validates inputs
    (``InvalidInput``) and may raise ``KeyNotFound``, ``HsmUnavailable`` and ``HsmTimeout``.
    """

    async def verify_pin(self, req: PinVerification) -> VerifyResult:
        """Verify the PIN in an encrypted PIN block by Visa PVV or IBM 3624 offset.

        Returns:
            ``ok``; ``MISMATCH`` for a wrong PIN; ``PIN_BLOCK_INVALID`` when the block does not
            decrypt to a well-formed block of its format.
        """
        ...

    async def translate_pin(self, req: PinTranslation) -> bytes:
        """Return the PIN block re-encrypted under the destination key and format.

        Raises:
            InvalidInput: the source block is not well-formed once decrypted.
        """
        ...

    async def generate_pvv(self, req: PvvGeneration) -> str:
        """Return the 4-digit Visa PVV of ``req.pin`` (provisioning; takes a clear PIN)."""
        ...

    async def generate_ibm_offset(self, req: IbmOffsetGeneration) -> str:
        """Return the IBM 3624 offset of ``req.pin`` (as long as the PIN; provisioning)."""
        ...

    async def generate_cvv(self, req: CvvGeneration) -> str:
        """Return the 3-digit CVV; service code ``000`` gives CVV2, ``999`` iCVV."""
        ...

    async def verify_cvv(self, req: CvvVerification) -> VerifyResult:
        """Verify a CVV/CVV2/iCVV; a wrong value is ``MISMATCH``."""
        ...

    async def verify_arqc(self, req: ArqcVerification) -> ArqcResult:
        """Verify an ARQC under the card's session key; compute the ARPC when asked."""
        ...

    async def generate_arqc(self, req: ArqcGeneration) -> bytes:
        """Return the 8-byte ARQC the card would compute over ``transaction_data``."""
        ...

    async def generate_arpc(self, req: ArpcGeneration) -> bytes:
        """Return the ARPC (8 bytes for method 1, 4 for method 2) for ``req.arqc``."""
        ...

    async def emv_key_check_values(self, req: EmvKeyCheck) -> EmvKeyCheckValues:
        """Return the check values of the derived ICC master key and AC session key."""
        ...


@runtime_checkable
class CardDataCrypto(Protocol):
    """Keyed fingerprint and authenticated encryption of card data at rest (``hsm.carddata``)."""

    async def fingerprint(self, req: Fingerprint) -> bytes:
        """Return HMAC-SHA-256 of ``req.data`` under an ``hmac`` key (32 bytes)."""
        ...

    async def encrypt(self, req: Encryption) -> bytes:
        """AES-GCM encrypt under a ``data`` key; returns nonce (12) || ciphertext || tag (16)."""
        ...

    async def decrypt(self, req: Decryption) -> bytes:
        """Inverse of ``encrypt``.

        Raises:
            DecryptionFailed: wrong key, wrong ``aad`` or tampered blob.
        """
        ...


@runtime_checkable
class KeyAdmin(Protocol):
    """Key custody: import, generation, listing, check values and deletion."""

    async def import_key(self, req: KeyImport) -> KeyInfo:
        """Import a clear key (development and test keys only) and return its KCV.

        Raises:
            KeyExists: the label is taken.
            InvalidInput: the length does not fit the usage/algorithm.
        """
        ...

    async def import_wrapped_key(self, req: WrappedKeyImport) -> KeyInfo:
        """Import a key encrypted under a KEK of the HSM and return its KCV.

        Raises:
            KeyExists: the label is taken.
            KeyNotFound: no such KEK.
            KeyUsageError: ``req.kek`` is not a KEK.
            InvalidInput: the encrypted value or key block is malformed, does not open
                under the KEK (bad MAC), or carries a key whose usage or length does not fit.
            KeyCheckFailed: the key's check value differs from ``req.kcv``.
        """
        ...

    async def generate_key(self, req: KeyGeneration) -> KeyInfo:
        """Generate a random key inside the HSM and return its KCV.

        Raises:
            KeyExists: the label is taken.
        """
        ...

    async def list_keys(self) -> list[KeyInfo]:
        """Return every key's label, usage, algorithm and KCV, sorted by label."""
        ...

    async def key_check_value(self, label: str) -> str:
        """Return the key's 6-hex-digit KCV."""
        ...

    async def delete_key(self, label: str) -> None:
        """Destroy a key."""
        ...


@runtime_checkable
class Hsm(PaymentHsm, CardDataCrypto, KeyAdmin, Protocol):
    """Everything a backend offers: the three command families and closing the session.

    Callers that need one family only should ask for that Protocol (the pipeline needs
    ``PaymentHsm``, a vault ``CardDataCrypto``, the key custodian's CLI ``KeyAdmin``).
    """

    async def aclose(self) -> None:
        """Release the HSM (log out, close the session); idempotent."""
        ...


# --------------------------------------------------------------------------- validation
# Shared by the backends so that both reject exactly the same inputs.


def check_digits(name: str, value: str, min_len: int, max_len: int | None = None) -> None:
    """Raise ``InvalidInput`` unless ``value`` is ``min_len``..``max_len`` ASCII digits."""
    upper = min_len if max_len is None else max_len
    if not is_digits(value):
        raise InvalidInput(name, "must be decimal digits")
    if not min_len <= len(value) <= upper:
        span = str(min_len) if min_len == upper else f"{min_len} to {upper}"
        raise InvalidInput(name, f"must be {span} digits")


def check_hex(name: str, value: str, min_len: int, max_len: int | None = None) -> None:
    """Raise ``InvalidInput`` unless ``value`` is ``min_len``..``max_len`` hex digits."""
    upper = min_len if max_len is None else max_len
    if not value.isascii() or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise InvalidInput(name, "must be hex digits")
    if not min_len <= len(value) <= upper:
        span = str(min_len) if min_len == upper else f"{min_len} to {upper}"
        raise InvalidInput(name, f"must be {span} hex digits")


def check_pan(pan: str) -> None:
    """Raise ``InvalidInput`` unless ``pan`` is 12 to 19 digits."""
    check_digits("pan", pan, PAN_MIN_DIGITS, PAN_MAX_DIGITS)


def check_bytes(name: str, value: bytes, *lengths: int) -> None:
    """Raise ``InvalidInput`` unless ``value`` is bytes of one of ``lengths``."""
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput(name, "must be bytes")
    if len(value) not in lengths:
        allowed = " or ".join(str(n) for n in lengths)
        raise InvalidInput(name, f"must be {allowed} bytes")


def check_label(label: str) -> None:
    """Raise ``InvalidInput`` unless ``label`` is 1-64 printable ASCII characters."""
    if not label or len(label) > 64 or not label.isascii() or not label.isprintable():
        raise InvalidInput("label", "must be 1 to 64 printable ASCII characters")


def resolve_algorithm(
    usage: KeyUsage, algorithm: KeyAlgorithm | None, value_len: int | None
) -> KeyAlgorithm:
    """Pick and check the algorithm of a key being imported (``value_len``) or generated.

    Raises:
        InvalidInput: the algorithm is not allowed for the usage, or the length does not fit.
    """
    allowed = USAGE_ALGORITHMS[usage]
    if algorithm is None:
        if value_len is None:
            algorithm = allowed[0]
        else:
            fitting = [a for a in allowed if _length_fits(a, value_len)]
            if not fitting:
                raise InvalidInput("value", f"length {value_len} does not fit usage {usage}")
            algorithm = fitting[0]
    if algorithm not in allowed:
        raise InvalidInput("algorithm", f"{algorithm} is not allowed for usage {usage}")
    if value_len is not None and not _length_fits(algorithm, value_len):
        raise InvalidInput("value", f"length {value_len} does not fit {algorithm}")
    return algorithm


def _length_fits(algorithm: KeyAlgorithm, n: int) -> bool:
    if algorithm is KeyAlgorithm.HMAC_SHA256:
        return HMAC_KEY_MIN <= n <= HMAC_KEY_MAX
    return KEY_LENGTHS[algorithm] == n
