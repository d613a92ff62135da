"""Network profiles as data: the shipped files compile to the specs they claim, every error names
its file and key, sub-layouts and encodings are read as each profile says."""

from __future__ import annotations

import copy
from pathlib import Path

import iso8583
import pytest
from iso8583.specs import default as pyiso_default
from iso8583.specs import default_ascii as pyiso_default_ascii

from switch.acquirer import build_auth
from switch.config import ConfigError, ListenerConfig, from_mapping
from switch.decisions import Reason, UnknownNetwork, networks, profile
from switch.session import listener_framing, listener_spec
from switch.wire import codec
from switch.wire.codec import FormatError
from switch.wire.messages import AuthRequest
from switch.wire.profile import Keepalive, ProfileError, load_profile
from switch.wire.spec import shared_spec, spec_for

SHIPPED = (
    "iso",
    "iso87-ascii",
    "iso87-ascii-rawbin",
    "iso87-bcd",
    "iso87-binary",
    "mastercard",
    "visa",
)
PAN = "4123456789012345"


def _plain(body: bytes, spec: str = "ascii") -> dict[str, str]:
    """The pyiso8583 field dictionary of an encoded body ("t" for the MTI)."""
    return {("t" if k == "0" else k): v for k, v in codec.decode_fields(body, spec).items()}


def test_the_shipped_profiles_are_the_listener_choices() -> None:
    assert networks() == tuple(sorted(SHIPPED))  # base.toml is abstract


@pytest.mark.parametrize(
    ("name", "reference"), [("iso87-ascii", pyiso_default_ascii), ("iso87-binary", pyiso_default)]
)
def test_iso87_profiles_compile_to_pyiso8583s_own_specs(name: str, reference: dict) -> None:  # type: ignore[type-arg]
    """Element by element, names included: the profile is pyiso8583's spec."""
    assert load_profile(name).layout.spec() == reference
    assert shared_spec(name) == reference


def test_iso87_bcd_is_the_built_in_bcd_spec() -> None:
    assert load_profile("iso87-bcd").layout.spec() == spec_for("bcd")


@pytest.mark.parametrize("name", SHIPPED)
def test_pin_format_4_widens_de52(name: str) -> None:
    """16-byte DE52: 32 hex characters where DE52 is hex text, 16 bytes where it is raw."""
    four = shared_spec(load_profile(name).wire_spec(pin_block_format=4))["52"]
    eight = shared_spec(load_profile(name).wire_spec())["52"]
    assert four["max_len"] == 2 * eight["max_len"]
    assert four["max_len"] == (16 if four["data_enc"] == "b" else 32)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_reason_has_a_code_and_stand_ins_decline(name: str) -> None:
    prof = profile(name)
    assert set(prof.table) == set(Reason)
    assert prof.code(Reason.ISSUER_UNAVAILABLE) != prof.code(Reason.APPROVED)


def test_network_tables_extend_the_iso_base() -> None:
    iso, visa, mc = profile("iso"), profile("visa"), profile("mastercard")
    assert (iso.code(Reason.CVV2_MISMATCH), visa.code(Reason.CVV2_MISMATCH)) == ("82", "N7")
    assert mc.code(Reason.CVV2_MISMATCH) == "05" and visa.code(Reason.ARQC_FAILED) == "82"
    assert all(
        visa.code(r) == iso.code(r)
        for r in Reason
        if r
        not in {
            Reason.CVV2_MISMATCH,
            Reason.ARQC_FAILED,
            Reason.EMV_DATA_MISMATCH,
            Reason.ATC_REPLAY,
        }
    )


# -- errors name the file and the key --------------------------------------------------------


def _write(directory: Path, name: str, text: str) -> None:
    (directory / f"{name}.toml").write_text(text)


def test_unknown_network_in_config_names_the_file_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"listener": [{"network": "nosuch"}]}, "switch.toml")
    text = str(info.value)
    assert text.startswith("switch.toml: listener[0].network: ")
    assert "nosuch.toml" in text and "visa" in text  # the file looked for, the known ones
    with pytest.raises(ConfigError, match=r"listener\[0\]\.spec: .*nolayout\.toml"):
        from_mapping({"listener": [{"network": "visa", "spec": "nolayout"}]}, "switch.toml")


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[encoding]\nnumeric = "packed"\n', "encoding.numeric", "must be one of"),
        ('[fields.2]\ntype = "q"\n', "fields.2.type", "must be one of"),
        ("[fields.4]\nmax = 12\n", "fields.4", "either len"),
        ('[fields.2]\ndata = "utf-16"\n', "fields.2.data", "must be one of"),
        ('[framing]\nlength = "ascii2"\n', "framing.length", "must be one of"),
        ('[security]\ncvv2 = "de45"\n', "security.cvv2", "must be one of"),
        ('[de39]\nnot_a_reason = "05"\n', "de39.not_a_reason", "not a reason"),
        ('[de39]\napproved = "000"\n', "de39.approved", "2 letters or digits"),
        ('[keepalive]\nzero_length_frames = "reply"\n', "keepalive.zero_length_frames", "one of"),
        ("colour = 1\n", "colour", "unknown key"),
        ("budget = -1\n", "budget", "positive"),
    ],
)
def test_invalid_profile_names_its_file_and_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    _write(tmp_path, "bad", 'extends = "iso87-ascii"\n' + text)
    with pytest.raises((ProfileError, UnknownNetwork)) as info:
        profile("bad", tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'bad.toml'}: {key}: ")
    assert message in str(info.value)


def test_a_missing_code_and_an_approving_stand_in_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "loose", '[fields]\n[de39]\napproved = "00"\n')
    with pytest.raises(UnknownNetwork, match=r"loose\.toml: de39: no code for .*format_error"):
        profile("loose", tmp_path)
    _write(tmp_path, "kind", 'extends = "iso"\n[de39]\nissuer_unavailable = "00"\n')
    with pytest.raises(UnknownNetwork, match=r"kind\.toml: de39: .*issuer_unavailable approves"):
        profile("kind", tmp_path)


def test_extends_loop_and_abstract_base_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "a", 'extends = "b"\n')
    _write(tmp_path, "b", 'extends = "a"\n')
    with pytest.raises(ProfileError, match="loops"):
        load_profile("a", tmp_path)
    with pytest.raises(ProfileError, match="abstract"):
        load_profile("base")


def test_a_profile_may_name_another_de39_table(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "bank",
        'extends = "iso87-binary"\nde39_table = "visa"\nbudget = 1.5\n'
        '[de39]\ninsufficient_funds = "N1"\n[keepalive]\nzero_length_frames = "answer"\n'
        "idle_echo_after = 60\n",
    )
    prof = profile("bank", tmp_path)
    assert prof.code(Reason.CVV2_MISMATCH) == "N7" and prof.code(Reason.INSUFFICIENT_FUNDS) == "N1"
    assert prof.budget == 1.5
    assert prof.wire is not None
    assert prof.wire.keepalive == Keepalive("answer", 60.0, 30.0)
    assert prof.wire.layout.spec()["p"]["data_enc"] == "b"


# -- listener and profile --------------------------------------------------------------------


def test_listener_takes_the_profiles_wire_and_may_override() -> None:
    plain = ListenerConfig(network="mastercard")
    assert (plain.header, plain.spec) == ("binary2", "mastercard")
    assert listener_spec(plain).sub.cvv2 == "de48.se92"
    mixed = ListenerConfig(network="visa", spec="binary", header="ascii4")
    ws = listener_spec(mixed)
    assert ws.layout is not None and ws.layout.name == "iso87-binary" and ws.sub.cvv2 == "de126.10"
    assert listener_framing(mixed).header == "ascii4"
    # A listener copied onto another network takes that network's profile again.
    from dataclasses import replace

    moved = replace(plain, network="iso87-bcd")
    assert moved.spec == "iso87-bcd"


# -- sub-layouts -----------------------------------------------------------------------------


def test_visa_reads_cvv2_from_de126_10_and_de48_as_text() -> None:
    req = build_auth(PAN, 100, cvv2="123", stan="000101")
    body = codec.encode(req, "visa")
    fields = _plain(body, "visa")
    assert "48" not in fields
    assert fields["126"] == "0040000000000000" + "11" + " 123"
    got = codec.decode(body, "visa")
    assert isinstance(got, AuthRequest) and got.cvv2 == "123"
    # DE48 free text with a subelement-looking SE 92 is not Visa's CVV2 place.
    text = bytes(
        iso8583.encode(
            {**fields, "48": "R9203999", "126": "0000000000000000"},
            copy.deepcopy(pyiso_default_ascii),
        )[0]
    )
    got = codec.decode(text, "visa")
    assert isinstance(got, AuthRequest) and got.cvv2 is None
    assert got.additional_text == "R9203999"


@pytest.mark.parametrize("de126", ["free text, no bitmap", "ZZZZZZZZZZZZZZZZ", "0040000000000000"])
def test_other_de126_content_is_not_a_format_error(de126: str) -> None:
    fields = _plain(codec.encode(build_auth(PAN, 100, stan="000102")), "visa")
    body = bytes(iso8583.encode({**fields, "126": de126}, copy.deepcopy(pyiso_default_ascii))[0])
    got = codec.decode(body, "visa")
    assert isinstance(got, AuthRequest) and got.cvv2 is None


def test_mastercard_reads_cvc2_from_de48_se92() -> None:
    body = codec.encode(build_auth(PAN, 100, cvv2="321", stan="000103"), "mastercard")
    assert codec.decode_fields(body, "mastercard")["48"].endswith("9203321")
    got = codec.decode(body, "mastercard")
    assert isinstance(got, AuthRequest) and got.cvv2 == "321"


# -- encodings the shipped profiles do not use -------------------------------------------------


def test_an_ebcdic_profile_round_trips_in_cp500(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "ebcdic",
        'extends = "iso"\n[encoding]\nmti = "ebcdic"\n'
        'bitmap = "binary"\nnumeric = "ebcdic"\ntext = "ebcdic"\nbinary = "raw"\n'
        'prefix = "ebcdic"\n',
    )
    spec = load_profile("ebcdic", tmp_path).wire_spec()
    req = build_auth(PAN, 1250, stan="000104", cvv2="123")
    body = codec.encode(req, spec)
    assert body[:4] == "0100".encode("cp500") == b"\xf0\xf1\xf0\xf0"
    assert ("16" + PAN).encode("cp500") in body  # LLVAR prefix and PAN in EBCDIC
    got = codec.decode(body, spec)
    assert isinstance(got, AuthRequest) and (got.pan, got.amount, got.cvv2) == (PAN, 1250, "123")
    # An ASCII length prefix is not an EBCDIC one.
    bad = body.replace(("16" + PAN).encode("cp500"), b"16" + PAN.encode("cp500"))
    with pytest.raises(FormatError, match="field 2"):
        codec.decode(bad, spec)


def test_tertiary_bitmap_when_the_profile_allows_it(tmp_path: Path) -> None:
    _write(tmp_path, "three", 'extends = "iso"\n[encoding]\ntertiary_bitmap = true\n')
    spec = load_profile("three", tmp_path).wire_spec()
    plain = _plain(codec.encode(build_auth(PAN, 100, stan="000105")))
    body = bytes(iso8583.encode({**plain, "130": "EXTRA"}, shared_spec(spec).copy())[0])
    assert isinstance(codec.decode(body, spec), AuthRequest)
    with pytest.raises(FormatError) as info:
        codec.decode(body, "ascii")
    assert info.value.field == "65" and info.value.stan == "000105"
