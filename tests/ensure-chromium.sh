#!/usr/bin/env bash
# Make sure the browser tests (marker `browser`) have a browser: Debian's chromium, as Playwright's own browser
# download cannot be reached here. Use the one installed, else install the Debian package (as root), like
# tests/ensure-redis.sh does for Redis. The Playwright Python package itself comes from pyproject's dev extra.
set -euo pipefail
browser="${FHIR_NER_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$browser" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the browser tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  [ -x "$browser" ] && exit 0
fi
echo "no browser at $browser for the browser tests: install Debian's chromium (apt-get install chromium)" >&2
exit 1
