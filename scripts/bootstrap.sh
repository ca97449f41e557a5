#!/usr/bin/env bash
# Create the virtual environment and install Tidegate with its dev extra. Re-runs only when
# pyproject.toml changed (the Makefile's stamp file decides). Also installs the Debian
# docker-compose package, used without an engine to validate docker-compose.yml, and Debian's
# chromium + chromium-driver for the status page's browser test (best effort, like compose).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "bootstrap: Python 3.11+ is required" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING' || true
"$VENV/bin/python" -m pip install -q -e '.[dev]' 2>&1 | grep -vE '^(WARNING|  )|^$|!!|with strategy' || true
"$VENV/bin/python" -c 'import celery, kombu, redis, boto3, tenacity, moto, pycurl, fastapi'
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q docker-compose >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1; }) ||
    echo "bootstrap: could not install docker-compose; the compose-file test will say so" >&2
fi
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) ||
    echo "bootstrap: could not install chromium; the browser test will skip and say so" >&2
fi
touch "$VENV/.installed"
