#!/usr/bin/env bash
# Install the headless browser the demo's end-to-end test drives: Debian's `chromium` package
# (/usr/bin/chromium), used by Python Playwright through executable_path. Playwright's own browser
# download (`playwright install`) is deliberately not used.
# Idempotent; needs root or passwordless sudo. VTOKEN_SKIP_BROWSER=1 skips it (the browser test then skips).
set -euo pipefail

if [ "${VTOKEN_SKIP_BROWSER:-0}" = "1" ]; then
  echo "install_browser: skipped (VTOKEN_SKIP_BROWSER=1); the browser test will be skipped"
  exit 0
fi
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: apt-get not found; install Chromium at /usr/bin/chromium by hand," \
       "or set VTOKEN_SKIP_BROWSER=1" >&2
  exit 1
fi
if [ "$(id -u)" = "0" ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install_browser: installing chromium needs root (run: sudo apt-get install -y chromium)," \
       "or set VTOKEN_SKIP_BROWSER=1" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q chromium
/usr/bin/chromium --version
