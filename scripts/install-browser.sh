#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/service/test_web_ui.py), when missing.
# Idempotent and quiet: exits 0 at once when /usr/bin/chromium is there. Playwright's own browser
# download (`playwright install`) is not used: the tests drive this system Chromium instead.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install Chromium by hand (the web UI test will skip)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: not root and no password-less sudo; run 'apt-get install chromium' as root (the web UI test will skip)" >&2
        exit 0
    fi
fi

echo "install-browser: installing chromium with apt-get (once)" >&2
export DEBIAN_FRONTEND=noninteractive
# Fonts so that pages (and screenshots) render text, not boxes.
if ! $SUDO apt-get update -qq >/dev/null \
    || ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-liberation >/dev/null; then
    echo "install-browser: apt-get could not install chromium (the web UI test will skip)" >&2
    exit 0
fi
[ -x "$CHROMIUM" ] && echo "install-browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) installed" >&2
exit 0
