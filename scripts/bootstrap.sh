#!/usr/bin/env bash
# Create the virtual environment and install Tidegate with its dev extra. Re-runs only when
# pyproject.toml changed (the Makefile's stamp file decides). Also installs the Debian
# docker-compose package, used without an engine to validate docker-compose.yml, and Debian's
# chromium + chromium-driver for the status page's browser test, and wrk for
# bench/api_overload.py (best effort, like compose).
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
started=$SECONDS
step() { echo "bootstrap: $*"; }  # one line per step, so a first install never looks hung
if [ -x "$VENV/bin/python" ]; then
  step "reusing the virtual environment $VENV (pyproject.toml changed since the last install)"
else
  step "creating the virtual environment $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
# pip's own lines (Collecting, Downloading with its progress bar, Installing) stay visible.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
step "upgrading pip"
"$VENV/bin/python" -m pip install --upgrade pip
step "installing Tidegate and its dev tools (pip install -e '.[dev]'; about a minute the first time)"
"$VENV/bin/python" -m pip install -e '.[dev]'
step "checking the installed packages import"
"$VENV/bin/python" -c 'import celery, kombu, redis, boto3, tenacity, moto, pycurl, fastapi'
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  step "installing docker-compose with apt-get (only to validate docker-compose.yml; no engine)"
  (apt-get install -y -q docker-compose >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1; }) ||
    echo "bootstrap: could not install docker-compose; the compose-file test will say so" >&2
fi
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  step "installing chromium and chromium-driver with apt-get (the status page's browser test)"
  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) ||
    echo "bootstrap: could not install chromium; the browser test will skip and say so" >&2
fi
if ! command -v wrk >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  step "installing wrk with apt-get (bench/api_overload.py's load generator)"
  (apt-get install -y -q wrk >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; }) ||
    echo "bootstrap: could not install wrk; bench/api_overload.py will use its asyncio client" >&2
fi
touch "$VENV/.installed"
step "done in $(( SECONDS - started )) s"
