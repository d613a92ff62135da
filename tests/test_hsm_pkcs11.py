"""The PKCS#11 backend on a real SoftHSM2 token: key values stay in the token, derived EMV
keys do not accumulate, the dev token is idempotent, failures are typed, and eight trio tasks
hammering the backend get every answer right.
"""

from __future__ import annotations

import os
import sys

import pkcs11
import pkcs11.exceptions as p11e
import pytest
import trio
from pkcs11 import Attribute, ObjectClass

from hsm import pkcs11 as backend_module
from hsm.api import (
    ArpcRequest,
    ArqcVerification,
    Cvn,
    CvvGeneration,
    EmvCard,
    Fingerprint,
    KeyAlgorithm,
    KeyGeneration,
    KeyImport,
    KeyUsage,
    PinBlockFormat,
    PinVerification,
    PvvReference,
)
from hsm.config import HsmConfig
from hsm.errors import HsmTimeout, HsmUnavailable, KeyNotFound
from hsm.pkcs11 import Pkcs11Hsm
from hsm.token import ensure_token, token_labels

pytest.register_assert_rewrite("hsm_fixtures")
from hsm_fixtures import ZPK_1, load_vectors, until_ok, until_unavailable  # noqa: E402

pytest_plugins = ["hsm_fixtures"]

#: How long the concurrency test hammers the token, in seconds, and with how many tasks.
HAMMER_SECONDS = 3.0
HAMMER_TASKS = 8
#: Upper bound of iterations per task, so the loop is bounded whatever the clock does.
HAMMER_MAX_ROUNDS = 100_000


def _session_objects(hsm: Pkcs11Hsm) -> list[object]:
    with backend_module._PROCESS_LOCK:
        return list(
            hsm._session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: False}
            )
        )


async def test_key_values_cannot_be_read_back(pkcs11_hsm: Pkcs11Hsm) -> None:
    kek = await pkcs11_hsm.generate_key(
        KeyGeneration("wrap-kek", KeyUsage.KEK, KeyAlgorithm.AES_256)
    )
    assert kek.usage is KeyUsage.KEK
    with backend_module._PROCESS_LOCK:
        kek_obj = pkcs11_hsm._lookup("wrap-kek").handle.obj
        for label in ("cvk", "pvk", "imk", "zpk-1", "zpk-aes", "fp", "pan"):
            stored = pkcs11_hsm._lookup(label)
            objs = [stored.handle.obj] + ([stored.left.obj] if stored.left else [])
            for obj in objs:
                assert obj[Attribute.SENSITIVE] is True
                assert obj[Attribute.EXTRACTABLE] is False
                with pytest.raises(p11e.AttributeSensitive):
                    obj[Attribute.VALUE]
                with pytest.raises(p11e.KeyUnextractable):
                    kek_obj.wrap_key(obj, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
                with pytest.raises(p11e.AttributeReadOnly):
                    obj[Attribute.EXTRACTABLE] = True
    await pkcs11_hsm.delete_key("wrap-kek")


async def test_imk_only_derives(pkcs11_hsm: Pkcs11Hsm) -> None:
    """Encrypting Y||~Y under the IMK would hand out the ICC key: the IMK cannot encrypt."""
    with backend_module._PROCESS_LOCK:
        imk = pkcs11_hsm._lookup("imk").handle.obj
        assert imk[Attribute.ENCRYPT] is False and imk[Attribute.DERIVE] is True
        # python-pkcs11 omits encrypt() on objects without CKA_ENCRYPT; the token refuses too.
        with pytest.raises((p11e.PKCS11Error, AttributeError)):
            imk.encrypt(bytes(16), mechanism=pkcs11.Mechanism.DES3_ECB)


async def test_emv_session_keys_are_destroyed(pkcs11_hsm: Pkcs11Hsm) -> None:
    before = len(_session_objects(pkcs11_hsm))
    v = {x["name"]: x for x in load_vectors("emv")}[
        "Visa CVN18 ARQC (9F10 06011203A0B800, 0x80 pad)"
    ]
    card = EmvCard("imk", Cvn.VISA_18, "1234567890123456", "00")
    req = ArqcVerification(
        card,
        bytes.fromhex("001C"),
        bytes.fromhex(v["inputs"]["data_hex"]),
        bytes.fromhex(v["expected"]),
        arpc=ArpcRequest(csu=bytes(4)),
    )
    assert (await pkcs11_hsm.verify_arqc(req)).ok
    assert len(_session_objects(pkcs11_hsm)) == before


async def test_keys_persist_in_the_token(pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig) -> None:
    other = Pkcs11Hsm.open(
        hsm_config.module, hsm_config.token_label, hsm_config.user_pin, timeout=5.0
    )
    try:
        assert {k.label: k.kcv for k in await other.list_keys()} == {
            k.label: k.kcv for k in await pkcs11_hsm.list_keys()
        }
        assert (
            await other.generate_cvv(CvvGeneration("cvk", "4123456789012345", "8701", "101"))
            == "561"
        )
    finally:
        await other.aclose()


async def test_commands_run_on_session_copies_that_a_second_user_adds_and_removes(
    pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig
) -> None:
    """Every indexed key answers through a session copy (no object file read per command),
    which keeps the token object's label, CKA_ID and protections; a second ``Pkcs11Hsm`` on
    the shared session makes its own copies and destroys them on close."""
    with backend_module._PROCESS_LOCK:
        indexed = [
            key
            for stored in pkcs11_hsm._keys.values()
            for key in (stored.handle, stored.left)
            if key is not None
        ]
        for key in indexed:
            assert key.obj[Attribute.TOKEN] is False and key.stored[Attribute.TOKEN] is True
            for attr in (Attribute.LABEL, Attribute.ID, Attribute.ENCRYPT, Attribute.SIGN):
                assert key.obj[attr] == key.stored[attr]
            assert key.obj[Attribute.SENSITIVE] is True
            assert key.obj[Attribute.EXTRACTABLE] is False
    mine = len(_session_objects(pkcs11_hsm))
    assert mine == len(indexed)
    other = Pkcs11Hsm.open(
        hsm_config.module, hsm_config.token_label, hsm_config.user_pin, timeout=5.0
    )
    try:
        assert await other.fingerprint(Fingerprint("fp", b"4123456789012345")) == (
            await pkcs11_hsm.fingerprint(Fingerprint("fp", b"4123456789012345"))
        )
        assert len(_session_objects(pkcs11_hsm)) == 2 * mine
    finally:
        await other.aclose()
    assert len(_session_objects(pkcs11_hsm)) == mine


_DELETE_BY_LABEL = """
import sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, token_label, pin, label = sys.argv[1:]
session = pkcs11.lib(module).get_token(token_label=token_label).open(rw=True, user_pin=pin)
found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))
for obj in found:
    obj.destroy()
print(len(found))
"""


async def test_a_key_deleted_by_another_process_stops_answering_within_the_recheck(
    pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig
) -> None:
    """The session copy outlives the token object; the next read of the token objects (at
    most ``KEY_RECHECK`` later) drops the session, and the rebuilt index lacks the key."""
    await pkcs11_hsm.import_key(KeyImport("doomed", KeyUsage.HMAC, bytes(range(32))))
    doomed = Fingerprint("doomed", b"4123456789012345")
    await pkcs11_hsm.fingerprint(doomed)
    args = [str(hsm_config.module), hsm_config.token_label, hsm_config.user_pin, "doomed"]
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", _DELETE_BY_LABEL, *args],
            env={**os.environ, "SOFTHSM2_CONF": str(hsm_config.softhsm_conf)},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert (done.returncode, done.stdout.strip()) == (0, b"1"), done.stderr
    await until_unavailable(lambda: pkcs11_hsm.fingerprint(doomed))
    with pytest.raises(KeyNotFound):  # once reconnected (after RECONNECT_INITIAL)
        await until_ok(lambda: pkcs11_hsm.fingerprint(doomed))
    assert await pkcs11_hsm.fingerprint(Fingerprint("fp", b"4123456789012345"))


async def test_timeout_is_typed(pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig) -> None:
    # Offloaded: an inline command is one synchronous call that no deadline can interrupt.
    impatient = Pkcs11Hsm.open(
        hsm_config.module, hsm_config.token_label, hsm_config.user_pin, timeout=0.0, offload=True
    )
    try:
        with pytest.raises(HsmTimeout):
            await impatient.generate_cvv(CvvGeneration("cvk", "4123456789012345", "8701", "101"))
    finally:
        await impatient.aclose()


async def test_inline_mode_gives_the_same_answers(
    pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig
) -> None:
    inline = Pkcs11Hsm.open(
        hsm_config.module, hsm_config.token_label, hsm_config.user_pin, timeout=5.0, offload=False
    )
    try:
        for v in load_vectors("cvv"):
            i = v["inputs"]
            assert (
                await inline.generate_cvv(
                    CvvGeneration("cvk", i["pan"], i["expiry"], i["service_code"])
                )
                == v["expected"]
            )
    finally:
        await inline.aclose()


def test_dev_token_is_idempotent(pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig) -> None:
    status = ensure_token(hsm_config)
    assert not status.created
    assert token_labels(status.conf).count(hsm_config.token_label) == 1
    assert status.conf.read_text().count(str(status.token_dir)) == 1


def test_unusable_module_or_token_is_unavailable(
    pkcs11_hsm: Pkcs11Hsm, hsm_config: HsmConfig
) -> None:
    with pytest.raises(HsmUnavailable):
        Pkcs11Hsm.open("/nonexistent/libpkcs11.so", "x", "1234")
    with pytest.raises(HsmUnavailable):
        Pkcs11Hsm.open(hsm_config.module, "no-such-token", hsm_config.user_pin)
    with pytest.raises(HsmUnavailable):  # the process's session was opened with another PIN
        Pkcs11Hsm.open(hsm_config.module, hsm_config.token_label, "0000")


async def test_after_close_commands_are_unavailable(
    hsm_config: HsmConfig, pkcs11_hsm: Pkcs11Hsm
) -> None:
    other = Pkcs11Hsm.open(hsm_config.module, hsm_config.token_label, hsm_config.user_pin)
    await other.aclose()
    await other.aclose()  # idempotent
    with pytest.raises(HsmUnavailable):
        await other.generate_cvv(CvvGeneration("cvk", "4123456789012345", "8701", "101"))


async def test_eight_tasks_hammering_the_token(pkcs11_hsm: Pkcs11Hsm) -> None:
    """Every answer checked against the published vectors, for HAMMER_SECONDS."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    from psec import pinblock as psec_pinblock

    cvv = load_vectors("cvv")
    pvv = load_vectors("pvv")
    emv = {v["name"]: v for v in load_vectors("emv")}
    cvn10 = emv["Visa CVN10 ARQC (key = ICC MK, zero pad)"]
    cvn18 = emv["Visa CVN18 ARQC (9F10 06011203A0B800, 0x80 pad)"]
    enc = Cipher(TripleDES(ZPK_1 + ZPK_1[:8]), modes.ECB()).encryptor()  # noqa: S305
    pin_reqs = [
        PinVerification(
            "zpk-1",
            enc.update(psec_pinblock.encode_pinblock_iso_0(v["inputs"]["pin"], v["inputs"]["pan"])),
            PinBlockFormat.ISO_0,
            v["inputs"]["pan"],
            PvvReference("pvk", v["inputs"]["pvki"], v["expected"]),
        )
        for v in pvv
    ]
    arqc_reqs = [
        ArqcVerification(
            EmvCard("imk", cvn, "1234567890123456", "00"),
            bytes.fromhex("001C"),
            bytes.fromhex(v["inputs"]["data_hex"]),
            bytes.fromhex(v["expected"]),
        )
        for cvn, v in ((Cvn.VISA_10, cvn10), (Cvn.VISA_18, cvn18))
    ]
    counts = [0] * HAMMER_TASKS
    copies = len(_session_objects(pkcs11_hsm))  # the working keys' session copies
    deadline = trio.current_time() + HAMMER_SECONDS

    async def worker(n: int) -> None:
        for rnd in range(HAMMER_MAX_ROUNDS):
            if trio.current_time() >= deadline:
                return
            k = (n + rnd) % 3
            if k == 0:
                v = cvv[rnd % len(cvv)]
                i = v["inputs"]
                got = await pkcs11_hsm.generate_cvv(
                    CvvGeneration("cvk", i["pan"], i["expiry"], i["service_code"])
                )
                assert got == v["expected"]
            elif k == 1:
                assert (await pkcs11_hsm.verify_pin(pin_reqs[rnd % len(pin_reqs)])).ok
            else:
                assert (await pkcs11_hsm.verify_arqc(arqc_reqs[rnd % len(arqc_reqs)])).ok
            counts[n] += 1

    async with trio.open_nursery() as nursery:
        for n in range(HAMMER_TASKS):
            nursery.start_soon(worker, n)
    assert all(c > 0 for c in counts)
    assert len(_session_objects(pkcs11_hsm)) == copies, "derived keys left behind"
