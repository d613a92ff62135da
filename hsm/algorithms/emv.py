"""EMV application cryptograms: card key and session key derivation, ARQC, ARPC.

What lives here, over a ``BlockCipher`` (EMV 4.3 Book 2 Annex A1, scheme CVNs):
    * ICC master key derivation, Option A (and Option B, which Visa CVN 18 uses for PANs
      longer than 16 digits): the key is TDES(IMK, Y || Y xor FF..FF), derived with
      ``derive_tdes`` so a token keeps it inside.
    * EMV common session key derivation: TDES(MK, R with F0 in byte 3 || R with 0F in byte 3)
      on the diversifier R = ATC || 00..00 (CVN 18) or ATC || 0000 || UN (Mastercard SKD).
    * AC = ISO/IEC 9797-1 MAC algorithm 3 over the padded transaction data (padding method 1
      for Visa CVN 10, method 2 otherwise), ARPC methods 1 and 2.

Each derived key comes with its left half as a single-DES key, derived directly from the parent
(TDES(MK, D || D)) rather than split from the child, so no key value ever leaves the primitive.

What does not: key storage, ISO 8583 or BER-TLV parsing (``switch.wire.emv``), assembling the
transaction data from DE55 tag values (``hsm.api.arqc_data``, part of the command interface).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic

from hsm.algorithms.primitive import (
    DES_BLOCK,
    BlockCipher,
    K,
    TdesKey,
    pad_method_1,
    pad_method_2,
    retail_mac,
    xor,
)
from hsm.api import CVN_ARPC_METHOD, ArpcMethod, ArpcRequest, Cvn
from hsm.errors import InvalidInput
from hsm.pan import PAN_MAX_DIGITS, PAN_MIN_DIGITS, is_digits, is_pan

#: Digits of Y, the card's identifying block for Option A/B.
_Y_DIGITS = 16
#: Bytes of an ATC, an unpredictable number, an ARC, a CSU; most proprietary auth data.
ATC_BYTES = 2
UN_BYTES = 4
ARC_BYTES = 2
CSU_BYTES = 4
PROPRIETARY_MAX = 8
#: Bytes of an AC and of a method-2 ARPC.
AC_BYTES = 8
ARPC2_BYTES = 4
#: Byte position set to F0/0F in the diversifier for the left/right session key half.
_DIVERSIFIER_POS = 2


def option_a_block(pan: str, psn: str) -> bytes:
    """Y for Option A: the 16 rightmost digits of PAN || PSN, left-padded with zeros."""
    digits = (pan + psn)[-_Y_DIGITS:].rjust(_Y_DIGITS, "0")
    return bytes.fromhex(digits)


def option_b_block(pan: str, psn: str) -> bytes:
    """Y for Option B: Option A for a PAN of up to 16 digits, else SHA-1 of PAN || PSN
    (left-padded to an even number of digits) decimalized: its decimal digits, then its
    letters as 0-5, the first 16 of them.
    """
    if len(pan) <= _Y_DIGITS:
        return option_a_block(pan, psn)
    digits = pan + psn
    if len(digits) % 2:
        digits = "0" + digits
    hashed = hashlib.sha1(bytes.fromhex(digits)).hexdigest().upper()  # noqa: S324 - EMV Option B
    decimal = [h for h in hashed if h.isdigit()]
    if len(decimal) < _Y_DIGITS:
        decimal += [str(int(h, 16) - 10) for h in hashed if not h.isdigit()]
    return bytes.fromhex("".join(decimal[:_Y_DIGITS]))


def icc_block(cvn: Cvn, pan: str, psn: str) -> bytes:
    """The Y block the CVN's ICC master key derivation uses."""
    if cvn is Cvn.VISA_18:
        return option_b_block(pan, psn)
    return option_a_block(pan, psn)


def _derive_pair(cipher: BlockCipher[K], parent: K, left: bytes, right: bytes) -> TdesKey[K]:
    full = cipher.derive_tdes(parent, left + right)
    try:
        half = cipher.derive_tdes(parent, left + left)
    except BaseException:
        cipher.release(full)
        raise
    return TdesKey(full, half)


def derive_icc_master_key(cipher: BlockCipher[K], imk: K, y: bytes) -> TdesKey[K]:
    """ICC master key TDES(IMK, Y) || TDES(IMK, Y xor FF..FF); release both handles after use."""
    return _derive_pair(cipher, imk, y, xor(y, b"\xff" * DES_BLOCK))


def derive_common_session_key(cipher: BlockCipher[K], mk: K, r: bytes) -> TdesKey[K]:
    """EMV common session key on the 8-byte diversifier ``r``; release after use."""
    left = r[:_DIVERSIFIER_POS] + b"\xf0" + r[_DIVERSIFIER_POS + 1 :]
    right = r[:_DIVERSIFIER_POS] + b"\x0f" + r[_DIVERSIFIER_POS + 1 :]
    return _derive_pair(cipher, mk, left, right)


def session_diversifier(cvn: Cvn, atc: bytes, un: bytes) -> bytes | None:
    """The session key diversifier of the CVN, or None when the ICC master key is used."""
    if cvn is Cvn.VISA_18:
        return atc + bytes(6)
    if cvn is Cvn.MC_16:
        return atc + bytes(2) + un
    return None


@dataclass(frozen=True)
class CardKeys(Generic[K]):
    """The keys one EMV command uses: ICC master key, AC key, ARPC key (handles)."""

    icc: TdesKey[K]
    ac: TdesKey[K]
    arpc: TdesKey[K]


def check_emv_inputs(cvn: Cvn, pan: str, psn: str, atc: bytes, un: bytes) -> None:
    """Validate the card and counter inputs of an EMV command.

    Raises:
        InvalidInput: PAN not 12-19 digits, PSN not 2 digits, ATC not 2 bytes, UN not 4 bytes
            where the CVN needs it.
    """
    if not is_pan(pan):
        raise InvalidInput("pan", f"must be {PAN_MIN_DIGITS} to {PAN_MAX_DIGITS} digits")
    if not is_digits(psn) or len(psn) != 2:
        raise InvalidInput("psn", "must be 2 digits")
    if len(atc) != ATC_BYTES:
        raise InvalidInput("atc", f"must be {ATC_BYTES} bytes")
    if cvn is Cvn.MC_16 and len(un) != UN_BYTES:
        raise InvalidInput("un", f"must be {UN_BYTES} bytes for this CVN")
    if un and len(un) != UN_BYTES:
        raise InvalidInput("un", f"must be {UN_BYTES} bytes")


@contextmanager
def card_keys(
    cipher: BlockCipher[K],
    imk: K,
    cvn: Cvn,
    *,
    pan: str,
    psn: str,
    atc: bytes,
    un: bytes,
) -> Iterator[CardKeys[K]]:
    """Derive the ICC master key and the CVN's session key; release them on exit."""
    check_emv_inputs(cvn, pan, psn, atc, un)
    icc = derive_icc_master_key(cipher, imk, icc_block(cvn, pan, psn))
    owned = [icc.full, icc.left]
    try:
        diversifier = session_diversifier(cvn, atc, un)
        if diversifier is None:
            session = icc
        else:
            session = derive_common_session_key(cipher, icc.full, diversifier)
            owned += [session.full, session.left]
        # Visa CVN 18 computes the ARPC under the session key; CVN 10 and MC CVN 16 under
        # the ICC master key (no ARPC session key).
        arpc_key = session if cvn is Cvn.VISA_18 else icc
        yield CardKeys(icc, session, arpc_key)
    finally:
        for handle in owned:
            cipher.release(handle)


def application_cryptogram(
    cipher: BlockCipher[K], keys: CardKeys[K], cvn: Cvn, data: bytes
) -> bytes:
    """The 8-byte AC (ARQC/TC/AAC) over ``data`` as the CVN pads and MACs it."""
    padded = pad_method_1(data) if cvn is Cvn.VISA_10 else pad_method_2(data)
    return retail_mac(cipher, keys.ac, padded)


def check_arpc_request(cvn: Cvn, req: ArpcRequest) -> None:
    """Raise ``InvalidInput`` unless ``req`` carries what the CVN's ARPC method needs."""
    if CVN_ARPC_METHOD[cvn] is ArpcMethod.METHOD_1:
        if req.arc is None or len(req.arc) != ARC_BYTES:
            raise InvalidInput("arc", f"must be {ARC_BYTES} bytes for ARPC method 1")
        if req.csu is not None or req.proprietary_auth_data:
            raise InvalidInput("csu", "not used by ARPC method 1")
    else:
        if req.csu is None or len(req.csu) != CSU_BYTES:
            raise InvalidInput("csu", f"must be {CSU_BYTES} bytes for ARPC method 2")
        if len(req.proprietary_auth_data) > PROPRIETARY_MAX:
            raise InvalidInput("proprietary_auth_data", f"at most {PROPRIETARY_MAX} bytes")
        if req.arc is not None:
            raise InvalidInput("arc", "not used by ARPC method 2")


def arpc(
    cipher: BlockCipher[K], keys: CardKeys[K], cvn: Cvn, arqc: bytes, req: ArpcRequest
) -> bytes:
    """The ARPC for ``arqc``: method 1 (8 bytes) or method 2 (4 bytes) as the CVN uses."""
    check_arpc_request(cvn, req)
    if CVN_ARPC_METHOD[cvn] is ArpcMethod.METHOD_1:
        assert req.arc is not None
        return cipher.encrypt_block(keys.arpc.full, xor(arqc, req.arc + bytes(6)))
    assert req.csu is not None
    data = pad_method_2(arqc + req.csu + req.proprietary_auth_data)
    return retail_mac(cipher, keys.arpc, data)[:ARPC2_BYTES]
