"""Typed failures of the HSM command layer.

What lives here: the exception hierarchy every backend raises (``HsmError`` and its
subclasses). A verification that simply does not match (wrong PIN, wrong CVV, tampered ARQC)
is *not* an error: it is a ``VerifyResult``/``ArqcResult`` value from ``hsm.api``.

What does not: the result values themselves (``hsm.api``), mapping failures to response codes
(the authorization pipeline decides, typically 91/96 for ``HsmUnavailable``/``HsmTimeout``).

Messages never carry key values, PINs, PIN blocks, cryptograms or full PANs: they name the key
label, the input field and the rule that failed.
"""

from __future__ import annotations


class HsmError(Exception):
    """Base class of every failure raised by an HSM backend."""


class HsmUnavailable(HsmError):
    """The HSM cannot be used: library missing, token absent, login refused, session lost.

    Raised at once, without touching the token, while a lost session is being reopened
    (``hsm.pkcs11``): callers answer by their stand-in policy and retry later.
    """


class HsmConfigError(HsmUnavailable):
    """What the configuration names does not exist: the PKCS#11 module, the SoftHSM
    configuration file, the token (label) or a key. Nothing is created in its place; the
    command line reports it as a configuration error (exit status 2), not as an outage.

    Attributes:
        key: the configuration key at fault (``hsm.token_label``, ``listeners.visa.zpk``...).
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class HsmTimeout(HsmError):
    """A command did not complete within the configured ``hsm.timeout``."""


class KeyNotFound(HsmError):
    """No key with this label exists in the HSM."""

    def __init__(self, label: str) -> None:
        self.label = label
        super().__init__(f"key {label!r} not found")


class KeyExists(HsmError):
    """A key with this label already exists; labels are unique."""

    def __init__(self, label: str) -> None:
        self.label = label
        super().__init__(f"key {label!r} already exists")


class KeyUsageError(HsmError):
    """The key exists but its usage or algorithm does not allow this command."""

    def __init__(self, label: str, expected: str, actual: str) -> None:
        self.label = label
        self.expected = expected
        self.actual = actual
        super().__init__(f"key {label!r} has usage {actual}, this command needs {expected}")


class InvalidInput(HsmError):
    """An input has the wrong length, alphabet or combination.

    Attributes:
        field: the name of the offending input (``"pan"``, ``"pin_block"``, ``"atc"``...).
        reason: what rule it broke; never the value itself.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class DecryptionFailed(HsmError):
    """Authenticated decryption failed: wrong key, wrong associated data or tampered blob."""


class KeyCheckFailed(HsmError):
    """A key received under a key-encrypting key does not have the check value sent with it;
    nothing was kept."""

    def __init__(self, label: str) -> None:
        self.label = label
        super().__init__(f"key {label!r}: check value differs from the one sent")
