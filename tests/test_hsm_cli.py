"""The operator CLI (``cardswitch hsm ...``, ``cardswitch keys ...``) on a temporary SoftHSM token.

Commands run in-process through ``switch.__main__.main`` (each opens and closes the token, as
separate invocations do) and once through the installed ``cardswitch`` script. Expected
outputs are the published vectors (tests/data/payment_crypto.json); key check values
are recomputed with ``cryptography``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

#: The published vectors (shared/ sits beside the repository).
from data_paths import VECTORS_PATH

from hsm.config import HsmConfig
from switch.__main__ import main
from switch.config import Config
from switch.testing import write_config

#: Public test key of the Visa CVV table, psec and pyemv vectors (CVK, PVK, IMK).
TEST_KEY_HEX = "0123456789ABCDEFFEDCBA9876543210"
#: EMV context of the vectors' cited source (pyemv tests/test_cvn_hsm.py).
EMV_PAN, EMV_PSN, EMV_ATC, EMV_UN = "1234567890123456", "00", "001C", "52BF4585"


def vectors(category: str) -> list[dict[str, Any]]:
    doc = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return [v for v in doc["vectors"] if v["category"] == category]


def vector(name: str) -> dict[str, Any]:
    doc = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    found: list[dict[str, Any]] = [v for v in doc["vectors"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def tdes_kcv(key_hex: str) -> str:
    """KCV of a TDES key computed with ``cryptography`` (not our code)."""
    key = bytes.fromhex(key_hex)
    if len(key) == 16:
        key += key[:8]
    encryptor = Cipher(TripleDES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV is ECB
    return (encryptor.update(bytes(8)) + encryptor.finalize())[:3].hex().upper()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A configuration whose SoftHSM token lives in a temporary directory, initialised by
    ``hsm init`` and loaded with the vectors' keys through ``keys import``."""
    var = tmp_path_factory.mktemp("cli-var")
    cfg = Config(hsm=HsmConfig(softhsm_conf=var / "softhsm" / "softhsm2.conf"))
    path = write_config(cfg, var / "switch.toml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", os.environ.get("SOFTHSM2_CONF", ""))  # restored after
        assert main(["hsm", "init", "--config", str(path)]) == 0
        for label, usage in (("cvk", "cvk"), ("pvk", "pvk"), ("imk", "imk-ac")):
            cmd = ["keys", "import", label, "--usage", usage, "--clear", TEST_KEY_HEX]
            assert main([*cmd, "--config", str(path)]) == 0
        yield str(path)


def run(capsys: pytest.CaptureFixture[str], config: str, *argv: str) -> tuple[int, str, str]:
    status = main([*argv, "--config", config])
    out, err = capsys.readouterr()
    return status, out, err


def test_init_is_idempotent_and_creates_card_data_keys(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, config, "hsm", "init")
    assert status == 0
    assert "'cardswitch-dev' opened" in out
    assert "'pan-fingerprint' (hmac, hmac-sha256)" in out
    assert "'pan-encryption' (data, aes-256)" in out
    assert out.count(": present") == 2
    assert "generated" not in out


def test_keys_list_shows_kcvs_never_values(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, config, "keys", "list", "--json")
    assert status == 0
    keys = {k["label"]: k for k in json.loads(out)}
    assert {"cvk", "pvk", "imk", "pan-fingerprint", "pan-encryption"} <= set(keys)
    assert keys["cvk"] == {
        "label": "cvk",
        "usage": "cvk",
        "algorithm": "tdes-2key",
        "kcv": tdes_kcv(TEST_KEY_HEX),
    }
    status, table, _ = run(capsys, config, "keys", "list")
    assert status == 0
    assert table.splitlines()[0].split() == ["LABEL", "USAGE", "ALGORITHM", "KCV"]
    assert TEST_KEY_HEX not in table.upper() + out.upper()


@pytest.mark.parametrize("v", vectors("cvv"), ids=lambda v: v["name"])
def test_cvv_vectors(config: str, capsys: pytest.CaptureFixture[str], v: dict[str, Any]) -> None:
    i = v["inputs"]
    assert i["cvk"] == TEST_KEY_HEX
    argv = ["hsm", "cvv", "--cvk", "cvk", "--pan", i["pan"], "--expiry", i["expiry"]]
    status, out, err = run(capsys, config, *argv, "--service-code", i["service_code"])
    assert (status, out, err) == (0, v["expected"] + "\n", "")


def test_cvv_json(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    i = vector("CVV 4123456789012345")["inputs"]
    argv = ["hsm", "cvv", "--cvk", "cvk", "--pan", i["pan"], "--expiry", i["expiry"]]
    status, out, _ = run(capsys, config, *argv, "--service-code", i["service_code"], "--json")
    assert status == 0
    assert json.loads(out) == {
        "cvk": "cvk",
        "cvv": "561",
        "pan": "412345******2345",
        "service_code": "101",
    }


@pytest.mark.parametrize("v", vectors("pvv"), ids=lambda v: v["name"])
def test_pvv_vectors(config: str, capsys: pytest.CaptureFixture[str], v: dict[str, Any]) -> None:
    i = v["inputs"]
    assert i["pvk"] == TEST_KEY_HEX
    argv = ["hsm", "pvv", "--pvk", "pvk", "--pan", i["pan"], "--pvki", i["pvki"]]
    status, out, _ = run(capsys, config, *argv, "--pin", i["pin"])
    assert (status, out) == (0, v["expected"] + "\n")


@pytest.mark.parametrize(
    "v", [v for v in vectors("ibm3624") if "pin" in v["inputs"]], ids=lambda v: v["name"]
)
def test_ibm_offset_vectors(
    config: str, capsys: pytest.CaptureFixture[str], v: dict[str, Any]
) -> None:
    i = v["inputs"]
    assert i["pvk"] == TEST_KEY_HEX
    argv = ["hsm", "ibm-offset", "--pvk", "pvk", "--pan", "1122334455667788", "--pin", i["pin"]]
    argv += ["--dec-table", i["dectab"], "--validation-data", i["validation_data"]]
    status, out, _ = run(capsys, config, *argv)
    assert (status, out) == (0, v["expected"] + "\n")


def test_pin_read_from_stdin(
    config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v = vector("PVV pvki=2 pin=1912")
    monkeypatch.setattr(sys, "stdin", io.StringIO(v["inputs"]["pin"] + "\n"))
    argv = ["hsm", "pvv", "--pvk", "pvk", "--pan", v["inputs"]["pan"], "--pvki", "2"]
    status, out, _ = run(capsys, config, *argv, "--pin", "-")
    assert (status, out) == (0, "3244\n")


def _arqc_argv(cvn: str, data: str) -> list[str]:
    return [
        "hsm", "arqc", "--imk", "imk", "--cvn", cvn, "--pan", EMV_PAN, "--psn", EMV_PSN,
        "--atc", EMV_ATC, "--un", EMV_UN, "--data", data,
    ]  # fmt: skip


def test_arqc_cvn10_generate_and_arpc_method_1(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arqc = vector("Visa CVN10 ARQC (key = ICC MK, zero pad)")
    arpc = vector("Visa CVN10 ARPC method 1 ARC 3030")
    argv = _arqc_argv("10", arqc["inputs"]["data_hex"])
    assert run(capsys, config, *argv)[:2] == (0, arqc["expected"] + "\n")
    verify = [*argv, "--verify", arpc["inputs"]["arqc"], "--arc", arpc["inputs"]["arc"]]
    assert run(capsys, config, *verify)[:2] == (0, arpc["expected"] + "\n")


def test_arqc_cvn18_verify_and_arpc_method_2(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arqc = vector("Visa CVN18 ARQC (9F10 06011203A0B800, 0x80 pad)")
    arpc = vector("Visa CVN18 ARPC method 2 CSU 00000000")
    argv = _arqc_argv("18", arqc["inputs"]["data_hex"])
    assert run(capsys, config, *argv)[:2] == (0, arqc["expected"] + "\n")
    verify = [*argv, "--verify", arpc["inputs"]["arqc"], "--csu", arpc["inputs"]["csu"]]
    status, out, _ = run(capsys, config, *verify, "--json")
    assert status == 0
    answer = json.loads(out)
    assert (answer["ok"], answer["arpc"], answer["pan"]) == (
        True,
        arpc["expected"],
        "123456******3456",
    )


def test_tampered_arqc_is_a_mismatch(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    arqc = vector("Visa CVN10 ARQC (key = ICC MK, zero pad)")
    tampered = "39" + arqc["expected"][2:]
    argv = [*_arqc_argv("10", arqc["inputs"]["data_hex"]), "--verify", tampered, "--arc", "3030"]
    status, out, err = run(capsys, config, *argv)
    assert (status, out) == (1, "")
    assert err == "cardswitch: ARQC does not verify (mismatch)\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hsm", "cvv", "--cvk", "cvk", "--pan", "41234567890123x5", "--expiry", "8701",
          "--service-code", "101"], "invalid pan"),
        (["hsm", "cvv", "--cvk", "cvk", "--pan", "4123456789012345", "--expiry", "87011",
          "--service-code", "101"], "invalid expiry"),
        (["hsm", "pvv", "--pvk", "pvk", "--pan", "1122334455667788", "--pvki", "1", "--pin",
          "45x4"], "invalid pin"),
        ([*_arqc_argv("10", "00"), "--atc", "0G1C"], "--atc"),
        ([*_arqc_argv("10", "00ABC")], "--data"),
        ([*_arqc_argv("mc16", "00"), "--un", ""], "invalid un"),
        (["hsm", "arqc", "--imk", "imk", "--cvn", "10", "--pan", EMV_PAN, "--atc", "001C",
          "--data", "00", "--arc", "3030"], "--arc and --csu go with --verify"),
    ],
)  # fmt: skip
def test_bad_input_is_a_usage_error(
    config: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, config, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("cardswitch: ") and message in err and err.count("\n") == 1
    assert "4123456789012345" not in err and "45x4" not in err


def test_missing_key_is_a_failure(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["hsm", "cvv", "--cvk", "no-such-cvk", "--pan", "4123456789012345"]
    status, out, err = run(capsys, config, *argv, "--expiry", "8701", "--service-code", "101")
    assert (status, out, err) == (1, "", "cardswitch: key 'no-such-cvk' not found\n")


def test_wrong_key_usage_is_a_failure(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["hsm", "cvv", "--cvk", "pvk", "--pan", "4123456789012345"]
    status, _, err = run(capsys, config, *argv, "--expiry", "8701", "--service-code", "101")
    assert status == 1
    assert "'pvk'" in err and "cvk" in err


def test_missing_required_option_is_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["hsm", "cvv", "--cvk", "cvk"])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("v", vectors("tr31"), ids=lambda v: v["name"])
def test_tr31_import_under_kek(
    config: str, capsys: pytest.CaptureFixture[str], v: dict[str, Any]
) -> None:
    i = v["inputs"]
    kek = f"kek-{v['name'][-16:-12]}"  # distinct per vector
    assert (
        run(capsys, config, "keys", "import", kek, "--usage", "kek", "--clear", i["kbpk"])[0] == 0
    )
    label = f"zpk-tr31-{kek}"
    argv = ["keys", "import", label, "--usage", "zpk", "--tr31", i["key_block"], "--kek", kek]
    status, out, err = run(capsys, config, *argv, "--kbpk", i["kbpk"])
    assert (status, out, err) == (0, tdes_kcv(v["expected"]) + "\n", "")
    status, out, _ = run(capsys, config, "keys", "list", "--json")
    listed = {k["label"]: k for k in json.loads(out)}[label]
    assert listed == {
        "label": label,
        "usage": "zpk",
        "algorithm": "tdes-2key",
        "kcv": tdes_kcv(v["expected"]),
    }


def test_tr31_refusals(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    v = vector("TR-31 unwrap A0072P0TE00E0000")
    kbpk, block = v["inputs"]["kbpk"], v["inputs"]["key_block"]
    run(capsys, config, "keys", "import", "kek-refusals", "--usage", "kek", "--clear", kbpk)
    base = ["keys", "import", "zpk-refused", "--tr31"]
    other_kbpk = vector("TR-31 unwrap B0080P0TE00E0000")["inputs"]["kbpk"]
    cases = [
        ([*base, block, "--kek", "kek-refusals", "--kbpk", other_kbpk, "--usage", "zpk"],
         "does not match the check value"),
        ([*base, block[:-1] + "0", "--kek", "kek-refusals", "--kbpk", kbpk, "--usage", "zpk"],
         "MAC"),
        ([*base, block, "--kek", "kek-refusals", "--kbpk", kbpk, "--usage", "pvk"],
         "usage P0 does not fit --usage pvk"),
        ([*base, block, "--kek", "cvk", "--kbpk", kbpk, "--usage", "zpk"], "not kek"),
        ([*base, block, "--usage", "zpk"], "needs --kek"),
    ]  # fmt: skip
    for argv, message in cases:
        status, out, err = run(capsys, config, *argv)
        assert (status, out) == (2, ""), argv
        assert message in err
        assert kbpk not in err and other_kbpk not in err
    assert "zpk-refused" not in run(capsys, config, "keys", "list")[1]


def test_clear_import_prints_the_kcv_and_refuses_duplicates(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "89ABCDEF0123456776543210FEDCBA98"
    argv = ["keys", "import", "zpk-clear", "--usage", "zpk", "--clear", key]
    assert run(capsys, config, *argv) == (0, tdes_kcv(key) + "\n", "")
    status, _, err = run(capsys, config, *argv)
    assert (status, err) == (1, "cardswitch: key 'zpk-clear' already exists\n")


def test_installed_script_in_a_subprocess(config: str) -> None:
    script = Path(sys.executable).with_name("cardswitch")
    v = vector("CVV 4999988887777000")["inputs"]
    done = subprocess.run(
        [str(script), "hsm", "cvv", "--cvk", "cvk", "--pan", v["pan"], "--expiry", v["expiry"],
         "--service-code", v["service_code"], "--config", config],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "245\n"), done.stderr
    bad = subprocess.run(
        [str(script), "hsm", "pvv", "--pvk", "pvk", "--pan", "1122334455667788", "--pvki", "1",
         "--pin", "12", "--config", config],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "cardswitch: invalid pin: must be 4 to 12 digits\n"
