"""The development SoftHSM2 token and the choice of HSM backend.

What lives here: writing the SoftHSM2 configuration (its token directory beside it, under the
configured ``var/`` directory), pointing ``SOFTHSM2_CONF`` at it before the PKCS#11 library is
loaded, initialising the token when it does not exist (``softhsm2-util --init-token --free``,
idempotent), and the two ways to get the configured backend:

* ``open_hsm`` opens what exists and creates nothing: the module, the SoftHSM configuration
  file and the token must be there, else ``HsmConfigError`` names the configuration key
  (``serve`` and every operator command but the two below use it, so a mistyped
  ``hsm.token_label`` is refused instead of answered by a new, empty token);
* ``ensure_hsm`` creates the SoftHSM configuration and the dev token when missing, then opens
  it: only ``cardswitch dev-setup`` and ``cardswitch hsm init`` use it.

``require_keys`` checks that the keys the configuration names exist with the right usage
(``serve`` at start-up); ``session_status`` reads the state of a PKCS#11 session (metrics).

What does not: keys (``cardswitch keys ...`` in ``switch.cli.hsm``), the commands
(``hsm.api``), reopening a lost session (``hsm.pkcs11``).

SoftHSM reads ``SOFTHSM2_CONF`` when the library is initialised: a process uses one SoftHSM
configuration at a time; ``hsm.pkcs11`` switches to another only when no session is open.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hsm import pkcs11 as pkcs11_backend
from hsm.api import Hsm, KeyAdmin, KeyUsage
from hsm.config import HsmConfig
from hsm.errors import HsmConfigError, HsmUnavailable
from hsm.pkcs11 import SessionStatus

__all__ = [
    "RequiredKey",
    "SessionStatus",
    "TokenStatus",
    "ensure_hsm",
    "ensure_token",
    "init_dev_token",
    "open_hsm",
    "require_keys",
    "session_status",
    "token_labels",
    "write_conf",
]

#: Environment variable SoftHSM2 reads its configuration file name from.
SOFTHSM_CONF_ENV = "SOFTHSM2_CONF"
#: Environment variable that overrides the configured user PIN (production).
USER_PIN_ENV = "CARDSWITCH_HSM_PIN"
#: Seconds softhsm2-util may take to list slots or initialise a token.
_UTIL_TIMEOUT = 30.0
#: Name of the token directory, beside the configuration file.
_TOKEN_DIR = "tokens"  # noqa: S105 - a directory name, not a secret
#: Debian package that installs SoftHSM2 (the module and softhsm2-util).
SOFTHSM_PACKAGE = "softhsm2"


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


def _is_softhsm(cfg: HsmConfig) -> bool:
    return "softhsm" in str(cfg.module).lower()


def open_hsm(cfg: HsmConfig) -> Hsm:
    """Return the configured backend, ready to use; create nothing.

    ``backend = "pkcs11"`` (the default): the module must exist and, for SoftHSM (a module path
    containing ``softhsm``), the configuration file ``hsm.softhsm_conf`` too (``SOFTHSM2_CONF``
    is pointed at it); the token labelled ``hsm.token_label`` must exist. ``backend =
    "software"``: the in-memory reference backend (tests, development).

    Raises:
        HsmConfigError: the module, the SoftHSM configuration or the token does not exist
            (the message names ``hsm.module``, ``hsm.softhsm_conf`` or ``hsm.token_label``).
        HsmUnavailable: the login is refused or the token is not usable.
    """
    if cfg.backend == "software":
        from hsm.software import SoftwareHsm  # noqa: PLC0415 - never loaded by default

        return SoftwareHsm()
    softhsm = _is_softhsm(cfg)
    if not Path(cfg.module).exists():
        hint = f"install the Debian package {SOFTHSM_PACKAGE}" if softhsm else "no such file"
        raise HsmConfigError("hsm.module", f"PKCS#11 module {cfg.module} not found ({hint})")
    if softhsm:
        conf = cfg.softhsm_conf.resolve()
        if not conf.is_file():
            raise HsmConfigError(
                "hsm.softhsm_conf",
                f"SoftHSM configuration {cfg.softhsm_conf} not found "
                "(cardswitch dev-setup or hsm init creates the dev token)",
            )
        _activate(conf)
    pin = os.environ.get(USER_PIN_ENV, cfg.user_pin)
    return pkcs11_backend.Pkcs11Hsm.open(
        cfg.module,
        cfg.token_label,
        pin,
        timeout=cfg.timeout,
        offload=cfg.offload,
    )


def ensure_hsm(cfg: HsmConfig) -> Hsm:
    """``open_hsm`` after creating the SoftHSM configuration and dev token if missing
    (``ensure_token``; other PKCS#11 modules are opened as configured).

    Raises:
        HsmConfigError, HsmUnavailable: as ``open_hsm``; softhsm2-util missing or failing.
    """
    if cfg.backend == "pkcs11" and _is_softhsm(cfg):
        if not Path(cfg.module).exists():
            raise HsmConfigError(
                "hsm.module",
                f"PKCS#11 module {cfg.module} not found "
                f"(install the Debian package {SOFTHSM_PACKAGE})",
            )
        ensure_token(cfg)
    return open_hsm(cfg)


@dataclass(frozen=True)
class RequiredKey:
    """A key the configuration names: where (``listeners.visa.zpk``), its label and usage."""

    config_key: str
    label: str
    usage: KeyUsage


async def require_keys(hsm: KeyAdmin, required: Sequence[RequiredKey]) -> None:
    """Check that every key of ``required`` exists in the HSM with its usage.

    Raises:
        HsmConfigError: the first key missing or of another usage, naming its configuration
            key and label.
    """
    present = {info.label: info for info in await hsm.list_keys()}
    for need in required:
        info = present.get(need.label)
        if info is None:
            raise HsmConfigError(
                need.config_key, f"no key {need.label!r} in the HSM (cardswitch keys import)"
            )
        if info.usage is not need.usage:
            raise HsmConfigError(
                need.config_key,
                f"key {need.label!r} has usage {info.usage}, {need.usage} is needed",
            )


def session_status(hsm: Hsm) -> SessionStatus | None:
    """The session state of a PKCS#11 backend; None for a backend without a session."""
    if isinstance(hsm, pkcs11_backend.Pkcs11Hsm):
        return hsm.session_status
    return None
