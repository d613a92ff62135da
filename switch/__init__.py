"""cardswitch: an ISO 8583 issuer authorization switch.

The package holds the daemon (server, pipeline, store), the wire protocol (``switch.wire``) and
the CLI (``python -m switch`` / ``cardswitch``). Card-security cryptography lives in ``hsm``.
"""

__version__ = "0.1.0"
