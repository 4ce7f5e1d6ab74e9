#!/usr/bin/env bash
# Install the Debian 12 packages Portico needs, on a fresh machine, as root.
#
#   scripts/install-deps.sh            everything: build, test, fuzz, bench
#   scripts/install-deps.sh --runtime  only what building and running needs
#
# Idempotent: when every package is already installed it does nothing (no
# apt-get update), so it is cheap to call at the start of every script.
set -euo pipefail

RUNTIME_PKGS=(
    build-essential autoconf automake libtool pkg-config
    libevent-dev libssl-dev libjansson-dev libjwt-dev libhiredis-dev libnghttp2-dev
)
# Tests (unit, e2e, sanitizers, fuzzing, style), the benchmark, and the
# tools the scripts call (curl, taskset in util-linux, pkill/fuser, git);
# building and checking the .deb (dpkg-dev, debhelper, lintian,
# systemd-analyze in systemd, man-db, logrotate), the Kubernetes manifest
# test (python3-yaml) and the Django example fleet (Django REST framework
# under gunicorn, RS256 tokens with python3-jwt).
FULL_PKGS=(
    "${RUNTIME_PKGS[@]}"
    clang libclang-rt-14-dev clang-format
    python3 python3-pytest python3-prometheus-client
    redis-server curl wrk nginx-light haproxy openssl
    git procps psmisc util-linux
    dpkg-dev debhelper lintian systemd man-db logrotate python3-yaml
    python3-django python3-djangorestframework gunicorn python3-jwt
    python3-cryptography
    nghttp2-client python3-h2
)

usage() { echo "usage: $0 [--runtime]" >&2; exit 2; }

pkgs=("${FULL_PKGS[@]}")
case "${1:-}" in
    "") ;;
    --runtime) pkgs=("${RUNTIME_PKGS[@]}") ;;
    -h|--help) usage ;;
    *) usage ;;
esac

# dpkg-query prints "install ok installed" only for fully installed packages.
missing=()
for p in "${pkgs[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all ${#pkgs[@]} packages already installed"
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        SUDO=(sudo)
    else
        echo "install-deps: missing packages: ${missing[*]}" >&2
        echo "install-deps: run this script as root (or install sudo)" >&2
        exit 1
    fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
# The packages' maintainer scripts would start redis-server, nginx and
# haproxy as system services (holding ports 80 and 6379); tests and the
# benchmark start their own instances, so forbid that for this install
# through policy-rc.d (honoured by invoke-rc.d), unless one already exists.
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
echo "install-deps: done"
