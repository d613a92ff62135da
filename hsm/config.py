"""Configuration of the HSM layer: which HSM to open and how card data at rest is protected.

What lives here: ``HsmConfig`` (backend, PKCS#11 module and token, timeout, offload) and
``CardDataConfig`` (fingerprint and encryption keys, HSM or KMS), frozen dataclasses with their
defaults, and ``DEFAULT_OFFLOAD``, the one owner of the offload default.

What does not: reading TOML (``switch.config`` loads these sections into its ``Config`` as they
are: its loader introspects the fields and their type hints, so every field here is one of the
types it converts, and the ``Literal`` aliases are module globals it can resolve), opening the
HSM (``hsm.token``) or a vault (``hsm.carddata``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HsmBackend = Literal["pkcs11", "software"]
CardDataBackend = Literal["hsm", "kms"]

#: Whether PKCS#11 commands run in a worker thread (True) or on the event loop (False) unless
#: told otherwise: ``HsmConfig.offload`` and ``hsm.pkcs11.Pkcs11Hsm`` both default to it. For an
#: in-process token such as SoftHSM, inline is faster: the token serialises commands and holds
#: the GIL, so the hop only adds its cost (benchmarks/reports/load.md against
#: load_hsm_offload.md: 1018 vs 752 auth/s at 8 in flight, 0.95 vs 1.30 CPU-ms per auth).
#: Offload a network-attached token, so that a stuck command can be abandoned on timeout.
DEFAULT_OFFLOAD = False


@dataclass(frozen=True)
class HsmConfig:
    """Which HSM the card-security commands go to."""

    backend: HsmBackend = "pkcs11"
    #: PKCS#11 module; Debian's softhsm2 package installs it here.
    module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    token_label: str = "cardswitch-dev"  # noqa: S105 - a label, not a secret
    #: User PIN of the token. Development only: production reads it from CARDSWITCH_HSM_PIN.
    user_pin: str = "1234"
    so_pin: str = "12345678"
    #: SOFTHSM2_CONF written by `cardswitch hsm init`, with its token directory under var/.
    softhsm_conf: Path = Path("var/softhsm/softhsm2.conf")
    #: Seconds one HSM command may take before it counts as unavailable.
    timeout: float = 1.0
    #: Run PKCS#11 commands in a worker thread (true) or on the event loop (false); see
    #: ``DEFAULT_OFFLOAD``.
    offload: bool = DEFAULT_OFFLOAD


@dataclass(frozen=True)
class CardDataConfig:
    """Protection of card data at rest: PAN fingerprint key and PAN encryption."""

    backend: CardDataBackend = "hsm"
    #: Label of the HMAC key in the HSM that fingerprints PANs for lookup.
    fingerprint_key: str = "pan-fingerprint"
    #: Label of the AES key in the HSM that encrypts PANs (backend "hsm").
    encryption_key: str = "pan-encryption"
    #: KMS key id or alias (backend "kms").
    kms_key_id: str = "alias/cardswitch-pan"
    #: KMS HMAC_256 key that fingerprints PANs (backend "kms").
    kms_mac_key_id: str = "alias/cardswitch-pan-fingerprint"
    #: KMS endpoint override (a moto server in tests); empty uses the AWS default.
    kms_endpoint: str = ""
    kms_region: str = "eu-west-1"


__all__ = ["DEFAULT_OFFLOAD", "CardDataBackend", "CardDataConfig", "HsmBackend", "HsmConfig"]
