"""TLS contexts of the switch: the mutual-TLS server side, the acquirer client side, reload.

What lives here: ``server_context`` (built from ``[tls]``: TLS 1.2 or newer, client
certificate required and verified against the CA bundle and, when ``[tls] crl`` names one,
checked against the CA's revocation list), ``client_context`` (used by
``cardswitch send``, tests and benchmarks), ``peer_identities`` / ``identity_allowed`` (the
per-listener allow-list of client identities) and ``TlsContextHolder``, which rebuilds the
server context from the files on demand (SIGHUP) and keeps the previous one when the new
files are unusable.

What does not: sockets, handshake timeouts and the accept loop (server.py), writing
certificates (pki.py).

Choices, fixed here rather than configurable:

- TLS 1.2 suites: ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305) only, so
  every connection has forward secrecy and no CBC/MAC-then-encrypt. TLS 1.3 suites are all
  AEAD and stay at OpenSSL's defaults.
- No compression (CRIME), no renegotiation (neither side may start one), X.509 strict
  verification, server cipher preference.
- Revocation (``[tls] crl``): the PEM file holds one or more CRLs, each signed by a CA of
  the bundle and not past its nextUpdate when loaded (else the file is refused, naming it).
  Only the client's own certificate is checked (``VERIFY_CRL_CHECK_LEAF``); a client whose
  issuer has no CRL in the file is refused, and once the CRL passes its nextUpdate every
  client is refused (OpenSSL fails closed): publish a new CRL before then and SIGHUP.
- Session tickets are OFF (``OP_NO_TICKET`` and ``num_tickets = 0``): the network holds
  long-lived connections, so resumption saves nothing, and tickets would be encrypted with a
  process-wide key that never rotates, weakening forward secrecy. OpenSSL's in-memory
  session-ID cache for TLS 1.2 cannot be switched off from Python; it lives in the context,
  so a reload starts with an empty cache.
"""

from __future__ import annotations

import datetime
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from switch.config import ConfigError, TlsConfig

TlsVersionName = Literal["1.2", "1.3"]

#: Configuration names of the protocol versions the switch speaks.
_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
#: TLS 1.2 cipher suites (OpenSSL syntax): ECDHE key exchange and AEAD encryption only.
#: TLS 1.3 suites are not affected by this string.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
#: Options set on every context: no compression, no renegotiation.
_COMMON_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
#: Options set on server contexts: our cipher order wins, fresh ECDH keys, no session tickets.
_SERVER_OPTIONS = ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_TICKET
#: SubjectAltName entry types that count as a peer identity (besides the subject CN).
_IDENTITY_SAN_TYPES = frozenset({"DNS", "URI"})


def _version(name: str, key: str) -> ssl.TLSVersion:
    try:
        return _VERSIONS[name]
    except KeyError:
        choices = ", ".join(repr(v) for v in _VERSIONS)
        raise ValueError(f"{key}: must be one of {choices}, got {name!r}") from None


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), key, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(str(path), key, "is a directory, expected a PEM file") from None
    except OSError as exc:
        raise ConfigError(str(path), key, f"cannot read: {exc.strerror}") from None


def _load_certs(path: Path, key: str) -> list[x509.Certificate]:
    data = _read(path, key)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(str(path), key, "not a PEM certificate file") from None
    return certs


def _spki(public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, to compare keys of any type."""
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _check_pair(cert_path: Path, key_path: Path, prefix: str) -> None:
    """Validate a certificate file and its private key before OpenSSL sees them.

    OpenSSL's errors name neither file; these do.
    """
    cert_key, key_key = f"{prefix}cert", f"{prefix}key"
    certs = _load_certs(cert_path, cert_key)
    leaf = certs[0]
    if leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        expired = leaf.not_valid_after_utc.isoformat()
        raise ConfigError(str(cert_path), cert_key, f"certificate expired at {expired}")
    data = _read(key_path, key_key)
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(str(key_path), key_key, "encrypted keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(str(key_path), key_key, "not a PEM private key") from None
    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(str(key_path), key_key, f"does not match the certificate {cert_path}")


def _load_ca(ctx: ssl.SSLContext, ca: Path, key: str) -> None:
    certs = _load_certs(ca, key)
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)
    try:
        ctx.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise ConfigError(str(ca), key, f"unusable CA bundle: {exc.reason or exc}") from None


_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def _load_crl(ctx: ssl.SSLContext, crl: Path, cas: list[x509.Certificate], key: str) -> None:
    """Check the CRL file, then load it into ``ctx`` and turn on the leaf check."""
    data = _read(crl, key)
    blocks = _CRL_BLOCK.findall(data)
    if not blocks:
        raise ConfigError(str(crl), key, "not a PEM CRL file")
    now = datetime.datetime.now(datetime.UTC)
    for block in blocks:
        try:
            parsed = x509.load_pem_x509_crl(block)
        except ValueError:
            raise ConfigError(str(crl), key, "not a PEM CRL file") from None
        issuers = [ca for ca in cas if ca.subject == parsed.issuer]
        if not any(_crl_signed_by(parsed, ca) for ca in issuers):
            raise ConfigError(str(crl), key, "CRL not signed by a CA of tls.ca")
        next_update = parsed.next_update_utc
        if next_update is not None and next_update <= now:
            raise ConfigError(str(crl), key, f"CRL expired at {next_update.isoformat()}")
    try:
        ctx.load_verify_locations(cafile=crl)  # OpenSSL reads the CRLs of a PEM file
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(str(crl), key, f"unusable: {reason}") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _load_chain(ctx: ssl.SSLContext, cert: Path, key_file: Path, prefix: str) -> None:
    _check_pair(cert, key_file, prefix)
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:  # changed between our check and OpenSSL's read
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(f"{cert}, {key_file}", f"{prefix}cert", f"unusable: {reason}") from None


def _harden(ctx: ssl.SSLContext, min_version: str, max_version: str | None, key: str) -> None:
    ctx.minimum_version = _version(min_version, key)
    if max_version is not None:
        ctx.maximum_version = _version(max_version, key.replace("min", "max"))
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= _COMMON_OPTIONS
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The server side of mutual TLS for every listener, from the ``[tls]`` section.

    Clients must present a certificate that chains to ``cfg.ca`` and carries the clientAuth
    usage; ``cfg.min_version`` is the lowest protocol accepted. See the module docstring for
    the suites and options.

    Args:
        cfg: files of the CA bundle, the server certificate (chain) and its key.

    Returns:
        A new context; callers wrap accepted sockets with it (``server_side=True``).

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, the key does not match the
            certificate, the server certificate has expired, or the CRL is not signed by a
            CA of the bundle or has expired; the message names the file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, cfg.min_version, None, "tls.min_version")
    ctx.options |= _SERVER_OPTIONS
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, cfg.ca, "tls.ca")
    if cfg.crl:
        _load_crl(ctx, Path(cfg.crl), _load_certs(cfg.ca, "tls.ca"), "tls.crl")
    _load_chain(ctx, cfg.cert, cfg.key, "tls.")
    return ctx


def client_context(
    ca: Path,
    cert: Path,
    key: Path,
    *,
    min_version: TlsVersionName = "1.2",
    max_version: TlsVersionName | None = None,
) -> ssl.SSLContext:
    """The acquirer side of mutual TLS: verifies the switch and presents a client certificate.

    The server certificate must chain to ``ca`` and match the host name given when wrapping
    (``check_hostname`` is on; ``127.0.0.1`` matches an IP SAN).

    Args:
        ca: CA bundle the server certificate must chain to.
        cert: client certificate (chain), PEM.
        key: its private key, PEM, unencrypted.
        min_version: lowest protocol offered, "1.2" or "1.3".
        max_version: highest protocol offered; None for the library's highest.

    Returns:
        A new client context.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, or the key does not match.
        ValueError: an unknown protocol version name.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, min_version, max_version, "min_version")
    _load_ca(ctx, ca, "ca")
    _load_chain(ctx, cert, key, "")
    return ctx


class PeerCertificateSource(Protocol):
    """Anything that exposes the verified peer certificate like ``ssl.SSLObject``."""

    def getpeercert(self, binary_form: Literal[False] = False) -> Any: ...


def peer_identities(ssl_object: PeerCertificateSource) -> frozenset[str]:
    """The identities of the verified peer: subject common names, DNS and URI SANs.

    IP-address and e-mail SANs are not identities here. An unverified or absent peer
    certificate yields an empty set (the stdlib returns its fields only after verification).

    Args:
        ssl_object: an ``ssl.SSLObject`` / ``ssl.SSLSocket`` after the handshake (a
            ``trio.SSLStream`` forwards ``getpeercert`` and can be passed as is).

    Raises:
        ValueError: the handshake has not completed.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        return frozenset()
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        names.update(value for (attr, value) in rdn if attr == "commonName")
    names.update(
        value for (kind, value) in cert.get("subjectAltName", ()) if kind in _IDENTITY_SAN_TYPES
    )
    return frozenset(names)


def identity_allowed(identities: Iterable[str], allowed: tuple[str, ...]) -> bool:
    """Whether a peer with ``identities`` may use a listener that allows ``allowed``.

    An empty ``allowed`` admits any peer (its certificate already chains to the CA).
    Otherwise one identity must equal one allowed entry exactly (case-sensitive, no
    wildcards).
    """
    if not allowed:
        return True
    return not frozenset(allowed).isdisjoint(identities)


@dataclass(frozen=True)
class ReloadOutcome:
    """Result of ``TlsContextHolder.reload``: a failed reload is a value, not an exception."""

    #: True when the new context replaced the old one.
    reloaded: bool
    #: Generation of the context in use after the call (1 for the one built at start).
    generation: int
    #: One-line reason the new files were rejected (names the file); empty on success.
    error: str = ""

    def __bool__(self) -> bool:
        """True when the context was replaced, so ``if holder.reload():`` reads naturally."""
        return self.reloaded


class TlsContextHolder:
    """The server context in use, rebuilt from the files on ``reload()`` (SIGHUP).

    Connections accepted after a successful reload use the new context; established
    connections keep the one they were wrapped with. A reload whose files are unusable keeps
    serving with the previous context.
    """

    def __init__(self, cfg: TlsConfig) -> None:
        """Build the first context.

        Raises:
            ConfigError: as ``server_context``: at start-up a bad file is fatal.
        """
        self._cfg = cfg
        self._context = server_context(cfg)
        self._generation = 1

    @property
    def context(self) -> ssl.SSLContext:
        """The context new connections are wrapped with."""
        return self._context

    def get(self) -> ssl.SSLContext:
        """The current context, as a callable for servers that take a context factory."""
        return self._context

    @property
    def cfg(self) -> TlsConfig:
        """The configuration the current context was built from."""
        return self._cfg

    @property
    def generation(self) -> int:
        """1 for the context built at start, incremented by each successful reload."""
        return self._generation

    def reload(self, cfg: TlsConfig | None = None) -> ReloadOutcome:
        """Rebuild the context from the files of ``cfg`` (default: the current configuration).

        Args:
            cfg: a new ``[tls]`` section, when the configuration file was re-read too.

        Returns:
            Whether the context was replaced and, if not, why.
        """
        new_cfg = cfg if cfg is not None else self._cfg
        try:
            ctx = server_context(new_cfg)
        except ConfigError as exc:
            return ReloadOutcome(reloaded=False, generation=self._generation, error=str(exc))
        self._cfg = new_cfg
        self._context = ctx
        self._generation += 1
        return ReloadOutcome(reloaded=True, generation=self._generation)
