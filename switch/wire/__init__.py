"""The sans-IO ISO 8583 wire layer: framing, specs, typed messages, codec and EMV TLV.

What lives here: the curated public names of the submodules, so callers write
``from switch.wire import decode, AuthRequest``. Nothing here does I/O.

What does not: sockets and TLS (server.py, client.py), decisions (pipeline, decisions.py).
"""

from switch.wire.codec import (
    FormatError,
    decode,
    decode_fields,
    encode,
    format_error_response,
)
from switch.wire.emv import EmvFormatError, Tlv, TlvMap
from switch.wire.framing import FrameDecoder, FramingError, WireError, encode_frame
from switch.wire.messages import (
    AdditionalAmount,
    AuthRequest,
    AuthResponse,
    ErrorResponse,
    MerchantLocation,
    Message,
    NetworkRequest,
    NetworkResponse,
    OriginalData,
    ReversalRequest,
    ReversalResponse,
    Track2,
    UnsupportedMessage,
    is_repeat,
    is_request,
    message_class,
    response_mti,
)
from switch.wire.spec import spec_for

__all__ = [
    "AdditionalAmount",
    "AuthRequest",
    "AuthResponse",
    "EmvFormatError",
    "ErrorResponse",
    "FormatError",
    "FrameDecoder",
    "FramingError",
    "MerchantLocation",
    "Message",
    "NetworkRequest",
    "NetworkResponse",
    "OriginalData",
    "ReversalRequest",
    "ReversalResponse",
    "Tlv",
    "TlvMap",
    "Track2",
    "UnsupportedMessage",
    "WireError",
    "decode",
    "decode_fields",
    "encode",
    "encode_frame",
    "format_error_response",
    "is_repeat",
    "is_request",
    "message_class",
    "response_mti",
    "spec_for",
]
