# syntax=docker/dockerfile:1
# cardswitch container image.
#
# Stage "builder" installs the project (not editable) into a virtualenv at /opt/venv; stage
# "runtime" is the same Python base with SoftHSM2 from Debian, that virtualenv, config/ and a
# non-root user. Both stages use the same base so the venv's interpreter path is identical.
#
# State (dev PKI, SoftHSM token directory, SQLite journal) lives in /srv/cardswitch/var, a
# volume owned by the cardswitch user. Create it once, then serve:
#   docker build -t cardswitch .
#   docker run --rm -e CARDSWITCH_HSM_PIN -v cardswitch-var:/srv/cardswitch/var cardswitch \
#       dev-setup --config config/container.toml
#   docker run -e CARDSWITCH_HSM_PIN -v cardswitch-var:/srv/cardswitch/var -p 8583:8583 \
#       -p 9583:9583 cardswitch
# config/switch.toml listens on 127.0.0.1; the image serves config/container.toml, the same
# settings bound to 0.0.0.0 so that published ports reach the listener and the metrics.
# The HSM user PIN is not in the image: pass it as CARDSWITCH_HSM_PIN (docker run -e, or an
# orchestrator secret exposed as that variable); see README "Operations".

#: Base image of both stages (Debian bookworm, CPython 3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# A C toolchain for dependencies without a wheel for the build platform (python-pkcs11 is a
# C extension); it stays in this stage. Debian versions are not pinned: bookworm's archive
# drops superseded versions (security updates), so a pin breaks the build instead of the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY switch/ switch/
COPY hsm/ hsm/
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import switch, hsm"  # the install is importable

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# softhsm2: the PKCS#11 token the switch uses by default (/usr/lib/softhsm/libsofthsm2.so).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends softhsm2 \
    && rm -rf /var/lib/apt/lists/*
# Fixed ids so that volume ownership survives image rebuilds.
RUN groupadd --system --gid 10001 cardswitch \
    && useradd --system --uid 10001 --gid cardswitch --home-dir /srv/cardswitch \
       --no-create-home --shell /usr/sbin/nologin cardswitch
COPY --from=builder /opt/venv /opt/venv
WORKDIR /srv/cardswitch
# Configuration is read-only for the daemon (owned by root); only var/ is writable.
COPY config/ config/
RUN mkdir -p var \
    && chown cardswitch:cardswitch var \
    && chmod 0750 var
# Numeric, so that runtimes enforcing runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
VOLUME ["/srv/cardswitch/var"]
# 8583: ISO 8583 over mutual TLS; 9583: /metrics, /healthz (event loop alive), /readyz.
EXPOSE 8583 9583
# Liveness from inside the container, with the interpreter already in the image (no curl):
# /healthz answers 503 (urlopen raises, exit 1) when the event loop has stopped running.
# The start period covers the SoftHSM login and SQLite recovery at start-up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9583/healthz', timeout=4)"]
# The switch drains in-flight requests on SIGTERM (server.drain_timeout) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cardswitch"]
CMD ["serve", "--config", "config/container.toml"]
