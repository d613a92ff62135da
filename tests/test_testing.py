"""switch.testing: the config writer round-trips through the loader; the process helper
starts, reports and stops a real switch."""

from __future__ import annotations

import ssl
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from hsm.config import CardDataConfig, HsmConfig
from switch import config as config_mod
from switch.acquirer import echo
from switch.client import Client
from switch.config import (
    Config,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    PipelineConfig,
    ServerConfig,
    StoreConfig,
    TlsConfig,
)
from switch.pki import PkiPaths
from switch.testing import (
    SwitchStartError,
    serve_command,
    start_switch,
    switch_process,
    write_config,
)
from switch.wire.messages import NetworkResponse

REPO = Path(__file__).resolve().parents[1]

#: Every section off its default; strings that need escaping in TOML.
NON_DEFAULT = Config(
    listeners=(
        ListenerConfig(
            name="mc",
            network="mastercard",
            host="0.0.0.0",  # noqa: S104 - written to a file, never bound
            port=9000,
            header="ascii4",
            spec="bcd",
            max_frame=4096,
            handshake_timeout=2.5,
            frame_timeout=1e-3,
            max_in_flight=7,
            allowed_clients=("acquirer.example", 'quote"and\\back', "tab\tand\u00e9"),
            zpk="zpk-mc",
            pin_block_format=4,
        ),
        ListenerConfig(name="visa2", port=0, allowed_clients=()),
    ),
    tls=TlsConfig(ca=Path("/etc/x/ca.pem"), cert=Path("c.pem"), key=Path("k"), min_version="1.3"),
    server=ServerConfig(max_in_flight=1, drain_timeout=0.5),
    pipeline=PipelineConfig(budget=10.0, stand_in="system_error"),
    hsm=HsmConfig(backend="software", user_pin="0000", timeout=3.0, offload=True),
    card_data=CardDataConfig(backend="kms", kms_endpoint="http://127.0.0.1:5000"),
    store=StoreConfig(path=Path("/tmp/a b/ctl\x01.db"), batch_max=1),
    metrics=MetricsConfig(port=0),
    log=LogConfig(level="debug", format="console"),
)


@pytest.mark.parametrize(
    "cfg",
    [Config(), config_mod.load(REPO / "config" / "switch.toml"), NON_DEFAULT],
    ids=["embedded-defaults", "config-switch-toml", "non-defaults"],
)
def test_write_config_round_trips_through_the_loader(cfg: Config, tmp_path: Path) -> None:
    path = write_config(cfg, tmp_path / "switch.toml")
    assert config_mod.load(path) == cfg


def test_written_config_uses_the_documented_table_names(tmp_path: Path) -> None:
    text = write_config(Config(), tmp_path / "switch.toml").read_text()
    assert "[[listener]]" in text and "[card-data]" in text
    assert "[[listeners]]" not in text and "[card_data]" not in text


async def test_switch_process_starts_answers_and_stops_with_sigterm(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    cfg = Config(
        listeners=(ListenerConfig(name="a", port=0), ListenerConfig(name="b", port=0)),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        metrics=MetricsConfig(port=0),
    )
    path = write_config(cfg, tmp_path / "switch.toml")
    ready = tmp_path / "ready.json"
    # No engine: echo needs no HSM or store (serve would refuse the absent dev token).
    command = [*serve_command(path, ready), "--no-engine"]
    async with switch_process(path, ready, command=command) as proc:
        assert proc.ready.pid == proc.pid
        assert [x.name for x in proc.ready.listeners] == ["a", "b"]
        assert proc.port == proc.ready.listeners[0].port != 0
        async with Client.connect("127.0.0.1", proc.port, client_ctx) as client:
            with trio.fail_after(10):
                assert isinstance(await client.request(echo()), NetworkResponse)
    assert proc.process.returncode == 0


async def test_start_switch_reports_a_switch_that_exits_first(tmp_path: Path) -> None:
    bad = write_config(replace(Config(), tls=TlsConfig(ca=tmp_path / "none.pem")), tmp_path / "x")
    with pytest.raises(SwitchStartError, match="exited with 2"):
        await start_switch(bad, tmp_path / "ready.json", ready_within=30)
