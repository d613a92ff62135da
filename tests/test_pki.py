"""Tests of the dev PKI (switch/pki.py).

Certificates are checked by independent verifiers: ``openssl verify`` / ``openssl x509 -text``
(the Debian OpenSSL CLI) and ``cryptography``'s RFC 5280 path builder, never by re-reading
our own builder's inputs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import verification

from switch import pki
from switch.cli import pki as pki_cli
from switch.config import ConfigError


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def _verify(ca: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _openssl("verify", "-x509_strict", "-CAfile", ca, *extra, cert)


def _text(cert: Path) -> str:
    out = _openssl("x509", "-noout", "-text", "-in", cert)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0 so that file modes come from the code, not from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def paths(tmp_path: Path) -> pki.PkiPaths:
    return pki.init_pki(tmp_path / "pki")


def test_init_writes_every_file_with_private_keys_0600(tmp_path: Path, umask_zero: None) -> None:
    target = tmp_path / "var" / "pki"
    paths = pki.init_pki(target)
    assert paths == pki.pki_paths(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for key in (paths.ca_key, paths.server_key, paths.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (paths.ca, paths.server_cert, paths.client_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"]
    )


def test_openssl_verifies_server_for_localhost_and_loopback_ip(paths: pki.PkiPaths) -> None:
    out = _verify(
        paths.ca,
        paths.server_cert,
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "localhost",
        "-verify_ip",
        "127.0.0.1",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(": OK")


def test_openssl_verifies_client_for_client_purpose_only(paths: pki.PkiPaths) -> None:
    ok = _verify(paths.ca, paths.client_cert, "-purpose", "sslclient")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = _verify(paths.ca, paths.client_cert, "-purpose", "sslserver")
    assert wrong.returncode != 0
    assert "unsuitable certificate purpose" in wrong.stdout + wrong.stderr
    server_as_client = _verify(paths.ca, paths.server_cert, "-purpose", "sslclient")
    assert server_as_client.returncode != 0


def test_cryptography_path_validation(paths: pki.PkiPaths) -> None:
    store = verification.Store([_load(paths.ca)])
    builder = verification.PolicyBuilder().store(store)
    server = _load(paths.server_cert)
    chain = builder.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    assert chain[-1] == _load(paths.ca)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    assert builder.build_server_verifier(loopback).verify(server, [])[0] == server
    verified = builder.build_client_verifier().verify(_load(paths.client_cert), [])
    assert verified.subjects == [x509.DNSName("acquirer-dev")]
    with pytest.raises(verification.VerificationError):
        builder.build_server_verifier(x509.DNSName("example.com")).verify(server, [])


def test_extensions_as_openssl_decodes_them(paths: pki.PkiPaths) -> None:
    ca = _text(paths.ca)
    assert "CA:TRUE, pathlen:0" in ca
    assert "Certificate Sign, CRL Sign" in ca
    assert "CN = cardswitch dev CA" in ca

    server = _text(paths.server_cert)
    assert "CN = localhost" in server
    assert "CA:FALSE" in server
    assert "Digital Signature" in server
    assert "TLS Web Server Authentication" in server
    assert "TLS Web Client Authentication" not in server
    assert "DNS:localhost, IP Address:127.0.0.1" in server

    client = _text(paths.client_cert)
    assert "CN = acquirer-dev" in client
    assert "TLS Web Client Authentication" in client
    assert "TLS Web Server Authentication" not in client
    assert "DNS:acquirer-dev" in client
    for text in (ca, server, client):
        assert "ASN1 OID: prime256v1" in text
        assert "Signature Algorithm: ecdsa-with-SHA256" in text


@pytest.mark.parametrize(
    ("cert_attr", "key_attr"),
    [("ca", "ca_key"), ("server_cert", "server_key"), ("client_cert", "client_key")],
)
def test_each_key_matches_its_certificate(
    paths: pki.PkiPaths, cert_attr: str, key_attr: str
) -> None:
    from_cert = _openssl("x509", "-noout", "-pubkey", "-in", getattr(paths, cert_attr))
    from_key = _openssl("pkey", "-pubout", "-in", getattr(paths, key_attr))
    assert from_cert.returncode == 0 and from_key.returncode == 0
    assert from_cert.stdout == from_key.stdout
    assert "BEGIN PUBLIC KEY" in from_key.stdout


def test_second_run_keeps_everything(tmp_path: Path) -> None:
    first = pki.ensure_pki(tmp_path)
    assert len(first.written) == 6
    before = {p: p.read_bytes() for p in first.written}
    second = pki.ensure_pki(tmp_path)
    assert second.written == ()
    assert {p: p.read_bytes() for p in before} == before


def test_force_rewrites_everything(tmp_path: Path) -> None:
    first = pki.ensure_pki(tmp_path)
    before = {p: p.read_bytes() for p in first.written}
    again = pki.ensure_pki(tmp_path, force=True)
    assert set(again.written) == set(before)
    assert all(p.read_bytes() != data for p, data in before.items())


def test_missing_pair_is_reissued_from_the_existing_ca(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path)
    ca_before = paths.ca.read_bytes()
    server_before = paths.server_cert.read_bytes()
    paths.client_cert.unlink()
    paths.client_key.unlink()
    report = pki.ensure_pki(tmp_path)
    assert report.written == (paths.client_cert, paths.client_key)
    assert paths.ca.read_bytes() == ca_before
    assert paths.server_cert.read_bytes() == server_before
    out = _verify(paths.ca, paths.client_cert, "-purpose", "sslclient")
    assert out.returncode == 0, out.stdout + out.stderr


def test_half_a_pair_is_an_error_naming_the_missing_file(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path)
    paths.server_key.unlink()
    with pytest.raises(ConfigError) as err:
        pki.init_pki(tmp_path)
    assert str(paths.server_key) in str(err.value)
    assert not paths.server_key.exists()
    pki.init_pki(tmp_path, force=True)
    assert paths.server_key.exists()


def test_leaves_without_their_ca_are_an_error(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path)
    paths.ca.unlink()
    paths.ca_key.unlink()
    with pytest.raises(ConfigError, match="without their CA"):
        pki.init_pki(tmp_path)


def test_issue_cert_expired_and_foreign_ca_fail_openssl(paths: pki.PkiPaths) -> None:
    ca_cert, ca_key = pki.load_ca(paths)
    now = datetime.datetime.now(datetime.UTC)
    cert_pem, key_pem = pki.issue_cert(
        ca_cert,
        ca_key,
        "acquirer-dev",
        san_dns=("acquirer-dev",),
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    expired = paths.ca.parent / "expired.pem"
    pki.write_pair(cert_pem, key_pem, expired, paths.ca.parent / "expired.key")
    out = _verify(paths.ca, expired, "-purpose", "sslclient")
    assert out.returncode != 0
    assert "certificate has expired" in out.stdout + out.stderr

    rogue_cert, rogue_key = pki.new_ca("rogue CA")
    cert_pem, _ = pki.issue_cert(rogue_cert, rogue_key, "acquirer-dev")
    foreign = paths.ca.parent / "foreign.pem"
    foreign.write_bytes(cert_pem)
    out = _verify(paths.ca, foreign, "-purpose", "sslclient")
    assert out.returncode != 0
    assert "unable to get local issuer certificate" in out.stdout + out.stderr


def test_issue_cert_uri_san_and_both_usages(paths: pki.PkiPaths) -> None:
    ca_cert, ca_key = pki.load_ca(paths)
    cert_pem, _ = pki.issue_cert(
        ca_cert,
        ca_key,
        "peer",
        san_uri=("spiffe://cardswitch/acquirer/1",),
        client=True,
        server=True,
    )
    path = paths.ca.parent / "both.pem"
    path.write_bytes(cert_pem)
    text = _text(path)
    assert "URI:spiffe://cardswitch/acquirer/1" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text


def test_issue_cert_needs_a_usage(paths: pki.PkiPaths) -> None:
    ca_cert, ca_key = pki.load_ca(paths)
    with pytest.raises(ValueError, match="usage"):
        pki.issue_cert(ca_cert, ca_key, "nobody", client=False, server=False)


def test_load_ca_rejects_a_mismatched_key(paths: pki.PkiPaths) -> None:
    paths.ca_key.write_bytes(paths.client_key.read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        pki.load_ca(paths)


def test_cli_init_prints_written_then_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="cardswitch")
    pki_cli.register(parser.add_subparsers(dest="command", required=True))
    target = tmp_path / "cli-pki"

    args = parser.parse_args(["pki", "init", "--dir", str(target)])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert all(line.startswith("wrote ") for line in lines)
    assert f"wrote {target / 'server.key'}" in lines

    args = parser.parse_args(["pki", "init", "--dir", str(target)])
    assert args.func(args) == 0
    assert all(line.startswith("kept ") for line in capsys.readouterr().out.splitlines())

    args = parser.parse_args(["pki", "init", "--dir", str(target), "--force"])
    assert args.func(args) == 0
    assert all(line.startswith("wrote ") for line in capsys.readouterr().out.splitlines())
