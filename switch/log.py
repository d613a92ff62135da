"""Structured JSON logging with card data kept out.

What lives here: structlog configuration for the daemon and the CLI, and the processor that
applies ``hsm.pan.mask_pan`` (first six, last four) and ``hsm.pan.scrub`` (anything PAN-shaped
in free text such as an exception message) to every event before it is rendered. Keys that name
sensitive authentication data (PIN block, CVV, track, cryptogram) are dropped whatever
their value.

What does not: the masking rules themselves (``hsm.pan``, their one owner), deciding what to
log (callers log one line per request in server.py), metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from hsm.pan import mask_pan, scrub

#: Event keys whose values are sensitive authentication data: never rendered.
SENSITIVE_KEYS = frozenset(
    {
        "pin",
        "pin_block",
        "cvv",
        "cvv2",
        "icvv",
        "track2",
        "track1",
        "track",
        "arqc",
        "cryptogram",
        "emv",
        "key",
        "clear_key",
        "raw",
        "frame",
        "body",
    }
)
#: Value types rendered as they are (unless their key is sensitive): nothing to scrub.
_NUMBERS = frozenset({int, float, bool})
#: Event keys whose value is a PAN: rendered masked.
PAN_KEYS = frozenset({"pan", "primary_account_number"})


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes redacted>"
    if isinstance(value, Mapping):
        return {k: _scrub_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def _scrub_item(key: str, value: Any) -> Any:
    lowered = key.lower()
    if lowered in SENSITIVE_KEYS:
        return "<redacted>"
    if lowered in PAN_KEYS and isinstance(value, str):
        return mask_pan(value)
    return _scrub_value(value)


def mask_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact sensitive keys, mask PANs in every string, format and scrub
    exceptions (pyiso8583's DecodeError carries the raw message in its text)."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        if exc_info and exc_info[0] is not None:
            event_dict["exception"] = scrub("".join(traceback.format_exception(*exc_info)))
    for key, value in event_dict.items():  # values replaced in place: the keys do not change
        if value is None or type(value) in _NUMBERS:
            if key.lower() in SENSITIVE_KEYS:
                event_dict[key] = "<redacted>"
        elif type(value) is str:
            lowered = key.lower()
            if lowered in SENSITIVE_KEYS:
                event_dict[key] = "<redacted>"
            else:
                event_dict[key] = mask_pan(value) if lowered in PAN_KEYS else scrub(value)
        else:
            event_dict[key] = _scrub_item(key, value)
    return event_dict


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _dumps(event: Mapping[str, Any], **kw: Any) -> str:
    """One JSON line, keys sorted: orjson (a fifth of the stdlib encoder's time per request
    line), and the stdlib encoder for what orjson refuses (an integer beyond 64 bits), so a
    value can never make logging fail."""
    default = kw.get("default")
    try:
        return orjson.dumps(event, default=default, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(event, default=default, sort_keys=True)


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger it may receive from) for this process."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger carrying ``logger_name=name``.

    Lazy: it follows the configuration in force when it logs, so module-level loggers created
    at import time honour ``configure`` called later.
    """
    return structlog.get_logger(logger_name=name)
