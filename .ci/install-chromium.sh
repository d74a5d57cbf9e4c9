#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py: Debian's chromium + chromium-driver, installed once.
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or passwordless sudo).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-chromium: need root or passwordless sudo to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# a stale package list 404s on superseded versions: refresh it once and retry
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core; }
/usr/bin/chromium --version
