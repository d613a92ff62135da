"""AWS KMS for card data at rest: envelope encryption of the PAN and its keyed fingerprint.

What lives here: ``KmsVault``, which seals a PAN under a fresh AES-256 data key from
``GenerateDataKey`` (AES-GCM done locally with ``cryptography``), unseals it through KMS
``Decrypt``, and fingerprints it with KMS ``GenerateMac`` (HMAC-SHA-256) for lookups; the
versioned blob format; the typed errors of this backend. boto3 is synchronous, so every KMS
call runs in a worker thread (``trio.to_thread.run_sync``) under a dedicated limiter; a
cancelled caller abandons the thread (it ends by its own timeouts and still holds its limiter
slot until then), so a hung KMS cannot hold an answer past the caller's deadline. Transient
failures are retried by botocore (``MAX_ATTEMPTS``, "standard" mode).

What does not: choosing the card-data backend (``hsm.carddata.open_vault``), the card store,
creating KMS keys (an operator or Terraform does that; tests create them on a moto server).

Data key granularity: one data key per sealed record. The encryption context is bound to
the card record (``card_id``) and KMS binds that context to the wrapped data key, so a shared
per-batch key could carry only one context for the whole batch and lose the per-record binding;
a per-record key also limits what one leaked data key exposes. The price, one KMS call per
seal, is paid at provisioning time, not on the authorization path (which needs the
fingerprint and, rarely, an unseal).

Blob format, version 1 (all integers big-endian)::

    0x01 | u16 len(wrapped key) | wrapped key (KMS CiphertextBlob) | 12-byte nonce | GCM ct+tag

The AES-GCM associated data is the header (version, length, wrapped key) followed by the
canonical JSON of the encryption context, so the ciphertext is bound to both its data key and
the card record; the same context is passed to KMS as ``EncryptionContext``.

The plaintext data key and the PAN pass through host memory, as Python ``bytes`` that cannot
be wiped; they are dropped as soon as the operation ends and are never logged or put in an
exception message.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import boto3
import botocore.config
import botocore.exceptions
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm.api import check_pan
from hsm.config import CardDataConfig
from hsm.errors import DecryptionFailed, HsmError, HsmUnavailable, InvalidInput

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

#: First byte of a version-1 blob; a new layout gets a new byte, old blobs stay readable.
BLOB_VERSION_1 = 0x01
#: Version byte plus the 2-byte length of the wrapped data key.
_HEADER = struct.Struct(">BH")
#: AES-GCM nonce length in bytes (96 bits, the size GCM is specified for).
NONCE_LEN = 12
#: AES-GCM authentication tag length in bytes, appended to the ciphertext by ``cryptography``.
TAG_LEN = 16
#: Data key spec requested from KMS: AES-256.
DATA_KEY_SPEC: Final = "AES_256"
#: MAC algorithm of the fingerprint key (a KMS HMAC_256 key with usage GENERATE_VERIFY_MAC).
MAC_ALGORITHM: Final = "HMAC_SHA_256"
#: Encryption-context key naming what the blob holds; always set to ``PURPOSE_PAN`` here.
PURPOSE_KEY = "purpose"
#: Value of ``PURPOSE_KEY`` for a sealed PAN (domain separation from other sealed data).
PURPOSE_PAN = "pan"
#: KMS calls in flight at once from one process (worker threads; boto3 clients are thread-safe).
KMS_CONCURRENCY = 8
#: Seconds to open a connection to KMS and to wait for an answer, per attempt.
CONNECT_TIMEOUT, READ_TIMEOUT = 2.0, 2.0
#: Attempts per KMS call including the first. botocore's "standard" retry mode retries what is
#: transient (throttling, HTTP 500/502/503/504, KMSInternalException, connection errors and
#: timeouts) with jittered exponential backoff, over a fresh connection when the old one
#: broke (its pool drops broken connections); other errors are not retried. A caller with a
#: deadline (the pipeline's budget) abandons the worker thread instead of waiting for it.
MAX_ATTEMPTS = 3
#: KMS error codes meaning "this blob does not open under this context or key".
_INVALID_CIPHERTEXT_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
#: KMS error codes meaning the key named in the configuration is not usable.
_KEY_CODES = frozenset(
    {
        "NotFoundException",
        "DisabledException",
        "KMSInvalidStateException",
        "InvalidKeyUsageException",
    }
)
#: KMS error codes worth retrying later: the service is throttling or degraded.
_RETRYABLE_CODES = frozenset(
    {"ThrottlingException", "KMSInternalException", "DependencyTimeoutException"}
)


class KmsError(HsmError):
    """A KMS card-data operation failed; the message never carries a PAN or key material."""


class KmsUnavailable(KmsError, HsmUnavailable):
    """KMS could not be reached, throttled us or did not answer in time (retryable)."""


class KmsKeyError(KmsError):
    """The configured KMS key is missing, disabled or of the wrong usage."""


class SealedDataError(KmsError, DecryptionFailed):
    """A blob does not open: tampered, truncated, unknown version or wrong encryption context."""


@dataclass(frozen=True)
class KmsSettings:
    """Where KMS is and which keys to use."""

    #: KMS key id, ARN or alias of the symmetric key that wraps data keys.
    encryption_key_id: str
    #: KMS key id, ARN or alias of the HMAC_256 key that fingerprints PANs.
    mac_key_id: str
    region: str
    #: Endpoint override (a moto server in tests); empty uses the AWS default.
    endpoint: str = ""

    @classmethod
    def from_config(cls, cfg: CardDataConfig) -> KmsSettings:
        """Read the KMS settings of ``cfg``: ``kms_key_id`` wraps the data keys,
        ``kms_mac_key_id`` (an HMAC_256 key) fingerprints PANs."""
        return cls(
            encryption_key_id=cfg.kms_key_id,
            mac_key_id=cfg.kms_mac_key_id,
            region=cfg.kms_region,
            endpoint=cfg.kms_endpoint,
        )


@dataclass(frozen=True)
class _Parsed:
    header: bytes
    wrapped_key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def pan_bytes(pan: str) -> bytes:
    """Return the ASCII bytes of ``pan`` after checking it is 12 to 19 decimal digits.

    Raises:
        InvalidInput: not a PAN; the message says why without repeating the value.
    """
    check_pan(pan)
    return pan.encode("ascii")


def pan_context(context: Mapping[str, str]) -> dict[str, str]:
    """Return the encryption context actually used: ``context`` plus ``purpose=pan``.

    Raises:
        InvalidInput: a key or value is not a non-empty string, or ``purpose`` is set to
            something other than ``pan``.
    """
    out: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or not value:
            raise InvalidInput("context", "keys and values must be non-empty strings")
        out[key] = value
    if out.setdefault(PURPOSE_KEY, PURPOSE_PAN) != PURPOSE_PAN:
        raise InvalidInput("context", f"{PURPOSE_KEY!r} must be {PURPOSE_PAN!r}")
    return out


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The canonical bytes of an encryption context: sorted compact JSON in UTF-8."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


def pack_blob(wrapped_key: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """Lay out a version-1 blob (see the module docstring)."""
    return _header(wrapped_key) + nonce + ciphertext


def _header(wrapped_key: bytes) -> bytes:
    return _HEADER.pack(BLOB_VERSION_1, len(wrapped_key)) + wrapped_key


def _parse_blob(blob: bytes) -> _Parsed:
    if len(blob) < _HEADER.size:
        raise SealedDataError("sealed blob is truncated")
    version, key_len = _HEADER.unpack_from(blob)
    if version != BLOB_VERSION_1:
        raise SealedDataError(f"sealed blob has unknown version {version}")
    body = _HEADER.size + key_len
    if key_len == 0 or len(blob) < body + NONCE_LEN + TAG_LEN:
        raise SealedDataError("sealed blob is truncated")
    return _Parsed(
        header=blob[:body],
        wrapped_key=blob[_HEADER.size : body],
        nonce=blob[body : body + NONCE_LEN],
        ciphertext=blob[body + NONCE_LEN :],
    )


def make_client(settings: KmsSettings, session: boto3.session.Session | None = None) -> KMSClient:
    """A boto3 KMS client with bounded timeouts and retries.

    Credentials come from ``session`` if given, else boto3's default chain (environment,
    profile, instance role).
    """
    config = botocore.config.Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        # total_max_attempts counts the first attempt; botocore's max_attempts would not.
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    )
    sess = session if session is not None else boto3.session.Session()
    client: KMSClient = sess.client(
        "kms",
        region_name=settings.region,
        endpoint_url=settings.endpoint or None,
        config=config,
    )
    return client


@contextlib.contextmanager
def _kms_errors(operation: str) -> Iterator[None]:
    """Turn boto3/botocore exceptions into this module's typed errors, without their text."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        if code in _INVALID_CIPHERTEXT_CODES:
            raise SealedDataError(
                "KMS refused the data key: wrong encryption context or tampered blob"
            ) from None
        if code in _KEY_CODES:
            raise KmsKeyError(f"KMS {operation}: key not usable ({code})") from None
        if code in _RETRYABLE_CODES:
            raise KmsUnavailable(f"KMS {operation}: {code}") from None
        raise KmsError(f"KMS {operation} failed: {code}") from None
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
        botocore.exceptions.ConnectionClosedError,
    ) as exc:
        raise KmsUnavailable(f"KMS {operation}: {type(exc).__name__}") from None
    except botocore.exceptions.NoCredentialsError:
        raise KmsError(f"KMS {operation}: no AWS credentials configured") from None


class KmsVault:
    """PAN envelope encryption and fingerprinting on AWS KMS.

    Synchronous methods (``*_sync``) do the work; the async ones run them in a worker thread.
    """

    def __init__(self, settings: KmsSettings, client: KMSClient) -> None:
        self._settings = settings
        self._client = client
        self._limiter = trio.CapacityLimiter(KMS_CONCURRENCY)

    def __repr__(self) -> str:
        s = self._settings
        return f"KmsVault(key={s.encryption_key_id!r}, mac_key={s.mac_key_id!r})"

    @classmethod
    def from_config(
        cls, cfg: CardDataConfig, session: boto3.session.Session | None = None
    ) -> KmsVault:
        settings = KmsSettings.from_config(cfg)
        return cls(settings, make_client(settings, session))

    # -- synchronous core -------------------------------------------------------------------

    def seal_sync(self, pan: str, context: Mapping[str, str]) -> bytes:
        """Encrypt ``pan`` under a fresh data key bound to ``context``; return the blob.

        Raises:
            InvalidInput: ``pan`` is not a PAN or ``context`` is malformed.
            KmsKeyError, KmsUnavailable, KmsError: KMS refused or could not be reached.
        """
        plain = pan_bytes(pan)
        ctx = pan_context(context)
        with _kms_errors("GenerateDataKey"):
            answer = self._client.generate_data_key(
                KeyId=self._settings.encryption_key_id,
                KeySpec=DATA_KEY_SPEC,
                EncryptionContext=ctx,
            )
        data_key = answer["Plaintext"]
        wrapped = answer["CiphertextBlob"]
        nonce = os.urandom(NONCE_LEN)
        aad = _header(wrapped) + canonical_context(ctx)
        ciphertext = AESGCM(data_key).encrypt(nonce, plain, aad)
        del data_key, plain
        return pack_blob(wrapped, nonce, ciphertext)

    def unseal_sync(self, blob: bytes, context: Mapping[str, str]) -> str:
        """Return the PAN sealed in ``blob`` if ``context`` is the one it was sealed with.

        Raises:
            SealedDataError: wrong context, tampered or malformed blob.
            KmsKeyError, KmsUnavailable, KmsError: KMS refused or could not be reached.
        """
        parsed = _parse_blob(blob)
        ctx = pan_context(context)
        with _kms_errors("Decrypt"):
            answer = self._client.decrypt(
                CiphertextBlob=parsed.wrapped_key,
                EncryptionContext=ctx,
                KeyId=self._settings.encryption_key_id,
            )
        data_key = answer["Plaintext"]
        aad = parsed.header + canonical_context(ctx)
        try:
            plain = AESGCM(data_key).decrypt(parsed.nonce, parsed.ciphertext, aad)
        except InvalidTag:
            raise SealedDataError("sealed PAN failed authentication") from None
        finally:
            del data_key
        try:
            return pan_bytes(plain.decode("ascii")).decode("ascii")
        except (UnicodeDecodeError, InvalidInput):
            raise SealedDataError("sealed blob does not hold a PAN") from None

    def fingerprint_sync(self, pan: str) -> bytes:
        """HMAC-SHA-256 of the PAN under the KMS MAC key: the same PAN gives the same bytes.

        Raises:
            InvalidInput: ``pan`` is not a PAN.
            KmsKeyError, KmsUnavailable, KmsError: KMS refused or could not be reached.
        """
        message = pan_bytes(pan)
        with _kms_errors("GenerateMac"):
            answer = self._client.generate_mac(
                KeyId=self._settings.mac_key_id, Message=message, MacAlgorithm=MAC_ALGORITHM
            )
        return answer["Mac"]

    # -- async interface --------------------------------------------------------------------

    async def seal(self, pan: str, context: Mapping[str, str]) -> bytes:
        """Async ``seal_sync`` in a worker thread."""
        return await trio.to_thread.run_sync(
            self.seal_sync, pan, dict(context), limiter=self._limiter, abandon_on_cancel=True
        )

    async def unseal(self, blob: bytes, context: Mapping[str, str]) -> str:
        """Async ``unseal_sync`` in a worker thread."""
        return await trio.to_thread.run_sync(
            self.unseal_sync, blob, dict(context), limiter=self._limiter, abandon_on_cancel=True
        )

    async def fingerprint(self, pan: str) -> bytes:
        """Async ``fingerprint_sync`` in a worker thread."""
        return await trio.to_thread.run_sync(
            self.fingerprint_sync, pan, limiter=self._limiter, abandon_on_cancel=True
        )
