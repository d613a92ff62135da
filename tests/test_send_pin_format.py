"""``cardswitch send auth``'s PIN block format: ``--pin-format`` when given, else the
listener's; the block it builds deciphers in psec (an independent implementation)."""

from __future__ import annotations

import pytest
from psec import pinblock as psec_pinblock

from switch.__main__ import build_parser
from switch.cli.send import build_message
from switch.wire.messages import AuthRequest

PAN = "4123456789012345"
AES_ZPK = "00112233445566778899AABBCCDDEEFF"


def _pin_block(listener_format: int, *options: str) -> bytes:
    argv = ["send", "auth", "--pan", PAN, "--amount", "1", "--pin", "1234", "--zpk", AES_ZPK]
    message = build_message(build_parser().parse_args([*argv, *options]), listener_format)
    assert isinstance(message, AuthRequest) and message.pin_block is not None
    return message.pin_block


@pytest.mark.parametrize(
    ("listener_format", "options"),
    [(4, ()), (0, ("--pin-format", "4"))],
    ids=["listener", "option"],
)
def test_send_builds_a_16_byte_format4_block_psec_deciphers(
    listener_format: int, options: tuple[str, ...]
) -> None:
    block = _pin_block(listener_format, *options)
    assert len(block) == 16
    assert psec_pinblock.decipher_pinblock_iso_4(bytes.fromhex(AES_ZPK), block, PAN) == "1234"


def test_send_pin_format_option_overrides_the_listeners_format() -> None:
    assert len(_pin_block(4, "--pin-format", "0")) == 8
