#!/usr/bin/env bash
# Installs everything IMGTalk-dub's tests, demo and jobs need on a fresh Debian machine:
# system packages (apt) and a pinned Python environment in .venv (requirements.txt: the
# runtime pins of requirements-runtime.txt plus the test pins). Safe to run again: it skips
# what is already installed for the current requirements files.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng speaks test and demo audio; prometheus is the real server the dashboard test queries.
APT_PACKAGES=(espeak-ng prometheus)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp=.venv/.install-stamp
want=$(cat requirements.txt requirements-runtime.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned, so nothing later pulls the CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "$(grep '^torch==' requirements-runtime.txt)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
echo "$want" > "$stamp"
