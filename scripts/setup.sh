#!/usr/bin/env bash
# Create .venv with graddiag and what it needs. `scripts/setup.sh test` adds the test/benchmark deps.
# torch is pinned to 2.13.0 here only (a CPU wheel on this machine); pyproject declares a loose range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# this machine's pip config names local package folders that may be absent: drop those warnings
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  pip install -q "tensorflow-cpu>=2.15" -e ".[plot,test,bench]"
  # the Gradients tab's browser test drives Debian's chromium through playwright (no browser
  # download); without root/apt or a network it cannot be installed and that test skips
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
      >/dev/null 2>&1 || echo "setup.sh: chromium not installed; the browser test will skip" >&2
  fi
else
  pip install -q -e ".[plot]"
fi
