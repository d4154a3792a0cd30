#!/usr/bin/env bash
# Install Debian's wrk, the HTTP load generator of `normserve bench` and tests/bench, when missing.
# Idempotent and quiet: exits 0 at once when wrk is on PATH. Without apt-get or root it says how
# to install it and exits 0 (the bench tests then skip; `normserve bench` itself refuses to run).
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-wrk: no apt-get here; install wrk by hand (https://github.com/wg/wrk; brew install wrk)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-wrk: not root and no password-less sudo; run 'apt-get install wrk' as root (the bench tests will skip)" >&2
        exit 0
    fi
fi

echo "install-wrk: installing wrk with apt-get (once)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null 2>&1; then
    # The package lists may be missing or stale (fresh containers): refresh once and retry.
    if ! $SUDO apt-get update -qq >/dev/null \
        || ! $SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null; then
        echo "install-wrk: apt-get could not install wrk (the bench tests will skip)" >&2
        exit 0
    fi
fi
command -v wrk >/dev/null 2>&1 && echo "install-wrk: $(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//') installed" >&2
exit 0
