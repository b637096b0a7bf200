#!/usr/bin/env bash
# Installs what ds01 needs on a fresh Debian machine, and nothing that is already there:
#   Debian packages: etcd-server and etcd-client, docker.io, busybox-static (offline test image), python3-venv,
#     docker-compose and curl (clients the gateway tests drive), nodejs/npm when missing,
#     systemd (systemd-analyze checks the installed units), passwd (gpasswd) and prometheus
#     (a real Prometheus scrapes the services in a test; promtool checks the alert rules)
#   npm: the Dev Containers CLI (what VS Code runs underneath), pinned
#   the Python project, editable, in .venv (versions pinned by constraints.txt)
# Safe to run again; a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)  # the compose stack's etcd image
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
[ -x /bin/busybox ] && ! head -c 4096 /bin/busybox | grep -q ld-linux || need_apt+=(busybox-static)
# .venv and `make install` use the distribution's Python, with its venv module.
[ -x /usr/bin/python3 ] || need_apt+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)  # units are verified
command -v gpasswd >/dev/null 2>&1 || need_apt+=(passwd)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)  # scrapes /metrics in a test
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages ${need_apt[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package scripts may try to start system daemons; ds01 starts its own.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

DEVCONTAINERS_CLI=0.89.0
if [ "$(devcontainer --version 2>/dev/null)" != "$DEVCONTAINERS_CLI" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: the Dev Containers CLI $DEVCONTAINERS_CLI is missing; run as root" >&2
        exit 1
    fi
    echo "setup: installing @devcontainers/cli@$DEVCONTAINERS_CLI"
    npm install -g --silent --no-fund --no-audit "@devcontainers/cli@$DEVCONTAINERS_CLI" >/dev/null
fi

stamp=.venv/.ds01-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    # The distribution's Python, never a pyenv under /root: every user can run it.
    python=/usr/bin/python3
    [ -x "$python" ] || python=python3
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the Python project into .venv"
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
    echo "$want" > "$stamp"
fi
