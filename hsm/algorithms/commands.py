"""The payment commands as synchronous compositions, shared by every backend.

What lives here: ``Commands``, which validates inputs, checks each key's usage and composes
the algorithms of this package over a backend's ``BlockCipher`` and key lookup. A backend
wraps it in its ``Hsm`` (async, locking, threads); the software and PKCS#11 backends run the
very same code, so they differ only in where the block operations happen.

What does not: key storage, card-data commands (HMAC fingerprint, AES-GCM), async and
locking (the backends), the command interface (``hsm.api``).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic

from hsm.algorithms import cvv as cvv_alg
from hsm.algorithms import emv, pin, pinblock
from hsm.algorithms.pinblock import RandomBytes, wipe
from hsm.algorithms.primitive import DES_BLOCK, BlockCipher, K, TdesKey, kcv
from hsm.api import (
    AES_ALGORITHMS,
    TDES_ALGORITHMS,
    ArpcGeneration,
    ArqcGeneration,
    ArqcResult,
    ArqcVerification,
    EmvCard,
    EmvKeyCheckValues,
    KeyInfo,
    KeyUsage,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvReference,
    VerifyReason,
    VerifyResult,
    check_bytes,
    check_digits,
    check_pan,
)
from hsm.errors import KeyUsageError

#: Lengths of the inputs checked here.
PVKI_DIGITS = 1
EXPIRY_DIGITS = 4
SERVICE_CODE_DIGITS = 3
DEC_TABLE_DIGITS = 16
OFFSET_MIN, OFFSET_MAX = 4, 12


@dataclass(frozen=True)
class StoredKey(Generic[K]):
    """A key as a backend holds it: public information and handles.

    ``left`` is the key's left half as a single-DES key (KL||KL), kept for CVKs, whose CVV
    needs a single-DES step; ``None`` for other keys.
    """

    info: KeyInfo
    handle: K
    left: K | None = None

    def __repr__(self) -> str:
        return f"StoredKey({self.info!r})"


class Commands(Generic[K]):
    """Payment commands over one backend's primitive and key lookup (synchronous)."""

    def __init__(
        self,
        cipher: BlockCipher[K],
        lookup: Callable[[str], StoredKey[K]],
        rng: RandomBytes = secrets.token_bytes,
    ) -> None:
        """Args:
        cipher: the backend's block primitive.
        lookup: returns the stored key for a label; raises ``KeyNotFound``.
        rng: random bytes for PIN block fill.
        """
        self._cipher = cipher
        self._lookup = lookup
        self._rng = rng

    # ------------------------------------------------------------------ keys
    def key(self, label: str, usage: KeyUsage) -> StoredKey[K]:
        """Look a key up and check its usage.

        Raises:
            KeyNotFound: no such label.
            KeyUsageError: the key's usage differs.
        """
        stored = self._lookup(label)
        if stored.info.usage is not usage:
            raise KeyUsageError(label, str(usage), str(stored.info.usage))
        return stored

    def _tdes_pair(self, label: str, usage: KeyUsage) -> TdesKey[K]:
        stored = self.key(label, usage)
        if stored.left is None:
            raise KeyUsageError(label, "a double-length key with its left half", "another key")
        return TdesKey(stored.handle, stored.left)

    def _zpk(self, label: str, fmt: PinBlockFormat) -> K:
        stored = self.key(label, KeyUsage.ZPK)
        needed = AES_ALGORITHMS if fmt is PinBlockFormat.ISO_4 else TDES_ALGORITHMS
        if stored.info.algorithm not in needed:
            family = "an AES" if fmt is PinBlockFormat.ISO_4 else "a TDES"
            raise KeyUsageError(label, f"{family} zpk for format {int(fmt)}", "another algorithm")
        return stored.handle

    # ------------------------------------------------------------------ PIN
    def _check_pan_for(self, fmt: PinBlockFormat, pan: str) -> None:
        if fmt is not PinBlockFormat.ISO_1 or pan:
            check_pan(pan)

    def _decrypt_pin(self, zpk: str, fmt: PinBlockFormat, block: bytes, pan: str) -> bytearray:
        fmt = PinBlockFormat(fmt)
        self._check_pan_for(fmt, pan)
        check_bytes("pin_block", block, 16 if fmt is PinBlockFormat.ISO_4 else DES_BLOCK)
        return pinblock.decrypt(self._cipher, self._zpk(zpk, fmt), fmt, bytes(block), pan)

    def verify_pin(self, req: PinVerification) -> VerifyResult:
        """See ``Hsm.verify_pin``."""
        ref = req.reference
        check_pan(req.pan)
        if isinstance(ref, PvvReference):
            check_digits("pvki", ref.pvki, PVKI_DIGITS)
            check_digits("pvv", ref.pvv, pin.PVV_DIGITS)
            pvk = self.key(ref.pvk, KeyUsage.PVK).handle
        else:
            self._check_ibm(ref.dec_table, ref.offset)
            validation = pin.expand_validation_data(ref.validation_data, req.pan)
            pvk = self.key(ref.pvk, KeyUsage.PVK).handle
        try:
            clear = self._decrypt_pin(req.zpk, req.format, req.pin_block, req.pan)
        except pinblock.PinBlockError:
            return VerifyResult.failure(VerifyReason.PIN_BLOCK_INVALID)
        try:
            if isinstance(ref, PvvReference):
                computed = pin.pvv(self._cipher, pvk, req.pan, ref.pvki, clear)
                ok = hmac.compare_digest(computed.encode(), ref.pvv.encode())
            else:
                ok = pin.ibm3624_check(
                    self._cipher,
                    pvk,
                    dec_table=ref.dec_table,
                    validation=validation,
                    offset=ref.offset,
                    pin=clear,
                )
        finally:
            wipe(clear)
        return VerifyResult.success() if ok else VerifyResult.failure()

    def translate_pin(self, req: PinTranslation) -> bytes:
        """See ``Hsm.translate_pin``."""
        dest_fmt = PinBlockFormat(req.destination_format)
        self._check_pan_for(dest_fmt, req.pan)
        dest = self._zpk(req.destination_zpk, dest_fmt)
        clear = self._decrypt_pin(req.source_zpk, req.source_format, req.pin_block, req.pan)
        try:
            return pinblock.encrypt(self._cipher, dest, dest_fmt, clear, req.pan, rng=self._rng)
        finally:
            wipe(clear)

    @staticmethod
    def _check_ibm(dec_table: str, offset: str) -> None:
        check_digits("dec_table", dec_table, DEC_TABLE_DIGITS)
        check_digits("offset", offset, OFFSET_MIN, OFFSET_MAX)

    def generate_pvv(self, pvk: str, pan: str, pvki: str, pin_digits: str) -> str:
        """See ``Hsm.generate_pvv``."""
        check_pan(pan)
        check_digits("pvki", pvki, PVKI_DIGITS)
        clear = pinblock.pin_from_str(pin_digits)
        try:
            return pin.pvv(self._cipher, self.key(pvk, KeyUsage.PVK).handle, pan, pvki, clear)
        finally:
            wipe(clear)

    def generate_ibm_offset(
        self, pvk: str, pan: str, pin_digits: str, dec_table: str, validation_data: str
    ) -> str:
        """See ``Hsm.generate_ibm_offset``."""
        check_pan(pan)
        check_digits("dec_table", dec_table, DEC_TABLE_DIGITS)
        validation = pin.expand_validation_data(validation_data, pan)
        clear = pinblock.pin_from_str(pin_digits)
        try:
            key = self.key(pvk, KeyUsage.PVK).handle
            return pin.ibm3624_offset(self._cipher, key, dec_table, validation, clear)
        finally:
            wipe(clear)

    # ------------------------------------------------------------------ CVV
    def generate_cvv(self, cvk: str, pan: str, expiry: str, service_code: str) -> str:
        """See ``Hsm.generate_cvv``."""
        check_pan(pan)
        check_digits("expiry", expiry, EXPIRY_DIGITS)
        check_digits("service_code", service_code, SERVICE_CODE_DIGITS)
        key = self._tdes_pair(cvk, KeyUsage.CVK)
        return cvv_alg.cvv(self._cipher, key, pan, expiry, service_code)

    def verify_cvv(
        self, cvk: str, pan: str, expiry: str, service_code: str, cvv: str
    ) -> VerifyResult:
        """See ``Hsm.verify_cvv``."""
        check_digits("cvv", cvv, cvv_alg.CVV_DIGITS)
        computed = self.generate_cvv(cvk, pan, expiry, service_code)
        ok = hmac.compare_digest(computed.encode(), cvv.encode())
        return VerifyResult.success() if ok else VerifyResult.failure()

    # ------------------------------------------------------------------ EMV
    def _imk(self, card: EmvCard) -> K:
        return self.key(card.imk, KeyUsage.IMK_AC).handle

    def verify_arqc(self, req: ArqcVerification) -> ArqcResult:
        """See ``Hsm.verify_arqc``."""
        card = req.card
        check_bytes("arqc", req.arqc, emv.AC_BYTES)
        if req.arpc is not None:
            emv.check_arpc_request(card.cvn, req.arpc)
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            computed = emv.application_cryptogram(
                self._cipher, keys, card.cvn, bytes(req.transaction_data)
            )
            if not hmac.compare_digest(computed, bytes(req.arqc)):
                return ArqcResult(False, VerifyReason.MISMATCH)
            if req.arpc is None:
                return ArqcResult(True)
            return ArqcResult(
                True, arpc=emv.arpc(self._cipher, keys, card.cvn, bytes(req.arqc), req.arpc)
            )

    def generate_arqc(self, req: ArqcGeneration) -> bytes:
        """See ``Hsm.generate_arqc``."""
        card = req.card
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            return emv.application_cryptogram(
                self._cipher, keys, card.cvn, bytes(req.transaction_data)
            )

    def generate_arpc(self, req: ArpcGeneration) -> bytes:
        """See ``Hsm.generate_arpc``."""
        card = req.card
        check_bytes("arqc", req.arqc, emv.AC_BYTES)
        emv.check_arpc_request(card.cvn, req.arpc)
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            return emv.arpc(self._cipher, keys, card.cvn, bytes(req.arqc), req.arpc)

    def emv_key_check_values(self, card: EmvCard, atc: bytes, un: bytes) -> EmvKeyCheckValues:
        """See ``Hsm.emv_key_check_values``."""
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=atc, un=un
        ) as keys:
            return EmvKeyCheckValues(
                icc_master_key=kcv(self._cipher, keys.icc.full),
                session_key=kcv(self._cipher, keys.ac.full),
            )
