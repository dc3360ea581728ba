#!/usr/bin/env bash
# Extra packages some tests need: headless Chromium + its WebDriver (Debian packages) and the
# selenium bindings for tests/test_browser.py, plus Flask for the feature browser.
# Runs as root on a fresh Debian machine before pytest.  Quiet on success; on failure it prints
# the tail of the log and carries on, so the browser test itself reports what is missing
# (under CI=true that test fails rather than skips).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=$(mktemp)

apt_install() {
    for attempt in 1 2 3; do
        if DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOG" 2>&1 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
               chromium chromium-driver fonts-dejavu-core >>"$LOG" 2>&1; then
            return 0
        fi
        sleep $((attempt * 5))
    done
    return 1
}

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    :
elif ! command -v apt-get >/dev/null; then
    echo "ci-extra: no apt-get here; install chromium and chromium-driver by hand for tests/test_browser.py"
elif ! apt_install; then
    echo "ci-extra: could not install chromium/chromium-driver; last lines of the log:"
    tail -n 20 "$LOG"
fi

if ! "$PY" -m pip install -q "selenium>=4.20" "flask>=3" >>"$LOG" 2>&1; then
    echo "ci-extra: pip could not install selenium/flask; last lines of the log:"
    tail -n 20 "$LOG"
fi
rm -f "$LOG"
exit 0
