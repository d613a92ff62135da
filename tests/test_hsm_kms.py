"""PAN envelope encryption and fingerprint on AWS KMS, against a real ``moto_server`` process.

The server is started once per session on 127.0.0.1 with an OS-chosen port and terminated at
teardown. Where a result could be checked only against our own code, the test goes to KMS
directly (boto3 ``Decrypt``/``VerifyMac``) and to ``cryptography`` instead.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
import trio
from botocore.awsrequest import AWSPreparedRequest, AWSResponse, HTTPHeaders
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsm.carddata import CardVault
from hsm.config import CardDataConfig
from hsm.errors import DecryptionFailed, HsmUnavailable, InvalidInput
from hsm.kms import (
    MAX_ATTEMPTS,
    KmsKeyError,
    KmsSettings,
    KmsUnavailable,
    KmsVault,
    SealedDataError,
    canonical_context,
    make_client,
)
from switch import testing

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

#: Test PANs from the published CVV vectors (public test data).
PAN = "4123456789012345"
OTHER_PAN = "4999988887777000"
#: Seconds to wait for moto_server to start listening.
STARTUP_TIMEOUT = 30.0
#: The line werkzeug prints once the server listens.
_RUNNING_RE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class MotoKms:
    endpoint: str
    session: boto3.session.Session
    client: KMSClient
    encryption_key_id: str
    mac_key_id: str


def _moto_server_binary() -> str:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:  # pragma: no cover - environment problem
        pytest.fail("moto_server is not installed (pip install 'moto[server]')")
    return found


def _wait_for_port(log: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}: {log.read_text()[-500:]}")
        match = _RUNNING_RE.search(log.read_text(errors="replace"))
        if match:
            port = int(match.group(1))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            except OSError:
                pass
            else:
                return port
        time.sleep(0.1)
    pytest.fail("moto_server did not start listening in time")


@pytest.fixture(scope="session")
def moto_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoKms]:
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [_moto_server_binary(), "-H", "127.0.0.1", "-p", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        port = _wait_for_port(log, proc)
        endpoint = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        client = make_client(KmsSettings("unused", "unused", "eu-west-1", endpoint), session)
        enc = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
        client.create_alias(
            AliasName="alias/cardswitch-pan", TargetKeyId=enc["KeyMetadata"]["KeyId"]
        )
        mac = client.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
        client.create_alias(
            AliasName="alias/pan-fingerprint", TargetKeyId=mac["KeyMetadata"]["KeyId"]
        )
        yield MotoKms(endpoint, session, client, "alias/cardswitch-pan", "alias/pan-fingerprint")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - stuck server
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def card_data_config(moto_kms: MotoKms) -> CardDataConfig:
    return CardDataConfig(
        backend="kms",
        kms_mac_key_id="alias/pan-fingerprint",
        kms_key_id=moto_kms.encryption_key_id,
        kms_endpoint=moto_kms.endpoint,
        kms_region="eu-west-1",
    )


@pytest.fixture
def kms(card_data_config: CardDataConfig, moto_kms: MotoKms) -> KmsVault:
    return KmsVault.from_config(card_data_config, session=moto_kms.session)


CONTEXT = {"card_id": "card-0001"}


async def test_round_trip(kms: KmsVault) -> None:
    assert isinstance(kms, CardVault)
    blob = await kms.seal(PAN, CONTEXT)
    assert PAN.encode() not in blob
    assert await kms.unseal(blob, CONTEXT) == PAN


async def test_blob_opens_with_kms_and_aesgcm_directly(kms: KmsVault, moto_kms: MotoKms) -> None:
    """The documented layout, read without our code: KMS unwraps the key, GCM opens the PAN."""
    blob = await kms.seal(PAN, CONTEXT)
    version, key_len = struct.unpack_from(">BH", blob)
    assert version == 1
    wrapped = blob[3 : 3 + key_len]
    nonce = blob[3 + key_len : 3 + key_len + 12]
    ciphertext = blob[3 + key_len + 12 :]
    context = {"card_id": "card-0001", "purpose": "pan"}
    data_key = moto_kms.client.decrypt(CiphertextBlob=wrapped, EncryptionContext=context)
    assert len(data_key["Plaintext"]) == 32
    aad = blob[: 3 + key_len] + b'{"card_id":"card-0001","purpose":"pan"}'
    assert canonical_context(context) == aad[3 + key_len :]
    assert AESGCM(data_key["Plaintext"]).decrypt(nonce, ciphertext, aad) == PAN.encode()


async def test_each_seal_uses_a_fresh_data_key_and_nonce(kms: KmsVault) -> None:
    first, second = await kms.seal(PAN, CONTEXT), await kms.seal(PAN, CONTEXT)
    assert first != second
    key_len = struct.unpack_from(">H", first, 1)[0]
    assert first[3 : 3 + key_len] != second[3 : 3 + key_len]


@pytest.mark.parametrize(
    "context",
    [
        {"card_id": "card-0002"},
        {},
        {"card_id": "card-0001", "account": "acct-1"},
        {"card_id": "card-0001", "purpose": "pan", "extra": "x"},
    ],
)
async def test_wrong_encryption_context_fails(kms: KmsVault, context: dict[str, str]) -> None:
    blob = await kms.seal(PAN, CONTEXT)
    with pytest.raises(DecryptionFailed) as info:  # the HSM layer's type for "does not open"
        await kms.unseal(blob, context)
    assert isinstance(info.value, SealedDataError)
    assert PAN not in str(info.value)


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


async def test_tampered_blob_fails(kms: KmsVault) -> None:
    blob = await kms.seal(PAN, CONTEXT)
    key_len = struct.unpack_from(">H", blob, 1)[0]
    positions = {
        "version": 0,
        "wrapped key": 3 + key_len // 2,
        "nonce": 3 + key_len + 1,
        "ciphertext": 3 + key_len + 12,
        "tag": len(blob) - 1,
    }
    for index in positions.values():
        with pytest.raises(SealedDataError):
            await kms.unseal(_flip(blob, index), CONTEXT)
    for cut in (0, 2, 3 + key_len, len(blob) - 1):
        with pytest.raises(SealedDataError):
            await kms.unseal(blob[:cut], CONTEXT)


async def test_fingerprint_is_stable_and_verifies_in_kms(kms: KmsVault, moto_kms: MotoKms) -> None:
    first = await kms.fingerprint(PAN)
    assert await kms.fingerprint(PAN) == first
    assert len(first) == 32
    check = moto_kms.client.verify_mac(
        KeyId=moto_kms.mac_key_id, Message=PAN.encode(), Mac=first, MacAlgorithm="HMAC_SHA_256"
    )
    assert check["MacValid"] is True
    assert await kms.fingerprint(OTHER_PAN) != first


async def test_fingerprint_is_stable_across_clients(
    kms: KmsVault, card_data_config: CardDataConfig, moto_kms: MotoKms
) -> None:
    other = KmsVault.from_config(card_data_config, session=moto_kms.session)
    assert await other.fingerprint(PAN) == await kms.fingerprint(PAN)


@pytest.mark.parametrize("bad", ["41234567890", "4123-4567-8901-2345", "41234567890123456789", ""])
async def test_bad_pan_is_refused_without_echo(kms: KmsVault, bad: str) -> None:
    for call in (kms.fingerprint(bad), kms.seal(bad, CONTEXT)):
        with pytest.raises(InvalidInput, match="invalid pan") as info:
            await call
        assert not bad or bad not in str(info.value)


async def test_purpose_cannot_be_overridden(kms: KmsVault) -> None:
    with pytest.raises(InvalidInput, match="purpose"):
        await kms.seal(PAN, {"card_id": "c", "purpose": "cvv"})


async def test_missing_key_is_a_key_error(
    card_data_config: CardDataConfig, moto_kms: MotoKms
) -> None:
    cfg = CardDataConfig(
        backend="kms",
        kms_mac_key_id="alias/no-such-mac-key",
        kms_key_id="alias/no-such-key",
        kms_endpoint=card_data_config.kms_endpoint,
        kms_region="eu-west-1",
    )
    kms = KmsVault.from_config(cfg, session=moto_kms.session)
    with pytest.raises(KmsKeyError):
        await kms.seal(PAN, CONTEXT)
    with pytest.raises(KmsKeyError):
        await kms.fingerprint(PAN)


async def test_unreachable_kms_is_unavailable(moto_kms: MotoKms) -> None:
    port = testing.free_port()  # free a moment ago: nothing listens
    cfg = CardDataConfig(backend="kms", kms_endpoint=f"http://127.0.0.1:{port}")
    kms = KmsVault.from_config(cfg, session=moto_kms.session)
    with trio.fail_after(20):
        with pytest.raises(HsmUnavailable) as info:
            await kms.fingerprint(PAN)
    assert isinstance(info.value, KmsUnavailable)
    assert PAN not in str(info.value)


def test_settings_come_from_the_card_data_config() -> None:
    cfg = CardDataConfig(kms_key_id="alias/wrap", kms_mac_key_id="alias/mac", kms_region="x-1")
    settings = KmsSettings.from_config(cfg)
    assert (settings.encryption_key_id, settings.mac_key_id, settings.region) == (
        "alias/wrap",
        "alias/mac",
        "x-1",
    )


class _Body:
    """The raw body of a canned botocore response (what ``AWSResponse.content`` reads)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._data


def _fail_first(count: int, status: int, code: str) -> tuple[list[str], Callable[..., Any]]:
    """A before-send hook answering the first ``count`` KMS calls with ``status``/``code``
    instead of sending them (a KMS having a bad moment), then letting calls through."""
    seen: list[str] = []

    def hook(request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
        seen.append(request.url)
        if len(seen) > count:
            return None
        body = json.dumps({"__type": code, "message": "injected"}).encode()
        headers = HTTPHeaders()
        headers["Content-Type"] = "application/x-amz-json-1.1"
        return AWSResponse(request.url, status, headers, _Body(body))

    return seen, hook


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "KMSInternalException"), (503, "ServiceUnavailable"), (400, "ThrottlingException")],
)
async def test_transient_kms_errors_are_retried(
    card_data_config: CardDataConfig, moto_kms: MotoKms, status: int, code: str
) -> None:
    reference = await KmsVault.from_config(card_data_config, session=moto_kms.session).fingerprint(
        PAN
    )
    client = make_client(KmsSettings.from_config(card_data_config), moto_kms.session)
    seen, hook = _fail_first(MAX_ATTEMPTS - 1, status, code)
    client.meta.events.register("before-send.kms.GenerateMac", hook)
    vault = KmsVault(KmsSettings.from_config(card_data_config), client)
    assert await vault.fingerprint(PAN) == reference  # answered by KMS on the last attempt
    assert len(seen) == MAX_ATTEMPTS


async def test_kms_failing_on_every_attempt_is_unavailable(
    card_data_config: CardDataConfig, moto_kms: MotoKms
) -> None:
    client = make_client(KmsSettings.from_config(card_data_config), moto_kms.session)
    seen, hook = _fail_first(MAX_ATTEMPTS, 500, "KMSInternalException")
    client.meta.events.register("before-send.kms.GenerateMac", hook)
    vault = KmsVault(KmsSettings.from_config(card_data_config), client)
    with pytest.raises(KmsUnavailable):
        await vault.fingerprint(PAN)
    assert len(seen) == MAX_ATTEMPTS  # botocore's max_attempts would be retries, one more


async def test_a_missing_key_is_not_retried(
    card_data_config: CardDataConfig, moto_kms: MotoKms
) -> None:
    client = make_client(KmsSettings.from_config(card_data_config), moto_kms.session)
    seen, hook = _fail_first(MAX_ATTEMPTS, 400, "NotFoundException")
    client.meta.events.register("before-send.kms.GenerateMac", hook)
    vault = KmsVault(KmsSettings.from_config(card_data_config), client)
    with pytest.raises(KmsKeyError):
        await vault.fingerprint(PAN)
    assert len(seen) == 1
