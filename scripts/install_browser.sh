#!/usr/bin/env bash
# Headless Chromium + its WebDriver from Debian, for tests/test_search_page.py (the search
# page in a real browser). Needs root (CI runs as root). Selenium itself comes with the
# project's [dev] extra. Safe to rerun: does nothing when both are installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "browser ok: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "browser installed: $(chromium --version 2>/dev/null | head -1)"
