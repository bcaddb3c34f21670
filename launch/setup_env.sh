#!/usr/bin/env bash
# Create or update ./.venv with the pinned versions of everything the project needs.
# Idempotent: a second call with unchanged pins returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv (first time: installs torch, ~3 minutes)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
