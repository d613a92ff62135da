"""Development PKI: a private CA and the server and client certificates of a mutual-TLS switch.

What lives here: ``init_pki`` (the files behind ``cardswitch pki init``), the certificate
primitives tests use to build other CAs, expired certificates and clients with other names
(``new_ca``, ``issue_cert``), a certificate revocation list of a CA (``issue_crl``, for the
``[tls] crl`` check of client certificates) and the file layout (``pki_paths``, ``all_files``).
Every key is ECDSA P-256 and every certificate is signed with ECDSA-SHA-256 by ``cryptography``.

What does not: the ``pki`` command (switch.cli.pki), building ``ssl.SSLContext`` objects or
reading certificates for a listener (tls.py). This is a development and test PKI: keys are
written unencrypted (mode 0600) and the CA key sits next to the certificates so more
certificates can be issued later. Production certificates come from the operator's own CA;
the switch only reads the files named in ``[tls]``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from switch.config import ConfigError

#: Curve of every key: NIST P-256, supported by every TLS 1.2/1.3 stack a card network runs.
CURVE = ec.SECP256R1()
#: Lifetime of the dev CA: long enough that a checkout does not expire under a developer.
CA_VALIDITY = datetime.timedelta(days=3650)
#: Lifetime of a dev leaf certificate (below the CA's so every leaf expires before its CA).
LEAF_VALIDITY = datetime.timedelta(days=825)
#: Backdating of notBefore so that clocks a little behind still accept a fresh certificate.
CLOCK_SKEW = datetime.timedelta(minutes=5)
#: Mode of private-key files: readable and writable by the owner only.
KEY_MODE = 0o600
#: Mode of certificate files: public data.
CERT_MODE = 0o644
#: Mode of a PKI directory this module creates.
DIR_MODE = 0o700
#: Organization written into every dev certificate's subject, so nobody mistakes it for a real one.
DEV_ORGANIZATION = "cardswitch development"
#: Common name of the dev CA.
DEV_CA_NAME = "cardswitch dev CA"
#: Common name (and DNS SAN) of the dev server certificate; clients connect to localhost.
DEV_SERVER_NAME = "localhost"
#: IP SAN of the dev server certificate, for clients that connect to the loopback address.
DEV_SERVER_IP = "127.0.0.1"
#: Common name (and DNS SAN) of the dev acquirer's client certificate.
DEV_CLIENT_NAME = "acquirer-dev"

#: File names inside a PKI directory.
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
CLIENT_CERT_FILE = "client.pem"
CLIENT_KEY_FILE = "client.key"


@dataclass(frozen=True)
class PkiPaths:
    """Where the files of one PKI directory live (they need not exist)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: The dev CA's private key, kept so that more certificates can be issued from it.
    ca_key: Path


def pki_paths(dir: Path) -> PkiPaths:
    """The file layout of the PKI directory ``dir``."""
    return PkiPaths(
        ca=dir / CA_CERT_FILE,
        server_cert=dir / SERVER_CERT_FILE,
        server_key=dir / SERVER_KEY_FILE,
        client_cert=dir / CLIENT_CERT_FILE,
        client_key=dir / CLIENT_KEY_FILE,
        ca_key=dir / CA_KEY_FILE,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_ca(
    name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed CA that may sign end-entity certificates only (path length 0).

    Args:
        name: subject common name of the CA.
        not_before: start of validity; default now minus a small clock skew.
        not_after: end of validity; default ``CA_VALIDITY`` after now.

    Returns:
        The CA certificate and its private key.
    """
    key = ec.generate_private_key(CURVE)
    now = _now()
    subject = _name(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - CLOCK_SKEW)
        .not_valid_after(not_after or now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    san_dns: Sequence[str] = (),
    san_ip: Sequence[str] = (),
    san_uri: Sequence[str] = (),
    client: bool = True,
    server: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue an end-entity certificate for a new P-256 key, signed by ``ca_cert``/``ca_key``.

    Args:
        ca_cert: certificate of the issuing CA.
        ca_key: private key of the issuing CA.
        common_name: subject CN.
        san_dns: DNS names for the subjectAltName extension.
        san_ip: IP addresses (text form) for the subjectAltName extension.
        san_uri: URIs for the subjectAltName extension.
        client: include the clientAuth extended key usage.
        server: include the serverAuth extended key usage.
        not_before: start of validity; default now minus a small clock skew.
        not_after: end of validity; default ``LEAF_VALIDITY`` after now (pass a past time to
            make an expired certificate).

    Returns:
        ``(cert_pem, key_pem)``: the certificate and its unencrypted PKCS#8 private key, PEM.

    Raises:
        ValueError: neither ``client`` nor ``server`` is set, or an IP address is malformed.
    """
    if not (client or server):
        raise ValueError("a certificate needs the client or the server usage")
    key = ec.generate_private_key(CURVE)
    now = _now()
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in san_dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in san_ip]
    sans += [x509.UniformResourceIdentifier(u) for u in san_uri]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - CLOCK_SKEW)
        .not_valid_after(not_after or now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        # RFC 5280 4.2.1.6: critical only when the subject is empty; ours always has a CN.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key_to_pem(key)


#: Time until the nextUpdate of a dev CRL; past it the switch refuses every client.
CRL_VALIDITY = datetime.timedelta(days=7)


def issue_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Sequence[int] = (),
    *,
    next_update: datetime.datetime | None = None,
) -> bytes:
    """A CRL of ``ca_cert`` revoking the certificates with ``revoked_serials``, PEM.

    Args:
        ca_cert: the CA whose certificates are listed (the CRL's issuer).
        ca_key: its private key (signs the CRL, ECDSA-SHA-256).
        revoked_serials: serial numbers of the revoked certificates (revoked now).
        next_update: when the CRL expires; default ``CRL_VALIDITY`` after now.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(next_update or now + CRL_VALIDITY)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - CLOCK_SKEW)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM encoding of ``key`` (development keys only)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` from the first byte.

    The data goes to a new temporary file in the same directory, created with ``mode`` (so a
    key is never readable by others, whatever the umask), then renamed over ``path``.

    Raises:
        OSError: the directory is not writable.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have cleared bits of ``mode`` at creation
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
    """Write a certificate (mode 0644) and its private key (mode 0600), key first."""
    write_file(key_path, key_pem, KEY_MODE)
    write_file(cert_path, cert_pem, CERT_MODE)


def load_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key of a PKI directory written by ``init_pki``.

    Raises:
        ConfigError: a file is missing, unreadable, not PEM, or the key is not a P-256 key.
    """
    cert_pem = _read(paths.ca)
    key_pem = _read(paths.ca_key)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(str(paths.ca), "", "not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(str(paths.ca_key), "", "not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(str(paths.ca_key), "", "not an ECDSA private key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ConfigError(str(paths.ca_key), "", f"does not match {paths.ca}")
    return cert, key


def _spki(public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, to compare keys of any type."""
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None


@dataclass(frozen=True)
class PkiReport:
    """What ``ensure_pki`` did: the layout, and the files it wrote (the others were kept)."""

    paths: PkiPaths
    written: tuple[Path, ...]


def init_pki(dir: Path, *, force: bool = False) -> PkiPaths:
    """Create the dev PKI in ``dir`` unless it is already there; see ``ensure_pki``."""
    return ensure_pki(dir, force=force).paths


def ensure_pki(dir: Path, *, force: bool = False) -> PkiReport:
    """Create the dev CA, server and client certificates in ``dir``, keeping what exists.

    Each pair (certificate and key) is kept when both files exist and written when neither
    does; the CA is written first and the leaves are signed by it. With ``force`` everything
    is written anew. Written: ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (CN and
    DNS SAN ``localhost``, IP SAN 127.0.0.1, serverAuth), ``client.pem``/``client.key`` (CN and
    DNS SAN ``acquirer-dev``, clientAuth). Keys are mode 0600.

    Returns:
        The layout and the paths written.

    Raises:
        ConfigError: a pair is half present (one of certificate/key missing), or leaf
            certificates exist without the CA that would sign new ones; ``force`` resolves both.
        OSError: the directory cannot be created or written.
    """
    paths = pki_paths(dir)
    dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    pairs = {
        "ca": (paths.ca, paths.ca_key),
        "server": (paths.server_cert, paths.server_key),
        "client": (paths.client_cert, paths.client_key),
    }
    missing: dict[str, bool] = {}
    for name, (cert_path, key_path) in pairs.items():
        have = (cert_path.exists(), key_path.exists())
        if not force and have[0] != have[1]:
            absent = key_path if have[0] else cert_path
            raise ConfigError(str(absent), "", f"{name} pair is incomplete; use --force")
        missing[name] = force or not have[0]
    if missing["ca"] and not (missing["server"] and missing["client"]):
        raise ConfigError(
            str(paths.ca), "", "certificates exist without their CA; use --force to start over"
        )

    written: list[Path] = []
    if missing["ca"]:
        ca_cert, ca_key = new_ca(DEV_CA_NAME)
        write_pair(cert_to_pem(ca_cert), key_to_pem(ca_key), paths.ca, paths.ca_key)
        written += [paths.ca, paths.ca_key]
    else:
        ca_cert, ca_key = load_ca(paths)
    if missing["server"]:
        cert_pem, key_pem = issue_cert(
            ca_cert,
            ca_key,
            DEV_SERVER_NAME,
            san_dns=(DEV_SERVER_NAME,),
            san_ip=(DEV_SERVER_IP,),
            client=False,
            server=True,
        )
        write_pair(cert_pem, key_pem, paths.server_cert, paths.server_key)
        written += [paths.server_cert, paths.server_key]
    if missing["client"]:
        cert_pem, key_pem = issue_cert(ca_cert, ca_key, DEV_CLIENT_NAME, san_dns=(DEV_CLIENT_NAME,))
        write_pair(cert_pem, key_pem, paths.client_cert, paths.client_key)
        written += [paths.client_cert, paths.client_key]
    return PkiReport(paths=paths, written=tuple(written))


def all_files(paths: PkiPaths) -> tuple[Path, ...]:
    """Every file of the PKI, in the order ``pki init`` reports them."""
    return (
        paths.ca,
        paths.ca_key,
        paths.server_cert,
        paths.server_key,
        paths.client_cert,
        paths.client_key,
    )
