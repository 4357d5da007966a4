#!/usr/bin/env bash
# The README's test command: set up everything the suite needs, then run it.
#   bash scripts/test.sh [pytest args...]
# As root (CI, a developer's VM) it installs and starts a one-node SLURM so the integration
# and end-to-end tests run for real; without root those tests skip with a one-line reason.
# With CI=true they must run: a missing SLURM fails the suite instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[test,mpi]'

if [[ "$(id -u)" == 0 ]]; then
  bash scripts/slurm-up.sh
  # Headless Chromium opens the HTML history report in a test (Debian's package; the
  # Ubuntu chromium-browser is a snap shim that does not run in containers).
  if ! command -v chromium >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -qq -y -o DPkg::Lock::Timeout=600 install chromium >/dev/null || {
      apt-get -qq -o DPkg::Lock::Timeout=600 update
      apt-get -qq -y -o DPkg::Lock::Timeout=600 install chromium >/dev/null; }
  fi
  # UCX (distributed-ucxx) pins its own dask version, so it gets a venv of its own; the
  # UCX test runs `dask-hpc up` from it. About 300 MB; runs on CPUs over UCX's TCP transport.
  if [[ ! -x .venv-ucx/bin/dask-hpc ]]; then
    "$PYTHON" -m venv .venv-ucx
    .venv-ucx/bin/python -m pip install --quiet --upgrade pip
  fi
  .venv-ucx/bin/python -m pip install --quiet -e '.[ucx]' 
elif [[ "${CI:-}" == "true" ]]; then
  echo "scripts/test.sh: CI needs root to install and start SLURM" >&2
  exit 1
else
  echo "scripts/test.sh: not root: SLURM tests will skip (run scripts/slurm-up.sh as root)" >&2
fi

export PATH="$PWD/$VENV/bin:$PATH"
echo "== ruff"; ruff check operator hpc-bridge tests
echo "== mypy"; mypy
echo "== pytest"; exec pytest "$@"
