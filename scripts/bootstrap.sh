#!/usr/bin/env bash
# Sets up a fresh Debian machine for cardswitch: the Debian packages the switch and its tests
# use (installed only when run as root and missing), then a virtualenv with the project in it.
# Idempotent: a second run only re-installs the project when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Debian packages: SoftHSM2 (the local HSM), tshark (independent ISO 8583 decoder used by tests),
# prometheus (promtool checks config/ops/alerts.yml), postgresql (the server binaries the tests
# start a throwaway cluster from, as the unprivileged user the package creates), haproxy (the
# independent PROXY protocol v2 sender of tests/test_proxy_haproxy.py; its service is not used),
# libfuse2 (what fusepy loads: tests/read_only_fs.py, the read-only database of
# tests/test_disk_process.py).
DEB_PACKAGES=(softhsm2 tshark prometheus postgresql haproxy libfuse2)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: missing Debian packages (${missing[*]}); run as root or: sudo apt-get install ${missing[*]}" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.cardswitch-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
fi

# An independent ISO 8583 stack for the interop tests: the npm iso_8583 package (pinned), in
# var/npm (tests/test_interop.py finds it there). Only when node and npm are on the machine;
# without them those tests skip.
NPM_PEER=iso_8583@2.6.7
NPM_PREFIX=${NPM_PREFIX:-var/npm}
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    if [ ! -f "$NPM_PREFIX/node_modules/iso_8583/package.json" ]; then
        mkdir -p "$NPM_PREFIX"
        npm install --silent --no-audit --no-fund --prefix "$NPM_PREFIX" "$NPM_PEER" >/dev/null
    fi
fi
