"""The development SoftHSM2 token and the choice of HSM backend.

What lives here: writing the SoftHSM2 configuration (its token directory beside it, under the
configured ``var/`` directory), pointing ``SOFTHSM2_CONF`` at it before the PKCS#11 library is
loaded, initialising the token when it does not exist (``softhsm2-util --init-token --free``,
idempotent), and ``open_hsm``, which returns the configured backend.

What does not: keys (``cardswitch keys ...`` in ``hsm.cli``), the commands (``hsm.api``).

SoftHSM reads ``SOFTHSM2_CONF`` when the library is initialised: a process uses one SoftHSM
configuration at a time; ``hsm.pkcs11`` switches to another only when no session is open.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hsm import pkcs11 as pkcs11_backend
from hsm.api import Hsm
from hsm.config import HsmConfig
from hsm.errors import HsmUnavailable

#: Environment variable SoftHSM2 reads its configuration file name from.
SOFTHSM_CONF_ENV = "SOFTHSM2_CONF"
#: Environment variable that overrides the configured user PIN (production).
USER_PIN_ENV = "CARDSWITCH_HSM_PIN"
#: Seconds softhsm2-util may take to list slots or initialise a token.
_UTIL_TIMEOUT = 30.0
#: Name of the token directory, beside the configuration file.
_TOKEN_DIR = "tokens"  # noqa: S105 - a directory name, not a secret


@dataclass(frozen=True)
class TokenStatus:
    """Where the dev token lives and whether this call created it."""

    conf: Path
    token_dir: Path
    created: bool


def _conf_text(token_dir: Path) -> str:
    return (
        "# Written by cardswitch (hsm.token): the development SoftHSM2 token.\n"
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def write_conf(conf: Path) -> Path:
    """Write the SoftHSM2 configuration at ``conf`` (if absent) and create its token dir.

    Returns:
        The absolute path of the configuration.
    """
    conf = conf.resolve()
    token_dir = conf.parent / _TOKEN_DIR
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not conf.exists():
        conf.write_text(_conf_text(token_dir), encoding="utf-8")
    return conf


def _activate(conf: Path) -> None:
    # Read by SoftHSM when the library is initialised (hsm.pkcs11 re-initialises it when this
    # changes and no session is open).
    os.environ[SOFTHSM_CONF_ENV] = str(conf)


def _util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmUnavailable("softhsm2-util not found (install the softhsm2 package)")
    return util


def token_labels(conf: Path) -> list[str]:
    """Labels of the initialised tokens of this SoftHSM configuration."""
    env = dict(os.environ, **{SOFTHSM_CONF_ENV: str(conf)})
    try:
        out = subprocess.run(
            [_util(), "--show-slots"],
            env=env,
            capture_output=True,
            text=True,
            timeout=_UTIL_TIMEOUT,
            check=True,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise HsmUnavailable(f"softhsm2-util --show-slots failed: {type(exc).__name__}") from None
    labels = []
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Label" and value.strip():
            labels.append(value.strip())
    return labels


def ensure_token(cfg: HsmConfig) -> TokenStatus:
    """Create or open the dev token of ``cfg``; idempotent.

    Writes the configuration, sets ``SOFTHSM2_CONF`` for this process and initialises the
    token with ``cfg.token_label``, ``cfg.so_pin`` and ``cfg.user_pin`` if no token carries the
    label.

    Raises:
        HsmUnavailable: softhsm2-util missing or failing.
    """
    conf = write_conf(cfg.softhsm_conf)
    _activate(conf)
    token_dir = conf.parent / _TOKEN_DIR
    if cfg.token_label in token_labels(conf):
        return TokenStatus(conf, token_dir, created=False)
    env = dict(os.environ, **{SOFTHSM_CONF_ENV: str(conf)})
    pin = os.environ.get(USER_PIN_ENV, cfg.user_pin)
    try:
        subprocess.run(
            [
                _util(),
                "--init-token",
                "--free",
                "--label",
                cfg.token_label,
                "--so-pin",
                cfg.so_pin,
                "--pin",
                pin,
            ],
            env=env,
            capture_output=True,
            timeout=_UTIL_TIMEOUT,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise HsmUnavailable(f"softhsm2-util --init-token failed: {type(exc).__name__}") from None
    return TokenStatus(conf, token_dir, created=True)


def init_dev_token(cfg: HsmConfig) -> bool:
    """``ensure_token`` for the CLI: True if the token was created, False if it existed."""
    return ensure_token(cfg).created


def open_hsm(cfg: HsmConfig) -> Hsm:
    """Return the configured backend, ready to use.

    ``backend = "pkcs11"`` (the default): for SoftHSM (a module path containing ``softhsm``)
    the dev token is created if needed; any other PKCS#11 module is opened as configured.
    ``backend = "software"``: the in-memory reference backend (tests, development).

    Raises:
        HsmUnavailable: the module, token or login is not usable.
    """
    if cfg.backend == "software":
        from hsm.software import SoftwareHsm  # noqa: PLC0415 - never loaded by default

        return SoftwareHsm()
    if "softhsm" in str(cfg.module).lower():
        ensure_token(cfg)
    pin = os.environ.get(USER_PIN_ENV, cfg.user_pin)
    return pkcs11_backend.Pkcs11Hsm.open(
        cfg.module,
        cfg.token_label,
        pin,
        timeout=cfg.timeout,
        offload=cfg.offload,
    )
