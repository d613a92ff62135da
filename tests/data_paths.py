"""Where the suite's published test data lives (copied into tests/data/, see its README)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
#: Published payment-cryptography vectors, each with its source.
VECTORS_PATH = DATA / "payment_crypto.json"
#: ISO 8583 messages from other projects with their expected fields and licences.
CORPUS_PATH = DATA / "iso8583_messages.json"
