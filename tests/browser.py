"""Headless Chromium for the browser tests: where it is, and the flags that keep it off the network
(`make browser` installs it; tests skip without it)."""
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP_REASON = "no chromium binary (Debian: apt-get install -y chromium)"
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
